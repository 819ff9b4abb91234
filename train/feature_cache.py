"""Teacher features computed once, kept on disk and reused by every later run (epochs, resumes, reruns).

Layout of a cache folder ``DIR``::

    DIR/<teacher_id>-<key>/          key: 16 hex digits of sha256(teacher id, weights hash, data id, dtype)
        part-<first>-<hash>.h5       one part per filled chunk, written atomically (temp file + rename):
            image_index  int64 [n]              the image indices of its rows (sorted, unique)
            levels       float16 [n, M, T, D]   the teacher's ``image_levels`` of those images
            text         float16 [n, t, D]      the teacher's ``text_tokens`` of their captions
            attrs: format, teacher_id, weights_hash, data_id, dtype

A run asks for a set of image indices. Those that no part holds are computed in chunks (reading only their
images) and each chunk is written as a new part, so an interrupted fill resumes where it stopped. Rows are then
read on demand, one batch at a time: memory holds a batch, not the table (the ViT-L/14 taps of the ~9,000 NSD
training images of one subject take 14 GB in float16).

The key: the teacher id (which teacher and its layer taps, set by the caller), a hash of every weight and
buffer of the teacher modules (:func:`weights_hash`), the data set's id (its stimuli and captions, see
:func:`mindhier_rt.data.dataset_id`) and the storage dtype. A different teacher, other weights or other
data give another folder: a miss, never a stale hit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor, nn

from mindhier_rt.data.h5 import H5_ERRORS
from mindhier_rt.errors import InputError
from mindhier_rt.io import PathLike, atomic_path

log = logging.getLogger(__name__)

__all__ = ["CACHE_FORMAT", "CachedColumn", "CachedFeatures", "FeatureCache", "teacher_features", "weights_hash"]

CACHE_FORMAT = 1
_DTYPES = {"float16": np.float16, "float32": np.float32}


def weights_hash(*modules: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every state-dict tensor of ``modules``, in order."""
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, t in module.state_dict().items():
            t = t.detach().cpu().contiguous()
            h.update(f"{i}.{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "teacher"


class FeatureCache:
    """The cache folder of one (teacher id, weights hash, data id, dtype) under ``root``."""

    def __init__(
        self, root: PathLike, teacher_id: str, weights_hash: str, data_id: str, dtype: str = "float16"
    ) -> None:
        if dtype not in _DTYPES:
            raise InputError(f"expected a cache dtype among {', '.join(_DTYPES)}, found {dtype!r}")
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"{self.root}: expected a folder for the feature cache, found a file")
        self.attrs = {
            "format": CACHE_FORMAT,
            "teacher_id": teacher_id,
            "weights_hash": weights_hash,
            "data_id": data_id,
            "dtype": dtype,
        }
        key = hashlib.sha256(json.dumps(self.attrs, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = self.root / f"{_slug(teacher_id)}-{key}"
        self.dtype = _DTYPES[dtype]

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.folder)!r})"

    def parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.h5")) if self.folder.is_dir() else []

    def _read_index(self, part: Path) -> np.ndarray:
        try:
            with h5py.File(part, "r") as f:
                found = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
                index = np.asarray(f["image_index"][()], dtype=np.int64)
                n_levels, n_text = f["levels"].shape[0], f["text"].shape[0]
        except H5_ERRORS as e:
            raise InputError(
                f"{part}: expected a readable feature-cache part, found an unreadable or corrupt file ({e}); delete it"
            ) from e
        want = {k: str(v) for k, v in self.attrs.items()}
        if {k: str(found.get(k)) for k in want} != want:
            raise InputError(f"{part}: expected a part of the cache {want}, found {found}; delete it")
        if not (index.ndim == 1 and index.size == n_levels == n_text):
            raise InputError(f"{part}: expected {index.size} rows of levels and text, found {n_levels} and {n_text}")
        return index

    def locations(self) -> dict[int, tuple[int, int]]:
        """image index -> (part number in :meth:`parts`, row)."""
        loc: dict[int, tuple[int, int]] = {}
        for p, part in enumerate(self.parts()):
            for row, img in enumerate(self._read_index(part).tolist()):
                loc.setdefault(img, (p, row))
        return loc

    def missing(self, image_index: np.ndarray) -> np.ndarray:
        """The sorted unique indices of ``image_index`` that no part holds."""
        have = self.locations()
        return np.array([i for i in np.unique(image_index).tolist() if i not in have], dtype=np.int64)

    def write_part(self, image_index: np.ndarray, levels: Tensor, text: Tensor) -> Path:
        """Store the features of ``image_index`` (sorted, unique) as a new part, atomically."""
        index = np.asarray(image_index, dtype=np.int64)
        if index.ndim != 1 or index.size == 0 or (np.diff(index) <= 0).any():
            raise InputError(f"expected sorted unique image indices, found {index[:8].tolist()}...")
        if levels.shape[0] != index.size or text.shape[0] != index.size:
            raise InputError(
                f"expected {index.size} rows of levels and text, found {levels.shape[0]} and {text.shape[0]}"
            )
        digest = hashlib.sha256(index.tobytes()).hexdigest()[:8]
        path = self.folder / f"part-{int(index[0]):08d}-{digest}.h5"
        lv = levels.detach().cpu().float().numpy().astype(self.dtype)
        tx = text.detach().cpu().float().numpy().astype(self.dtype)
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            f.attrs.update({k: str(v) for k, v in self.attrs.items()})
            f.create_dataset("image_index", data=index)
            f.create_dataset("levels", data=lv, chunks=(1, *lv.shape[1:]))  # a row per chunk: random row reads
            f.create_dataset("text", data=tx, chunks=(1, *tx.shape[1:]))
        log.debug("wrote %d rows to %s", index.size, path)
        return path

    def open(self) -> CachedFeatures:
        """Readers of every part; index them with image indices as you would a [N_images, ...] tensor."""
        return CachedFeatures(self.parts(), self.locations())


class CachedColumn:
    """One cached array (``levels`` or ``text``): ``column[image_index] -> float32 tensor`` read from disk."""

    def __init__(self, owner: CachedFeatures, name: str) -> None:
        self._owner, self.name = owner, name

    def __getitem__(self, image_index: Tensor | np.ndarray | Sequence[int]) -> Tensor:
        idx = np.asarray(image_index.cpu() if isinstance(image_index, Tensor) else image_index, dtype=np.int64)
        flat = idx.reshape(-1)
        own = self._owner
        if flat.size and (flat.min() < 0 or flat.max() >= own.loc_part.size or (own.loc_part[flat] < 0).any()):
            absent = [i for i in flat.tolist() if i < 0 or i >= own.loc_part.size or own.loc_part[i] < 0]
            raise InputError(f"expected cached features for images {absent[:8]}, found none in the cache")
        dsets = own.datasets(self.name)
        out = np.empty((flat.size, *dsets[0].shape[1:]), dtype=np.float32)
        parts, rows = own.loc_part[flat], own.loc_row[flat]
        for p in np.unique(parts).tolist():
            sel = np.flatnonzero(parts == p)
            uniq, inverse = np.unique(rows[sel], return_inverse=True)  # h5py reads increasing rows
            out[sel] = np.asarray(dsets[p][uniq], dtype=np.float32)[inverse.reshape(-1)]
        return torch.from_numpy(out.reshape(*idx.shape, *out.shape[1:]))


class CachedFeatures:
    """Open readers of a cache's parts: ``levels[img]`` [b, M, T, D] and ``text[img]`` [b, t, D], float32."""

    def __init__(self, parts: list[Path], locations: dict[int, tuple[int, int]]) -> None:
        size = max(locations, default=-1) + 1
        self.loc_part = np.full(size, -1, dtype=np.int64)
        self.loc_row = np.zeros(size, dtype=np.int64)
        for img, (p, row) in locations.items():
            self.loc_part[img], self.loc_row[img] = p, row
        self._files: list[h5py.File] = []
        try:
            self._files = [h5py.File(p, "r") for p in parts]
        except H5_ERRORS as e:
            self.close()
            raise InputError(f"expected readable feature-cache parts in {parts[0].parent}, found ({e})") from e
        self.levels = CachedColumn(self, "levels")
        self.text = CachedColumn(self, "text")

    def datasets(self, name: str) -> list[Any]:
        return [f[name] for f in self._files]

    def image_index(self) -> np.ndarray:
        return np.flatnonzero(self.loc_part >= 0)

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []

    def __enter__(self) -> CachedFeatures:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def teacher_features(
    cache: FeatureCache,
    image_index: np.ndarray,
    load_images: Callable[[np.ndarray], np.ndarray],
    load_captions: Callable[[], list[str]],
    image_teacher: Any,
    text_teacher: Any,
    chunk: int = 256,
    batch: int = 64,
    on_chunk: Callable[[int, int], None] | None = None,
) -> CachedFeatures:
    """The teacher features of ``image_index`` from ``cache``, computing (and storing) only what it lacks.

    ``load_images(index) -> float32 [n, 3, S, S]`` and ``load_captions() -> [N] strings`` are only called for
    missing rows; ``image_teacher.image_levels`` / ``text_teacher.text_tokens`` likewise. ``on_chunk(done,
    total)`` reports progress in images.
    """
    missing = cache.missing(np.asarray(image_index, dtype=np.int64))
    if missing.size:
        log.info("%s: computing teacher features of %d images", cache.folder, missing.size)
        captions = load_captions()
        for start in range(0, missing.size, chunk):
            idx = missing[start : start + chunk]
            images = torch.from_numpy(load_images(idx))
            levels = torch.cat([image_teacher.image_levels(images[i : i + batch]) for i in range(0, len(idx), batch)])
            text = text_teacher.text_tokens([captions[i] for i in idx.tolist()])
            cache.write_part(idx, levels, text)
            if on_chunk is not None:
                on_chunk(start + idx.size, missing.size)
    else:
        log.info("%s: every teacher feature of %d images is cached", cache.folder, np.unique(image_index).size)
    return cache.open()
