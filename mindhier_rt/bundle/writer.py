"""Writing a manifest: the checksums of exactly the files the manifest refers to (and named extras)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mindhier_rt.bundle.files import check_name, sha256_file
from mindhier_rt.bundle.manifest import FORMAT, FORMAT_VERSION
from mindhier_rt.errors import BundleError
from mindhier_rt.io import write_json


def referenced_files(manifest: dict[str, Any]) -> list[str]:
    """The files a reader of ``manifest`` opens: graphs and their external data, tables, TensorRT plans
    and the ONNX each plan was built from."""
    names: list[str] = []
    for entry in manifest.get("graphs", {}).values():
        names.append(entry["file"])
        if "external_data" in entry:
            names.append(entry["external_data"])
    names.extend(manifest.get("tables", {}).values())
    for plan in manifest.get("plans", {}).values():
        names.extend([plan["file"], plan["onnx"]] if "onnx" in plan else [plan["file"]])
    return list(dict.fromkeys(names))


def write_manifest(root: Path, manifest: dict[str, Any], extra_files: Iterable[str] = ()) -> Path:
    """Hash the files ``manifest`` refers to (plus ``extra_files``) and write ``manifest.json`` atomically.

    Nothing else in the folder is listed: a reader opens listed files only. ``format``, ``format_version``
    and ``files`` in ``manifest`` are replaced.
    """
    body = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files")}
    files = {}
    for rel in [*referenced_files(body), *extra_files]:
        check_name(rel, f"{root}: file to list")
        path = root / rel
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise BundleError(f"{root}: the manifest refers to {rel}, which was not written") from None
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{root}: expected {rel} to be a regular file the writer made, found mode {st.st_mode:o}")
        files[rel] = {"sha256": sha256_file(path), "bytes": st.st_size}
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, **body, "files": dict(sorted(files.items()))}
    return write_json(root / "manifest.json", doc)
