"""One on-disk layout for brain data sets (the synthetic benchmark now, NSD later), its writer and loader.

The layout follows MindEye2's NSD preparation::

    root/dataset.json              {"layout_version": 1, "kind": ..., "subjects": {name: n_voxels},
                                    "image_size": S, "n_images": N, "forward_model": {...}, "seed": ...}
    root/stimuli.h5                dataset "images": uint8 [N, S, S, 3] (NHWC, like NSD's imgBrick)
    root/captions.json             list of N strings (COCO captions for NSD)
    root/attributes.npz            stimulus attributes (synthetic data only; optional)
    root/betas/{subject}.h5        dataset "betas": float32 [T, V], z-scored single trials
    root/trials/{subject}.npz      "image_index" int64 [T], "split" uint8 [T] (0 train, 1 test)

``dataset.json`` is written last, so a folder with it is complete. :class:`BrainDataset` validates every
file it opens and raises :class:`~mindhier_rt.errors.InputError` naming the offending path.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mindhier_rt.config import preset
from mindhier_rt.data.h5 import H5_ERRORS, betas_dataset, h5_dataset, unreadable
from mindhier_rt.data.synthetic import StimulusAttributes, SyntheticSet, make_synthetic
from mindhier_rt.errors import InputError
from mindhier_rt.io import PathLike, atomic_path, write_json

log = logging.getLogger(__name__)

__all__ = ["LAYOUT_VERSION", "SPLITS", "BrainDataset", "synth_command_impl", "write_dataset"]

LAYOUT_VERSION = 1
SPLITS: dict[str, int] = {"train": 0, "test": 1}
_BLOCK_BYTES = 256 * 2**20  # rows of betas are read in blocks of about this size
_NPZ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, TypeError)


# --------------------------------------------------------------------------------------------------
# writing


def _write_h5(path: Path, name: str, data: np.ndarray) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        chunk_rows = max(1, min(data.shape[0], (1 << 20) // max(1, data[:1].nbytes)))
        f.create_dataset(name, data=data, chunks=(chunk_rows, *data.shape[1:]))


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)  # the temporary name keeps the .npz suffix, so np.savez adds nothing


def write_dataset(ds: SyntheticSet, out: PathLike) -> Path:
    """Write ``ds`` in the layout above under ``out`` (created if needed); returns ``out``.

    Every file is written atomically; ``dataset.json`` comes last.
    """
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise InputError(f"{root}: expected a folder for the data set, found a file")
    images = np.asarray(ds.images)
    n_img, size = images.shape[0], ds.image_size
    if images.ndim != 4 or images.shape[1:] != (3, size, size):
        raise InputError(f"expected images of shape [N, 3, S, S], found {tuple(images.shape)}")
    root.mkdir(parents=True, exist_ok=True)

    u8 = np.rint(np.clip(images, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8).transpose(0, 2, 3, 1)
    _write_h5(root / "stimuli.h5", "images", np.ascontiguousarray(u8))
    write_json(root / "captions.json", ds.attrs.captions())
    _write_npz(root / "attributes.npz", **ds.attrs.to_arrays())
    for name, (voxels, image_index, split) in ds.trials.items():
        if not (voxels.shape[0] == image_index.shape[0] == split.shape[0]):
            raise InputError(
                f"subject {name}: expected as many trials in voxels ({voxels.shape[0]}), image_index "
                f"({image_index.shape[0]}) and split ({split.shape[0]})"
            )
        _write_h5(root / "betas" / f"{name}.h5", "betas", np.ascontiguousarray(voxels, dtype=np.float32))
        _write_npz(
            root / "trials" / f"{name}.npz",
            image_index=np.asarray(image_index, dtype=np.int64),
            split=np.asarray(split, dtype=np.uint8),
        )
    meta = {
        "layout_version": LAYOUT_VERSION,
        "kind": "synthetic",
        "subjects": ds.subjects,
        "image_size": size,
        "n_images": int(n_img),
        "forward_model": ds.forward_model,
        "seed": ds.seed,
    }
    write_json(root / "dataset.json", meta)
    log.info("wrote synthetic data set (%d images, subjects %s) to %s", n_img, ", ".join(ds.subjects), root)
    return root


def synth_command_impl(
    out: PathLike,
    preset_name: str = "demo",
    n_train: int = 1200,
    n_test: int = 100,
    repeats: int = 3,
    seed: int = 0,
) -> Path:
    """Build the synthetic set for a preset's subjects and image size and write it to ``out``."""
    cfg = preset(preset_name)
    ds = make_synthetic(
        cfg.encoder.subjects, n_train=n_train, n_test=n_test, repeats=repeats, size=cfg.image_size, seed=seed
    )
    return write_dataset(ds, out)


# --------------------------------------------------------------------------------------------------
# reading


class BrainDataset:
    """Reader for the layout above (synthetic or NSD).

    ``subjects`` maps subject name to voxel count, ``image_size`` is the stimulus side in pixels.
    """

    def __init__(self, root: PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"{self.root}: expected a data set folder, found no such folder")
        meta_path = self.root / "dataset.json"
        if not meta_path.is_file():
            raise InputError(f"{meta_path}: expected the data set description dataset.json, found no such file")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{meta_path}: expected a JSON object, found unreadable content ({e})") from e
        if not isinstance(meta, dict):
            raise InputError(f"{meta_path}: expected a JSON object, found {type(meta).__name__}")
        version = meta.get("layout_version")
        if version != LAYOUT_VERSION:
            raise InputError(f"{meta_path}: expected layout_version {LAYOUT_VERSION}, found {version!r}")
        try:
            subjects = {str(k): int(v) for k, v in dict(meta["subjects"]).items()}
            image_size = int(meta["image_size"])
            n_images = int(meta["n_images"])
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(
                f"{meta_path}: expected 'subjects' {{name: n_voxels}}, 'image_size' and 'n_images', found {e!r}"
            ) from e
        if not subjects or image_size < 1 or n_images < 1 or min(subjects.values()) < 1:
            raise InputError(
                f"{meta_path}: expected at least one subject with voxels, a positive image_size and n_images, "
                f"found subjects={subjects}, image_size={image_size}, n_images={n_images}"
            )
        self.meta: dict[str, Any] = meta
        self.kind: str = str(meta.get("kind", "unknown"))
        self.subjects: dict[str, int] = subjects
        self.image_size: int = image_size
        self.n_images: int = n_images
        log.debug("opened %s data set %s: %d images, subjects %s", self.kind, self.root, n_images, subjects)

    def __repr__(self) -> str:
        return f"BrainDataset({str(self.root)!r}, kind={self.kind!r}, subjects={self.subjects})"

    # ---- stimuli

    def images(self, index: np.ndarray | None = None) -> np.ndarray:
        """Stimuli float32 [N, 3, S, S] in [0, 1]: all of them, or those at ``index`` (in that order)."""
        path = self.root / "stimuli.h5"
        if not path.is_file():
            raise InputError(f"{path}: expected the stimulus file, found no such file")
        idx = None
        if index is not None:
            idx = np.asarray(index)
            if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
                raise InputError(f"expected a 1-D integer image index, found shape {idx.shape} dtype {idx.dtype}")
            idx = idx.astype(np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= self.n_images):
                raise InputError(
                    f"{path}: expected image indices in [0, {self.n_images}), found [{idx.min()}, {idx.max()}]"
                )
        s = self.image_size
        try:
            with h5py.File(path, "r") as f:
                dset = h5_dataset(f, path, "images")
                if dset.shape != (self.n_images, s, s, 3) or dset.dtype != np.uint8:
                    raise InputError(
                        f"{path}: expected 'images' uint8 of shape {(self.n_images, s, s, 3)}, "
                        f"found {dset.dtype} of shape {dset.shape}"
                    )
                if idx is None:
                    u8 = dset[()]
                elif idx.size == 0:
                    u8 = np.zeros((0, s, s, 3), dtype=np.uint8)
                else:
                    uniq, inverse = np.unique(idx, return_inverse=True)  # h5py wants increasing indices
                    u8 = dset[uniq][inverse.reshape(-1)]
        except H5_ERRORS as e:
            raise unreadable(path, e) from e
        return np.ascontiguousarray(u8.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)

    def captions(self) -> list[str]:
        """One caption per image."""
        path = self.root / "captions.json"
        try:
            caps = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{path}: expected the captions file, found no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{path}: expected a JSON list of strings, found unreadable content ({e})") from e
        if not isinstance(caps, list) or len(caps) != self.n_images or not all(isinstance(c, str) for c in caps):
            found = f"a list of {len(caps)}" if isinstance(caps, list) else type(caps).__name__
            raise InputError(f"{path}: expected a list of {self.n_images} strings, found {found}")
        return caps

    def attributes(self) -> StimulusAttributes | None:
        """The synthetic stimulus attributes, or None when the data set has none (NSD)."""
        path = self.root / "attributes.npz"
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as npz:
                attrs = StimulusAttributes.from_arrays(npz)
        except _NPZ_ERRORS as e:
            raise InputError(
                f"{path}: expected a readable .npz archive, found an unreadable or corrupt file ({e})"
            ) from e
        except InputError as e:
            raise InputError(f"{path}: {e}") from e
        if len(attrs) != self.n_images:
            raise InputError(f"{path}: expected attributes for {self.n_images} images, found {len(attrs)}")
        return attrs

    # ---- trials

    def _check_subject(self, subject: str) -> int:
        if subject not in self.subjects:
            known = ", ".join(self.subjects)
            raise InputError(f"{self.root}: expected a subject among {known}, found {subject!r}")
        return self.subjects[subject]

    def _trials(self, subject: str) -> tuple[np.ndarray, np.ndarray]:
        path = self.root / "trials" / f"{subject}.npz"
        if not path.is_file():
            raise InputError(f"{path}: expected the trial table of {subject}, found no such file")
        try:
            with np.load(path, allow_pickle=False) as npz:
                image_index = np.asarray(npz["image_index"])
                split = np.asarray(npz["split"])
        except _NPZ_ERRORS as e:
            raise InputError(
                f"{path}: expected a readable .npz with 'image_index' and 'split', found an unreadable, corrupt "
                f"or incomplete file ({e})"
            ) from e
        if image_index.ndim != 1 or split.shape != image_index.shape:
            raise InputError(
                f"{path}: expected 1-D 'image_index' and 'split' of equal length, found shapes "
                f"{image_index.shape} and {split.shape}"
            )
        if not np.issubdtype(image_index.dtype, np.integer) or not np.issubdtype(split.dtype, np.integer):
            raise InputError(
                f"{path}: expected integer 'image_index' and 'split', found {image_index.dtype} and {split.dtype}"
            )
        if image_index.size and (image_index.min() < 0 or image_index.max() >= self.n_images):
            raise InputError(
                f"{path}: expected image indices in [0, {self.n_images}), "
                f"found [{image_index.min()}, {image_index.max()}]"
            )
        bad = np.setdiff1d(np.unique(split), list(SPLITS.values()))
        if bad.size:
            raise InputError(f"{path}: expected split values 0 (train) or 1 (test), found {bad.tolist()}")
        return image_index.astype(np.int64), split.astype(np.uint8)

    def _betas(self, subject: str, n_trials: int, rows: np.ndarray) -> np.ndarray:
        """The betas at boolean ``rows`` [T], read in blocks so that only those rows are kept in memory."""
        path = self.root / "betas" / f"{subject}.h5"
        n_vox = self.subjects[subject]
        if not path.is_file():
            raise InputError(f"{path}: expected the betas of {subject}, found no such file")
        try:
            with h5py.File(path, "r") as f:
                dset = betas_dataset(f, path, n_vox, "voxels per trial (dataset.json)")
                if dset.shape[0] != n_trials:
                    trials_path = self.root / "trials" / f"{subject}.npz"
                    raise InputError(f"{path}: expected {n_trials} trials (as in {trials_path}), found {dset.shape[0]}")
                block = max(1, _BLOCK_BYTES // (4 * n_vox))
                parts = []
                for start in range(0, n_trials, block):
                    keep = rows[start : start + block]
                    if keep.any():
                        parts.append(np.asarray(dset[start : start + block], dtype=np.float32)[keep])
        except H5_ERRORS as e:
            raise unreadable(path, e) from e
        out = np.concatenate(parts) if parts else np.zeros((0, n_vox), dtype=np.float32)
        if not np.isfinite(out).all():
            bad = int((~np.isfinite(out).all(axis=1)).sum())
            raise InputError(f"{path}: expected finite betas, found {bad} trials with NaN or inf values")
        return out

    def split(self, subject: str, split: str, average_repeats: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Voxels float32 [n, V] and image indices int64 [n] of one subject's ``"train"`` or ``"test"`` trials.

        With ``average_repeats`` (default: True for test, False for train) the repeats of each image are
        averaged into one row, rows sorted by image index; otherwise single trials in stored order.
        """
        if split not in SPLITS:
            raise InputError(f"expected split 'train' or 'test', found {split!r}")
        self._check_subject(subject)
        image_index, splits = self._trials(subject)
        rows = splits == SPLITS[split]
        voxels = self._betas(subject, image_index.shape[0], rows)
        index = image_index[rows]
        if average_repeats is None:
            average_repeats = split == "test"
        if average_repeats and index.size:
            order = np.argsort(index, kind="stable")
            uniq, starts, counts = np.unique(index[order], return_index=True, return_counts=True)
            sums = np.add.reduceat(voxels[order].astype(np.float64), starts, axis=0)
            voxels = (sums / counts[:, None]).astype(np.float32)
            index = uniq
        log.debug("%s %s %s: %d rows", self.root, subject, split, voxels.shape[0])
        return voxels, index.astype(np.int64)
