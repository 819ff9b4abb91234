"""Brain data: the seeded synthetic benchmark, our on-disk layout and the MindEye2 NSD files.

:func:`open_dataset` picks the reader from what a folder holds; both readers share one interface:
``subjects`` ({name: n_voxels}), ``split(subject, split, average_repeats) -> (voxels, image_index)``,
``images(index)``, ``captions()``, ``attributes()``, ``image_size``, ``n_images``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from mindhier_rt.data.mindeye2 import MindEye2Dataset, looks_like_mindeye2
from mindhier_rt.data.nsd import BrainDataset, synth_command_impl, write_dataset
from mindhier_rt.data.synthetic import (
    StimulusAttributes,
    SubjectModel,
    SyntheticSet,
    make_synthetic,
    render,
    sample_attributes,
)
from mindhier_rt.errors import InputError
from mindhier_rt.io import PathLike

__all__ = [
    "BrainDataset",
    "MindEye2Dataset",
    "StimulusAttributes",
    "SubjectModel",
    "SyntheticSet",
    "dataset_id",
    "make_synthetic",
    "open_dataset",
    "render",
    "sample_attributes",
    "synth_command_impl",
    "write_dataset",
]


def open_dataset(root: PathLike) -> BrainDataset | MindEye2Dataset:
    """The reader for ``root``: our layout (a ``dataset.json``) or the MindEye2 NSD files."""
    path = Path(root)
    if not path.is_dir():
        raise InputError(f"{path}: expected a data folder, found no such folder")
    if (path / "dataset.json").is_file():
        return BrainDataset(path)
    if looks_like_mindeye2(path):
        return MindEye2Dataset(path)
    raise InputError(
        f"{path}: expected dataset.json (the mindhier-rt layout, e.g. from `mindhier-rt synth`) or the MindEye2 "
        "NSD files (betas_all_subjXX_fp32_renorm.hdf5, coco_images_224_float16.hdf5, wds/), found neither"
    )


def dataset_id(data: BrainDataset | MindEye2Dataset) -> str:
    """A short id of a data set's stimuli and captions, so that cached teacher features are not reused across
    data sets that share image indices (e.g. two synthetic sets with different seeds)."""
    if isinstance(data, MindEye2Dataset):
        return data.fingerprint()
    h = hashlib.sha256()
    for name in ("dataset.json", "captions.json"):
        p = data.root / name
        h.update(p.read_bytes() if p.is_file() else b"-")
    stimuli = data.root / "stimuli.h5"
    h.update(str(stimuli.stat().st_size if stimuli.is_file() else -1).encode())
    return h.hexdigest()[:16]
