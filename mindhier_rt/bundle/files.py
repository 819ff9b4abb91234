"""Files of a bundle: names that stay inside the folder, and reads that are checked against the manifest.

A bundle file name is a relative POSIX path (``generator_step.onnx``, ``plans/x.plan``): no absolute path, no
empty, ``.`` or ``..`` component, no backslash. On disk every component below the bundle folder must be a real
folder or, for the last one, a regular file: a symlink (wherever it points) or a device, FIFO or socket is
refused. Reads open the file with ``O_NOFOLLOW`` and check what was opened (``fstat``), so a name swapped for a
symlink between the check and the read is refused too, and the bytes returned are the bytes that were hashed.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from mindhier_rt.errors import BundleError

CHUNK = 1 << 22


@dataclass(frozen=True)
class FileEntry:
    """One listed file: its SHA-256 (hex) and size in bytes."""

    sha256: str
    bytes: int


def check_name(rel: object, where: str) -> str:
    """``rel`` if it is a safe bundle file name (see the module docstring), else BundleError naming ``where``."""
    if not isinstance(rel, str):
        raise BundleError(f"{where}: expected a file name (string), found {type(rel).__name__} {rel!r}")
    if not rel or "\\" in rel or "\0" in rel:
        raise BundleError(f"{where}: expected a relative file name inside the bundle, found {rel!r}")
    path = PurePosixPath(rel)
    if path.is_absolute() or rel.startswith("/"):
        raise BundleError(f"{where}: expected a relative file name inside the bundle, found the absolute path {rel!r}")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise BundleError(
            f"{where}: expected a file name inside the bundle (no empty, '.' or '..' parts), found {rel!r}"
        )
    return rel


def _check_folders(root: Path, rel: str) -> None:
    """Every folder between ``root`` and the file must be a real folder, not a symlink."""
    here = root
    for part in rel.split("/")[:-1]:
        here = here / part
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            raise BundleError(f"{root}: file {rel} listed in the manifest is missing (no folder {part})") from None
        if not stat.S_ISDIR(st.st_mode):
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a folder"
            raise BundleError(f"{root}: file {rel}: expected {part} to be a folder inside the bundle, found {kind}")


def _describe(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def open_regular(root: Path, rel: str) -> int:
    """An fd of the regular file ``root/rel`` (read-only); BundleError when it is missing or anything else."""
    check_name(rel, f"{root}: file name")
    _check_folders(root, rel)
    path = root / rel
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise BundleError(f"{root}: file {rel} listed in the manifest is missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(
            f"{root}: file {rel}: expected a regular file inside the bundle, found {_describe(st.st_mode)}"
        )
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise BundleError(f"{root}: file {rel} cannot be opened ({e.strerror})") from e
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise BundleError(f"{root}: file {rel}: expected a regular file inside the bundle, found {_describe(mode)}")
    return fd


def _mismatch(root: Path, rel: str, entry: FileEntry, size: int, digest: str | None) -> BundleError:
    if size != entry.bytes:
        return BundleError(f"{root}: file {rel} was altered (expected {entry.bytes} bytes, found {size})")
    return BundleError(
        f"{root}: file {rel} was altered (checksum mismatch: expected sha256 {entry.sha256}, found {digest})"
    )


def hash_file(root: Path, rel: str, entry: FileEntry, sink: BinaryIO | None = None) -> None:
    """Stream ``rel`` through SHA-256 (and into ``sink``, when given) and compare it with ``entry``; BundleError on
    any difference. A copy made through ``sink`` is good only when this returns."""
    with os.fdopen(open_regular(root, rel), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != entry.bytes:
            raise _mismatch(root, rel, entry, size, None)
        h = hashlib.sha256()
        size = 0
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
            size += len(chunk)
            if sink is not None:
                sink.write(chunk)
    if size != entry.bytes or h.hexdigest() != entry.sha256:
        raise _mismatch(root, rel, entry, size, h.hexdigest())


def read_checked(root: Path, rel: str, entry: FileEntry) -> bytes:
    """The bytes of ``rel``, read once and hashed: what is returned is exactly what matched ``entry``."""
    with os.fdopen(open_regular(root, rel), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != entry.bytes:
            raise _mismatch(root, rel, entry, size, None)
        data = f.read(entry.bytes + 1)
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != entry.bytes or digest != entry.sha256:
        raise _mismatch(root, rel, entry, len(data), digest)
    return data


def sha256_file(path: Path) -> str:
    """SHA-256 (hex) of a file the caller trusts the location of (the writer hashing what it wrote)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()
