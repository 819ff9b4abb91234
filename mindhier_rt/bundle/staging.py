"""Writing a bundle without touching anything that is not ours.

``staged_bundle(target)`` yields a new empty folder beside ``target``; the caller writes the whole bundle there.
Only when the caller finishes is the folder renamed to ``target``. What may be at ``target``:

* nothing, or an empty folder: the new bundle takes its place;
* a bundle (a ``manifest.json`` of our format whose ``files`` list every other file in the folder): it stays
  in place, untouched, until the new bundle is complete, and is then swapped out and its listed files removed;
* anything else (a file, a folder with files a bundle does not list): refused with an OutputError before any
  work starts, and checked again just before the swap.

A failure or interruption while writing removes the new folder and leaves ``target`` as it was.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mindhier_rt.bundle.manifest import FORMAT
from mindhier_rt.errors import OutputError
from mindhier_rt.io import file_in_the_way

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def _entries(folder: Path) -> list[str]:
    """Every file, link and folder below ``folder`` as relative POSIX names (links are not followed)."""
    names = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        rel = Path(dirpath).relative_to(folder)
        names += [(rel / n).as_posix() for n in filenames]
        names += [(rel / n).as_posix() + "/" for n in dirnames]
    return names


def _listed(folder: Path) -> list[str] | None:
    """The files the manifest at ``folder`` lists (manifest first), or None if it is not one of ours."""
    try:
        doc = json.loads((folder / MANIFEST).read_bytes())
    except (OSError, ValueError):
        return None
    files = doc.get("files") if isinstance(doc, dict) and doc.get("format") == FORMAT else None
    if not isinstance(files, dict):
        return None
    return [MANIFEST, *sorted(files)]


def foreign_entries(folder: Path) -> list[str]:
    """What in ``folder`` is not part of a bundle: everything when there is no manifest of ours, else the
    entries its ``files`` do not list (folders holding listed files are part of it)."""
    listed = _listed(folder)
    entries = _entries(folder)
    if listed is None:
        return entries
    folders = {"/".join(rel.split("/")[:i]) + "/" for rel in listed for i in range(1, rel.count("/") + 1)}
    return [name for name in entries if name not in listed and name not in folders]


def check_target(target: Path) -> str:
    """``absent``, ``empty`` or ``bundle``; OutputError for anything ``export`` must not replace."""
    if not os.path.lexists(target):
        return "absent"
    if target.is_symlink() or not target.is_dir():
        raise OutputError(f"--out {target}: expected a folder for the bundle, found a file")
    try:
        empty = not os.listdir(target)
        foreign = [] if empty else foreign_entries(target)
    except OSError as e:
        raise OutputError(f"--out {target}: cannot read the folder ({e.strerror})") from e
    if empty:
        return "empty"
    if foreign:
        shown = ", ".join(sorted(foreign)[:5]) + (", ..." if len(foreign) > 5 else "")
        raise OutputError(
            f"--out {target}: expected a new or empty folder or an engine bundle, found files no bundle there "
            f"lists ({shown}); export never deletes files it did not write: choose another --out"
        )
    return "bundle"


def _make_stage(target: Path) -> Path:
    blocker = file_in_the_way(target.parent)
    if blocker is not None:
        raise OutputError(f"--out {target}: expected {blocker} to be a folder, found a file")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.exporting-", dir=target.parent))
    except OSError as e:
        raise OutputError(f"--out {target}: cannot create a folder beside it ({e.strerror}: {e.filename})") from e
    umask = os.umask(0o022)
    os.umask(umask)
    stage.chmod(0o777 & ~umask)  # mkdtemp makes it private; the bundle gets the permissions a mkdir would give
    return stage


def _remove_old(old: Path, files: list[str]) -> None:
    """Delete the files of the replaced bundle (only those it listed) and its folders."""
    for rel in files:
        with contextlib.suppress(FileNotFoundError):
            (old / rel).unlink()
    for dirpath, _, _ in sorted(os.walk(old), key=lambda w: -len(w[0])):
        try:
            os.rmdir(dirpath)
        except OSError:
            log.warning("left %s: it holds files the replaced bundle did not list", dirpath)


def _swap_in(stage: Path, target: Path) -> None:
    kind = check_target(target)  # again: the folder may have changed while the bundle was written
    if kind != "bundle":
        os.replace(stage, target)  # an empty folder is replaced by rename, atomically
        return
    files = _listed(target)
    assert files is not None
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.replaced-", dir=target.parent))
    os.replace(target, old)  # old is an empty folder: rename replaces it
    try:
        os.replace(stage, target)
    except BaseException:
        os.replace(old, target)
        raise
    _remove_old(old, files)


@contextlib.contextmanager
def staged_bundle(target: Path) -> Iterator[Path]:
    """A new folder beside ``target`` to write a bundle into; moved to ``target`` when the block completes."""
    target = Path(target)
    check_target(target)
    stage = _make_stage(target)
    try:
        yield stage
        _swap_in(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
