"""The engine bundle: a folder of graphs (ONNX now, TensorRT plans later), weight files, small tables
and ``manifest.json``. ``export`` writes it; runtimes and C++ hosts read it. Everything a host needs to
run the decode loop is in the manifest: config, schedule, every graph's inputs and outputs, sampling
defaults, the loop in words and the SHA-256 of every file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mindhier_rt.config import ModelConfig
from mindhier_rt.errors import ConfigError, InputError, MindhierError
from mindhier_rt.io import write_json

FORMAT = "mindhier-rt-bundle"
FORMAT_VERSION = 2  # 2: rope tables are per head dim [L, c] (cos repeated, sin signed)


class BundleError(MindhierError):
    """A bundle that is missing files, altered, or of another format version."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(root: Path, manifest: dict[str, Any]) -> Path:
    """Add the checksums of every file in the bundle folder and write ``manifest.json`` atomically."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **manifest,
        "files": {p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files},
    }
    return write_json(root / "manifest.json", manifest)


@dataclass
class Bundle:
    root: Path
    manifest: dict[str, Any]
    cfg: ModelConfig

    @classmethod
    def open(cls, root: str | Path, verify: bool = True) -> Bundle:
        """Read and check a bundle: format, version, config, and (with ``verify``) every file's checksum."""
        root = Path(root)
        path = root / "manifest.json"
        if not path.is_file():
            raise BundleError(f"{root}: not an engine bundle (no manifest.json)")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise BundleError(f"{path}: unreadable manifest ({e})") from e
        if manifest.get("format") != FORMAT:
            raise BundleError(f"{path}: expected format {FORMAT!r}, found {manifest.get('format')!r}")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"{path}: bundle format version {manifest.get('format_version')} is not supported "
                f"(this mindhier-rt reads version {FORMAT_VERSION}); re-export it"
            )
        try:
            cfg = ModelConfig.from_dict(manifest["config"])
        except (KeyError, ConfigError) as e:
            raise BundleError(f"{path}: bad model config in the manifest ({e})") from e
        bundle = cls(root, manifest, cfg)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        for rel, meta in self.manifest.get("files", {}).items():
            p = self.root / rel
            if not p.is_file():
                raise BundleError(f"{self.root}: file {rel} listed in the manifest is missing")
            if p.stat().st_size != meta["bytes"] or sha256_file(p) != meta["sha256"]:
                raise BundleError(f"{self.root}: file {rel} was altered (checksum mismatch)")

    def graph(self, name: str) -> dict[str, Any]:
        try:
            return self.manifest["graphs"][name]
        except KeyError:
            raise BundleError(f"{self.root}: bundle has no graph {name!r}") from None

    def path(self, rel: str) -> Path:
        return self.root / rel

    def encoder_graph(self, subject: str) -> dict[str, Any]:
        subjects = self.manifest["subjects"]
        if subject not in subjects:
            raise InputError(
                f"bundle {self.root} has no encoder for subject {subject!r}; it has: {', '.join(subjects)}"
            )
        return self.graph(f"encoder_{subject}")
