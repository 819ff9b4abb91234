"""An output folder that belongs to one run at a time (``decode``).

``claim_run_folder(out)`` creates the folder and takes an exclusive, non-blocking ``flock`` on ``out/.lock``
for as long as the run lasts; a second run into the same folder fails at once with an OutputError. The lock is
released by the kernel when the process ends, however it ends, so a killed run never blocks the next one (it
may leave an unlocked ``.lock`` file; a run that ends normally removes it).

``decode.json`` tells a reader what the folder holds: the run writes it first with ``"status": "running"``
and last with ``"status": "complete"``, both atomically (temp file + rename), so a folder whose decode.json
says ``running`` was interrupted (or is being written), and its ``images`` list is the authority on which
PNGs belong to the run. PNGs are written atomically too (``io.save_png``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mindhier_rt.errors import OutputError
from mindhier_rt.io import file_in_the_way, write_json

LOCK = ".lock"
REPORT = "decode.json"


@dataclass
class RunFolder:
    path: Path

    def report(self, status: str, fields: dict[str, Any]) -> Path:
        """Write ``decode.json`` = ``{"status": status, **fields}`` atomically."""
        try:
            return write_json(self.path / REPORT, {"status": status, **fields})
        except OSError as e:
            raise OutputError(f"--out {self.path}: cannot write {REPORT} ({e.strerror})") from e


def _make_folder(out: Path) -> None:
    blocker = file_in_the_way(out)
    if blocker == out:
        raise OutputError(f"--out {out}: expected a folder, found a file")
    if blocker is not None:
        raise OutputError(f"--out {out}: expected {blocker} to be a folder, found a file")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--out {out}: cannot create the folder ({e.strerror}: {e.filename})") from e


def _lock(out: Path) -> int:
    """An fd of ``out/.lock`` holding its exclusive flock. The file is removed when a run ends; a run that
    locked a file just removed that way (its inode is no longer at the path) tries again on the new one."""
    path = out / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            raise OutputError(f"--out {out}: cannot write into the folder ({e.strerror})") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputError(f"--out {out}: cannot lock {LOCK} ({e.strerror})") from e
            raise OutputError(
                f"--out {out}: expected a folder no other run is writing into, found it in use "
                f"(locked by process {holder}); wait for that run or choose another --out"
            ) from None
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def claim_run_folder(out: Path) -> Iterator[RunFolder]:
    """The folder ``out``, created and locked for this run; OutputError if it cannot be, or is in use."""
    out = Path(out)
    _make_folder(out)
    fd = _lock(out)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        if not os.access(out, os.W_OK):
            raise OutputError(f"--out {out}: expected a writable folder, found it read-only")
        yield RunFolder(out)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(out / LOCK)  # still holding the lock: see _lock
        os.close(fd)  # releases the lock
