"""``Bundle``: an opened engine bundle, a closed and verified unit.

``Bundle.open`` reads ``manifest.json`` once, parses it into the typed ``Manifest`` (``bundle.spec``) and, with
``verify``, hashes every listed file. Readers then get file contents through ``read_bytes`` / ``load_table`` /
``onnx_graph`` (re-hashed at load time, so a file swapped after ``open`` is refused) or, where a tool needs a
path (the TensorRT parser), through ``checked_path`` (the file is hashed just before the path is handed out).
Only files listed in the manifest can be read, and only from inside the bundle folder (see ``files.py``).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mindhier_rt.bundle.files import FileEntry, check_name, hash_file, open_regular, read_checked
from mindhier_rt.bundle.manifest import GraphSpec, Manifest, parse_manifest
from mindhier_rt.config import ModelConfig
from mindhier_rt.errors import BundleError, InputError
from mindhier_rt.io import atomic_path, write_json

MANIFEST = "manifest.json"
MANIFEST_MAX_BYTES = 64 << 20


@dataclass(frozen=True)
class OnnxGraph:
    """An ONNX graph as checked bytes: the model, and its external weight file's bytes by the name the model
    refers to it with (empty when the weights are inside the model)."""

    name: str
    model: bytes
    external: dict[str, bytes]


@dataclass
class Bundle:
    root: Path
    manifest: dict[str, Any]  # the JSON as read and checked; writers that rewrite it (``build``) start from it
    spec: Manifest  # the typed contract: what every reader should use
    cfg: ModelConfig

    @classmethod
    def open(cls, root: str | Path, verify: bool = True) -> Bundle:
        """Read and check a bundle: the manifest field by field and (with ``verify``) every file's checksum."""
        root = Path(root)
        if not root.is_dir() or not (root / MANIFEST).exists():
            raise BundleError(f"{root}: not an engine bundle (no manifest.json)")
        fd = open_regular(root, MANIFEST)
        with os.fdopen(fd, "rb") as f:
            raw = f.read(MANIFEST_MAX_BYTES + 1)
        if len(raw) > MANIFEST_MAX_BYTES:
            raise BundleError(f"{root / MANIFEST}: expected a manifest under {MANIFEST_MAX_BYTES} bytes")
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise BundleError(f"{root / MANIFEST}: unreadable manifest ({e})") from e
        spec = parse_manifest(doc, str(root / MANIFEST))
        bundle = cls(root, doc, spec, spec.config)
        if verify:
            bundle.verify()
        return bundle

    # ---- integrity ----------------------------------------------------------------------------------
    def verify(self) -> None:
        """Hash every listed file (inside the folder, regular, the recorded size and SHA-256)."""
        for rel, entry in self.spec.files.items():
            hash_file(self.root, rel, entry)

    def copy_to(self, dest: Path) -> Bundle:
        """Copy the bundle into the new folder ``dest``: the manifest and the listed files only, each checked as it
        is copied (streamed: memory holds a chunk, not a file); returns the copy, opened and verified."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=False)
        for rel, entry in self.spec.files.items():
            with atomic_path(dest / rel) as tmp, open(tmp, "wb") as sink:
                hash_file(self.root, rel, entry, sink)
        write_json(dest / MANIFEST, self.manifest)
        return Bundle.open(dest)

    def entry(self, rel: str) -> FileEntry:
        check_name(rel, f"{self.root}: file name")
        entry = self.spec.files.get(rel)
        if entry is None:
            raise BundleError(f"{self.root}: file {rel} is not listed in the manifest; only listed files are read")
        return entry

    def read_bytes(self, rel: str) -> bytes:
        """The contents of listed file ``rel``, hashed as read: the bytes returned are the bytes checked."""
        return read_checked(self.root, rel, self.entry(rel))

    def checked_path(self, rel: str) -> Path:
        """The path of listed file ``rel`` after hashing it, for tools that only take paths (TensorRT's parser)."""
        hash_file(self.root, rel, self.entry(rel))
        return self.root / rel

    def path(self, rel: str) -> Path:
        """Where a writer puts file ``rel`` inside the bundle (not for reading: see ``read_bytes``)."""
        return self.root / check_name(rel, f"{self.root}: file name")

    # ---- typed access ------------------------------------------------------------------------------
    def graph_spec(self, name: str) -> GraphSpec:
        try:
            return self.spec.graphs[name]
        except KeyError:
            raise BundleError(f"{self.root}: bundle has no graph {name!r}") from None

    def graph(self, name: str) -> dict[str, Any]:
        """The manifest entry of graph ``name`` as JSON (``graph_spec`` is the typed form)."""
        self.graph_spec(name)
        return self.manifest["graphs"][name]

    def onnx_graph(self, name: str) -> OnnxGraph:
        """Graph ``name`` and its external weights as checked bytes."""
        spec = self.graph_spec(name)
        external = {}
        if spec.external_data is not None:
            external[spec.external_data] = self.read_bytes(spec.external_data)
        return OnnxGraph(name, self.read_bytes(spec.file), external)

    def load_table(self, key: str) -> np.ndarray:
        """Table ``key`` (``rope_cos`` ...) from its checked bytes; no pickled objects."""
        if key not in self.spec.tables:
            raise BundleError(f"{self.root}: bundle has no table {key!r}; it has: {', '.join(self.spec.tables)}")
        rel = self.spec.tables[key]
        try:
            return np.load(io.BytesIO(self.read_bytes(rel)), allow_pickle=False)
        except ValueError as e:
            raise BundleError(f"{self.root}: table {rel} is not a .npy array ({e})") from e

    def voxel_count(self, subject: str) -> int:
        """Voxels per scan that ``subject``'s encoder graph takes; InputError if the bundle has no such graph."""
        self.encoder_graph(subject)
        return self.spec.subjects[subject]

    def encoder_graph(self, subject: str) -> dict[str, Any]:
        subjects = self.spec.subjects
        if subject not in subjects:
            raise InputError(
                f"bundle {self.root} has no encoder for subject {subject!r}; it has: {', '.join(subjects)}"
            )
        return self.graph(f"encoder_{subject}")
