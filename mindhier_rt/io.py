"""File input and output: atomic writes, deterministic PNGs and voxel files.

Everything the project writes goes through :func:`atomic_path` (or :func:`atomic_write`): the data is
written to a temporary file next to the target and renamed over it only once the writer succeeded, so a
crash or an exception never leaves a half-written file behind and never destroys the previous version.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import secrets
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import torch
from PIL import Image

from mindhier_rt.errors import InputError

log = logging.getLogger(__name__)

PathLike: TypeAlias = "str | os.PathLike[str]"
ImageLike: TypeAlias = "torch.Tensor | np.ndarray"

VOXEL_SUFFIXES = (".npy", ".npz", ".h5", ".hdf5")
DEFAULT_VOXEL_KEY = "voxels"

__all__ = [
    "VOXEL_SUFFIXES",
    "atomic_path",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "file_in_the_way",
    "finite_rows",
    "png_bytes",
    "read_voxels",
    "save_grid_png",
    "save_png",
    "write_json",
]


# --------------------------------------------------------------------------------------------------
# atomic writes


def _temp_name(path: Path) -> Path:
    """A fresh hidden name in ``path``'s folder that keeps its suffix (writers such as np.save look at it)."""
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    return path.with_name(f".{path.stem}.{token}.tmp{path.suffix}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable; not every platform lets a folder be opened, so failures are ignored."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (changing it is not thread-safe)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on failure it is removed.

    Parent folders are created. The caller must create the file at the yielded path.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(target)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"the writer for {target} did not create its temporary file {tmp}")
        # the mode a plain open() would give: some writers (safetensors) create their file private (0600)
        os.chmod(tmp, 0o666 & ~_umask())
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_dir(target.parent)
    log.debug("wrote %s", target)


def file_in_the_way(path: PathLike) -> Path | None:
    """The nearest existing ancestor of ``path`` (or ``path`` itself) if it is not a folder, else None: what
    makes ``mkdir -p path`` fail with a confusing "File exists" / "Not a directory"."""
    here = Path(path)
    while not os.path.lexists(here) and here != here.parent:
        here = here.parent
    return None if here.is_dir() else here


def atomic_write(path: PathLike, write_fn: Callable[[Path], Any], *, fsync: bool = True) -> Path:
    """Call ``write_fn(tmp_path)`` and move the result over ``path`` atomically. Returns ``path``."""
    with atomic_path(path, fsync=fsync) as tmp:
        write_fn(tmp)
    return Path(path)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (no newline translation)."""
    return atomic_write_bytes(path, text.encode(encoding))


def write_json(path: PathLike, obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as UTF-8 JSON with a trailing newline, atomically; key order is kept."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------------
# images


def _to_chw(img: ImageLike) -> np.ndarray:
    """[C, H, W] float32 in [0, 1] with C in {1, 3}; NaN becomes 0."""
    if isinstance(img, torch.Tensor):
        arr = img.detach().to("cpu", torch.float32).numpy()
    elif isinstance(img, np.ndarray):
        arr = np.asarray(img, dtype=np.float32)
    else:
        raise TypeError(f"expected a torch.Tensor or numpy array image, found {type(img).__name__}")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] not in (1, 3) or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ValueError(f"expected an image of shape [3, H, W] or [1, H, W], found {tuple(arr.shape)}")
    return np.clip(np.nan_to_num(arr, nan=0.0), 0.0, 1.0)


def _to_uint8_hwc(chw: np.ndarray) -> np.ndarray:
    """uint8 = round(clamp(x, 0, 1) * 255), computed in float32 (round half to even)."""
    u8 = np.rint(chw * np.float32(255.0)).astype(np.uint8)
    return np.ascontiguousarray(u8.transpose(1, 2, 0))


def to_uint8_hwc(img: ImageLike) -> np.ndarray:
    """A [3, H, W] (or [1, H, W]) image in [0, 1] as the uint8 [H, W, C] array its PNG holds."""
    return _to_uint8_hwc(_to_chw(img))


def png_bytes(img: ImageLike) -> bytes:
    """Encode a [3, H, W] (or [1, H, W]) image in [0, 1] as PNG bytes: no metadata, same input -> same bytes."""
    return png_bytes_uint8(to_uint8_hwc(img))


def png_bytes_uint8(hwc: np.ndarray) -> bytes:
    """PNG bytes of a uint8 [H, W, C] array (``to_uint8_hwc``'s output), as ``png_bytes`` writes them."""
    pil = Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def save_png(path: PathLike, img: ImageLike) -> Path:
    """Save a [3, H, W] image in [0, 1] (tensor or array) as a deterministic PNG, atomically."""
    return atomic_write_bytes(path, png_bytes(img))


def save_grid_png(path: PathLike, rows: Sequence[Sequence[ImageLike]], pad: int = 2, pad_value: float = 1.0) -> Path:
    """Save images as a grid: ``rows[i][j]`` is placed in row i, column j (top-left of its cell).

    Cells are as large as the largest image; short rows and padding are filled with ``pad_value``.
    Grayscale images are repeated to RGB.
    """
    if pad < 0:
        raise ValueError(f"pad must be >= 0, found {pad}")
    cells = [[_to_chw(img) for img in row] for row in rows]
    if not any(cells):
        raise ValueError("expected at least one image in the grid, found none")
    cell_h = max(c.shape[1] for row in cells for c in row)
    cell_w = max(c.shape[2] for row in cells for c in row)
    n_rows, n_cols = len(cells), max(len(row) for row in cells)
    grid = np.full(
        (3, n_rows * cell_h + (n_rows + 1) * pad, n_cols * cell_w + (n_cols + 1) * pad),
        np.clip(pad_value, 0.0, 1.0),
        dtype=np.float32,
    )
    for i, row in enumerate(cells):
        for j, c in enumerate(row):
            y, x = pad + i * (cell_h + pad), pad + j * (cell_w + pad)
            grid[:, y : y + c.shape[1], x : x + c.shape[2]] = c  # [1, h, w] broadcasts to RGB
    return save_png(path, grid)


# --------------------------------------------------------------------------------------------------
# voxels


def _check_voxels(arr: Any, path: Path, what: str) -> np.ndarray:
    """Validate dtype and rank; return [N, V] float32 (NaN and inf are kept)."""
    if not isinstance(arr, np.ndarray):
        raise InputError(f"{path}: expected a numeric array in {what}, found {type(arr).__name__}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InputError(f"{path}: expected numeric voxel values (integer or float) in {what}, found dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise InputError(
            f"{path}: expected voxels of shape [scans, voxels] or [voxels] in {what}, "
            f"found {arr.ndim}-D shape {tuple(arr.shape)}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"{path}: expected at least one scan and one voxel in {what}, found shape {tuple(arr.shape)}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _pick_key(path: Path, key: str | None, available: Sequence[str], kind: str) -> str:
    names = ", ".join(available) or "none"
    if key is not None:
        if key not in available:
            raise InputError(f"{path}: expected {kind} {key!r}, found {kind}s: {names}")
        return key
    if DEFAULT_VOXEL_KEY in available:
        return DEFAULT_VOXEL_KEY
    if len(available) == 1:
        return available[0]
    raise InputError(
        f"{path}: expected {kind} {DEFAULT_VOXEL_KEY!r} or a single {kind}, found {kind}s: {names}; pass a key"
    )


_LOAD_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, TypeError)


def _read_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except _LOAD_ERRORS as e:
        raise InputError(f"{path}: expected a readable .npy file, found an unreadable or corrupt file ({e})") from e
    if not isinstance(arr, np.ndarray):
        with contextlib.suppress(Exception):
            arr.close()
        raise InputError(f"{path}: expected a .npy array, found an .npz archive; rename it to .npz")
    return _check_voxels(arr, path, "the .npy file")


def _read_npz(path: Path, key: str | None) -> np.ndarray:
    try:
        npz = np.load(path, allow_pickle=False)
    except _LOAD_ERRORS as e:
        raise InputError(f"{path}: expected a readable .npz archive, found an unreadable or corrupt file ({e})") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise InputError(f"{path}: expected an .npz archive, found a plain .npy array; rename it to .npy")
    with npz:
        name = _pick_key(path, key, list(npz.files), "array")
        try:
            arr = npz[name]
        except _LOAD_ERRORS as e:
            raise InputError(f"{path}: expected a readable array {name!r}, found a corrupt entry ({e})") from e
    return _check_voxels(arr, path, f"array {name!r}")


def _read_h5(path: Path, key: str | None) -> np.ndarray:
    try:
        import h5py
    except ImportError:
        raise InputError(
            f"{path}: reading HDF5 needs h5py, which is not installed; run `pip install h5py` "
            "or install the `train` extra (`pip install mindhier-rt[train]`)"
        ) from None
    try:
        with h5py.File(path, "r") as f:
            datasets = [name for name, obj in f.items() if isinstance(obj, h5py.Dataset)]
            name = key if key is not None and key in f else _pick_key(path, key, datasets, "dataset")
            obj = f[name]
            if not isinstance(obj, h5py.Dataset):
                raise InputError(f"{path}: expected {name!r} to be a dataset, found a {type(obj).__name__}")
            arr = obj[()]
    except (*_LOAD_ERRORS, KeyError, RuntimeError) as e:
        raise InputError(f"{path}: expected a readable HDF5 file, found an unreadable or corrupt file ({e})") from e
    return _check_voxels(np.asarray(arr), path, f"dataset {name!r}")


def read_voxels(path: PathLike, key: str | None = None) -> np.ndarray:
    """Read fMRI voxels as a [N, V] float32 array from ``.npy``, ``.npz`` or ``.h5``/``.hdf5``.

    A 1-D array is one scan. ``key`` names the array (npz) or dataset (h5); by default ``voxels`` or the
    only one. NaN/inf values are kept: see :func:`finite_rows`. Raises InputError for anything unreadable.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in VOXEL_SUFFIXES:
        raise InputError(
            f"{p}: expected a voxel file ending in {', '.join(VOXEL_SUFFIXES)}, found {suffix or 'none'!r}"
        )
    if not p.exists():
        raise InputError(f"{p}: expected a voxel file, found no such file")
    if not p.is_file():
        raise InputError(f"{p}: expected a voxel file, found a folder or special file")
    if suffix == ".npy":
        voxels = _read_npy(p)
    elif suffix == ".npz":
        voxels = _read_npz(p, key)
    else:
        voxels = _read_h5(p, key)
    log.debug("read %d scans x %d voxels from %s", voxels.shape[0], voxels.shape[1], p)
    return voxels


def finite_rows(voxels: np.ndarray) -> np.ndarray:
    """Boolean mask [N]: True where a scan (row) has only finite values."""
    arr = np.asarray(voxels)
    if arr.ndim != 2:
        raise InputError(f"expected voxels of shape [scans, voxels], found shape {tuple(arr.shape)}")
    return np.isfinite(arr).all(axis=1)
