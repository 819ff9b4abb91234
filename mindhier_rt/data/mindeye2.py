"""Reader for the NSD files as MindEye2 prepared them (read in place, nothing converted).

The layout the field uses (the ``pscotti/mindeyev2`` data set)::

    root/betas_all_subj0{s}_fp32_renorm.hdf5   dataset "betas": float32 [all trials of s, V_s], one row per
                                               trial, nsdgeneral voxels, already normalised per voxel
    root/coco_images_224_float16.hdf5          dataset "images": float16 [73000, 3, 224, 224] in [0, 1] (NCHW),
                                               row i = NSD image i (the 73k index, 0-based)
    root/COCO_73k_annots_curated.npy           unicode [73000, 5]: COCO captions, "" where an image has fewer
                                               (optional: only text targets need it)
    root/wds/subj0{s}/train/{0..n-1}.tar       webdataset shards (one per scan session) of the training trials
    root/wds/subj0{s}/new_test/0.tar           the test trials: the shared1000 images, up to 3 repeats each

A webdataset sample is a group of tar members ``<key>.<field>``; the reader uses the ``behav.npy`` field
(``past_behav.npy``, ``future_behav.npy`` and ``olds_behav.npy`` are ignored): a numeric array [1, 17] whose
column 0 is the 73k image index (0-based, -1 where undefined) and column 5 the trial's row in the betas file
(columns 16: shared1000 flag, 2/3/4: session/run/trial). The ``test`` folder (the split from before the last
sessions were released) is not read: ``new_test`` is the test split of MindEye2 and later work.

Training trials whose image also appears in the test split are dropped (with a log line), so the splits are
disjoint by image. Voxel counts are checked against the nsdgeneral counts of REFERENCE §2
(:data:`mindhier_rt.config.NSD_SUBJECTS`). Every problem raises :class:`~mindhier_rt.errors.InputError`
naming the file and what was expected.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np

from mindhier_rt.config import NSD_SUBJECTS
from mindhier_rt.data.h5 import H5_ERRORS, betas_dataset, h5_dataset, unreadable
from mindhier_rt.errors import InputError
from mindhier_rt.io import PathLike

log = logging.getLogger(__name__)

__all__ = [
    "BEHAV_BETAS_ROW",
    "BEHAV_COLUMNS",
    "BEHAV_IMAGE",
    "BEHAV_SHARED1000",
    "CAPTIONS_FILE",
    "IMAGES_FILE",
    "NSD_IMAGES",
    "WDS_SPLITS",
    "MindEye2Dataset",
    "average_repeats",
    "betas_file",
    "looks_like_mindeye2",
]

IMAGES_FILE = "coco_images_224_float16.hdf5"
CAPTIONS_FILE = "COCO_73k_annots_curated.npy"
NSD_IMAGES = 73000
BEHAV_COLUMNS = 17
BEHAV_IMAGE = 0  # the 73k image index, 0-based
BEHAV_BETAS_ROW = 5  # "global_trial": the trial's row in betas_all_subjXX
BEHAV_SHARED1000 = 16
WDS_SPLITS: dict[str, str] = {"train": "train", "test": "new_test"}  # our split name -> folder under wds/subjXX
_BETAS_RE = re.compile(r"^betas_all_(subj\d\d)_fp32_renorm\.hdf5$")
_READ_ROWS = 256  # rows per h5py read (fancy indexing wants increasing, unique rows)
_TAR_ERRORS = (OSError, EOFError, tarfile.TarError, ValueError)


def betas_file(subject: str) -> str:
    """The MindEye2 betas file name of a subject, e.g. ``betas_all_subj01_fp32_renorm.hdf5``."""
    return f"betas_all_{subject}_fp32_renorm.hdf5"


def looks_like_mindeye2(root: PathLike) -> bool:
    """True if ``root`` holds a MindEye2 betas file, the stimulus file or a ``wds`` folder."""
    root = Path(root)
    if (root / IMAGES_FILE).is_file() or (root / "wds").is_dir():
        return True
    return any(_BETAS_RE.match(p.name) for p in root.glob("betas_all_*.hdf5"))


def average_repeats(voxels: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average the rows that show the same image (float64 sums): rows sorted by image index."""
    if not index.size:
        return voxels, index
    order = np.argsort(index, kind="stable")
    uniq, starts, counts = np.unique(index[order], return_index=True, return_counts=True)
    sums = np.add.reduceat(voxels[order].astype(np.float64), starts, axis=0)
    return (sums / counts[:, None]).astype(np.float32), uniq.astype(np.int64)


def _shard_order(path: Path) -> tuple[int, str]:
    return (int(path.stem), path.name) if path.stem.isdigit() else (1 << 30, path.name)


def _check_tar_end(path: Path, end: int) -> None:
    """A complete tar ends in zero blocks; tarfile stops quietly at a header cut short, so check for them."""
    size = path.stat().st_size
    with path.open("rb") as f:
        f.seek(end)
        tail = f.read()
    if size - end < 512 or tail.count(0) != len(tail):
        raise InputError(
            f"{path}: expected a complete tar shard ending in zero blocks, found a truncated file "
            f"({size} bytes, members end at byte {end})"
        )


class MindEye2Dataset:
    """The MindEye2 NSD files under ``root``; the same interface as :class:`~mindhier_rt.data.nsd.BrainDataset`.

    ``subjects`` maps each NSD subject whose betas file is present to its nsdgeneral voxel count (checked when
    the file is read). ``image_size`` and ``n_images`` come from the stimulus file's header.
    """

    kind = "mindeye2"

    def __init__(self, root: PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"{self.root}: expected a MindEye2 data folder, found no such folder")
        expected = dict(NSD_SUBJECTS)
        found = sorted(m.group(1) for p in self.root.glob("betas_all_*.hdf5") if (m := _BETAS_RE.match(p.name)))
        unknown = [s for s in found if s not in expected]
        if unknown:
            log.warning("%s: ignoring betas of subjects outside NSD's subj01..subj08: %s", self.root, unknown)
        self.subjects: dict[str, int] = {s: expected[s] for s in found if s in expected}
        if not self.subjects:
            raise InputError(
                f"{self.root}: expected at least one betas file such as {betas_file('subj01')}, found none"
            )
        self._tables: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        log.debug("opened MindEye2 data %s: subjects %s", self.root, list(self.subjects))

    def __repr__(self) -> str:
        return f"MindEye2Dataset({str(self.root)!r}, subjects={list(self.subjects)})"

    # ---- stimuli

    @cached_property
    def _image_header(self) -> tuple[int, int, np.dtype]:
        path = self.root / IMAGES_FILE
        if not path.is_file():
            raise InputError(f"{path}: expected the NSD stimulus file, found no such file")
        try:
            with h5py.File(path, "r") as f:
                dset = h5_dataset(f, path, "images")
                shape, dtype = dset.shape, dset.dtype
        except H5_ERRORS as e:
            raise unreadable(path, e) from e
        if len(shape) != 4 or shape[1] != 3 or shape[2] != shape[3] or shape[0] < 1:
            raise InputError(f"{path}: expected 'images' of shape [N, 3, S, S], found {shape}")
        if not np.issubdtype(dtype, np.floating):
            raise InputError(f"{path}: expected float images in [0, 1], found dtype {dtype}")
        return int(shape[0]), int(shape[2]), dtype

    @property
    def n_images(self) -> int:
        return self._image_header[0]

    @property
    def image_size(self) -> int:
        return self._image_header[1]

    def images(self, index: np.ndarray | None = None) -> np.ndarray:
        """Stimuli float32 [n, 3, S, S] in [0, 1]: all of them (73k x 600 KB: mind the memory), or ``index``."""
        path = self.root / IMAGES_FILE
        n, s, _ = self._image_header
        idx = np.arange(n) if index is None else np.asarray(index)
        if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
            raise InputError(f"expected a 1-D integer image index, found shape {idx.shape} dtype {idx.dtype}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise InputError(f"{path}: expected image indices in [0, {n}), found [{idx.min()}, {idx.max()}]")
        out = np.empty((idx.size, 3, s, s), dtype=np.float32)
        uniq, inverse = np.unique(idx, return_inverse=True)
        inverse = inverse.reshape(-1)
        try:
            with h5py.File(path, "r") as f:
                dset = f["images"]
                for start in range(0, uniq.size, _READ_ROWS):
                    rows = uniq[start : start + _READ_ROWS]
                    block = np.asarray(dset[rows], dtype=np.float32)
                    # scatter the block to every output position that asked for one of its rows
                    where = (inverse >= start) & (inverse < start + rows.size)
                    out[where] = block[inverse[where] - start]
        except H5_ERRORS as e:
            raise unreadable(path, e) from e
        if not np.isfinite(out).all():
            raise InputError(f"{path}: expected finite pixel values, found NaN or inf")
        return out

    def captions(self) -> list[str]:
        """One caption per image: the first non-empty of its curated COCO captions ("" if it has none)."""
        path = self.root / CAPTIONS_FILE
        if not path.is_file():
            raise InputError(f"{path}: expected the COCO caption table, found no such file")
        try:
            annots = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise InputError(
                f"{path}: expected a .npy array of strings [N, 5] (no pickled objects), found an unreadable file ({e})"
            ) from e
        if annots.ndim == 1:
            annots = annots[:, None]
        if annots.ndim != 2 or annots.dtype.kind not in "US":
            raise InputError(f"{path}: expected strings of shape [N, 5], found {annots.dtype} {annots.shape}")
        if annots.shape[0] != self.n_images:
            raise InputError(f"{path}: expected captions for {self.n_images} images, found {annots.shape[0]}")
        if annots.dtype.kind == "S":
            annots = np.char.decode(annots, "utf-8")
        caps = []
        for row in annots:
            texts = [str(c).strip() for c in row]
            caps.append(next((c for c in texts if c), ""))
        return caps

    def attributes(self) -> None:
        """Stimulus attributes exist for synthetic data only."""
        return None

    def fingerprint(self) -> str:
        """A short id of the stimuli and captions (file sizes and headers): keys cached teacher features."""
        files = {}
        for name in (IMAGES_FILE, CAPTIONS_FILE):
            p = self.root / name
            files[name] = p.stat().st_size if p.is_file() else None
        n, s, dtype = self._image_header
        desc = {"kind": self.kind, "n_images": n, "image_size": s, "dtype": str(dtype), "files": files}
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]

    # ---- trials

    def _check_subject(self, subject: str) -> int:
        if subject not in self.subjects:
            known = ", ".join(self.subjects)
            hint = f" ({betas_file(subject)} is not in {self.root})" if subject in dict(NSD_SUBJECTS) else ""
            raise InputError(f"{self.root}: expected a subject among {known}, found {subject!r}{hint}")
        return self.subjects[subject]

    def _read_behav(self, subject: str, folder: str) -> tuple[np.ndarray, np.ndarray]:
        """(betas rows, image indices) of every trial in ``wds/<subject>/<folder>/*.tar``, sorted by row."""
        key = (subject, folder)
        if key in self._tables:
            return self._tables[key]
        wds = self.root / "wds" / subject / folder
        shards = sorted(wds.glob("*.tar"), key=_shard_order) if wds.is_dir() else []
        if not shards:
            raise InputError(f"{wds}: expected the webdataset shards (*.tar) of {subject}, found none")
        rows: list[int] = []
        images: list[int] = []
        for shard in shards:
            try:
                with tarfile.open(shard, "r") as tar:
                    for member in tar:
                        name = member.name.rsplit("/", 1)[-1]
                        if not member.isfile() or name.partition(".")[2] != "behav.npy":
                            continue
                        fobj = tar.extractfile(member)
                        assert fobj is not None  # a regular file
                        arr = np.load(io.BytesIO(fobj.read()), allow_pickle=False)
                        if not (np.issubdtype(arr.dtype, np.number) and arr.size == BEHAV_COLUMNS and arr.ndim <= 2):
                            raise InputError(
                                f"{shard}: {member.name}: expected a numeric behaviour array [1, {BEHAV_COLUMNS}], "
                                f"found {arr.dtype} {arr.shape}"
                            )
                        flat = arr.reshape(-1)
                        images.append(int(flat[BEHAV_IMAGE]))
                        rows.append(int(flat[BEHAV_BETAS_ROW]))
                    end = tar.offset  # where iteration stopped: the end-of-archive zero blocks, if complete
                _check_tar_end(shard, end)
            except _TAR_ERRORS as e:
                raise InputError(
                    f"{shard}: expected a readable tar shard, found a truncated or corrupt file ({e})"
                ) from e
        if not rows:
            raise InputError(f"{wds}: expected samples with a behav.npy member in {len(shards)} shard(s), found none")
        row_a, img_a = np.asarray(rows, dtype=np.int64), np.asarray(images, dtype=np.int64)
        bad = (row_a < 0) | (img_a < 0)
        if bad.any():
            raise InputError(
                f"{wds}: expected image indices and betas rows >= 0 in every behav.npy, found {int(bad.sum())} "
                "trials with -1 (undefined)"
            )
        limit = self.n_images if (self.root / IMAGES_FILE).is_file() else NSD_IMAGES
        if img_a.max() >= limit:
            raise InputError(f"{wds}: expected image indices in [0, {limit}), found up to {img_a.max()}")
        order = np.argsort(row_a, kind="stable")
        row_a, img_a = row_a[order], img_a[order]
        dup = np.flatnonzero(row_a[1:] == row_a[:-1])
        if dup.size:
            clash = img_a[dup] != img_a[dup + 1]
            if clash.any():
                r = int(row_a[dup[clash][0]])
                raise InputError(f"{wds}: expected one image per betas row, found row {r} with two different images")
            keep = np.ones(row_a.size, dtype=bool)
            keep[dup + 1] = False
            row_a, img_a = row_a[keep], img_a[keep]
        self._tables[key] = (row_a, img_a)
        log.debug("%s: %d trials of %s in %d shards", wds, row_a.size, subject, len(shards))
        return row_a, img_a

    def trials(self, subject: str, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(betas rows, image indices) int64 [n] of one subject's ``"train"`` or ``"test"`` trials, by row."""
        if split not in WDS_SPLITS:
            raise InputError(f"expected split 'train' or 'test', found {split!r}")
        self._check_subject(subject)
        rows, images = self._read_behav(subject, WDS_SPLITS[split])
        if split == "train" and (self.root / "wds" / subject / WDS_SPLITS["test"]).is_dir():
            _, test_images = self._read_behav(subject, WDS_SPLITS["test"])
            overlap = np.isin(images, test_images)
            if overlap.any():
                log.warning(
                    "%s %s: dropping %d training trials whose image is in the test split",
                    self.root, subject, int(overlap.sum()),
                )  # fmt: skip
                rows, images = rows[~overlap], images[~overlap]
        return rows, images

    def _betas(self, subject: str, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (sorted, unique) of the subject's betas, float32 [n, V]."""
        path = self.root / betas_file(subject)
        n_vox = self.subjects[subject]
        out = np.empty((rows.size, n_vox), dtype=np.float32)
        try:
            with h5py.File(path, "r") as f:
                dset = betas_dataset(f, path, n_vox, f"nsdgeneral voxels per trial for {subject}")
                if rows.size and rows[-1] >= dset.shape[0]:
                    raise InputError(
                        f"{path}: the trial tables of {subject} refer to betas row {rows[-1]}, found only "
                        f"{dset.shape[0]} rows"
                    )
                for start in range(0, rows.size, _READ_ROWS):
                    out[start : start + _READ_ROWS] = dset[rows[start : start + _READ_ROWS]]
        except H5_ERRORS as e:
            raise unreadable(path, e) from e
        bad = ~np.isfinite(out).all(axis=1)
        if bad.any():
            raise InputError(f"{path}: expected finite betas, found {int(bad.sum())} trials with NaN or inf values")
        return out

    def split(self, subject: str, split: str, average_repeats: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Voxels float32 [n, V] and image indices int64 [n] of one subject's ``"train"`` or ``"test"`` trials.

        With ``average_repeats`` (default: True for test, False for train) the repeats of each image are
        averaged into one row, rows sorted by image index; otherwise single trials in scan order.
        """
        rows, images = self.trials(subject, split)
        voxels = self._betas(subject, rows)
        if average_repeats is None:
            average_repeats = split == "test"
        if average_repeats:
            return _average(voxels, images)
        return voxels, images


_average = average_repeats  # `split` has a parameter of the same name
