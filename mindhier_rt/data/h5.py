"""HDF5 reading helpers shared by the data readers and the feature cache: one error vocabulary."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from mindhier_rt.errors import InputError

# what h5py raises on a truncated, corrupt or foreign file (the readers turn these into InputError)
H5_ERRORS = (OSError, KeyError, ValueError, RuntimeError, TypeError)


def h5_dataset(f: h5py.File, path: Path, name: str) -> h5py.Dataset:
    """Dataset ``name`` of an open file, or an InputError naming what the file holds instead."""
    obj = f.get(name)
    if not isinstance(obj, h5py.Dataset):
        found = ", ".join(f.keys()) or "nothing"
        raise InputError(f"{path}: expected an HDF5 dataset {name!r}, found {found}")
    return obj


def betas_dataset(f: h5py.File, path: Path, voxels: int, voxels_from: str) -> h5py.Dataset:
    """The float ``betas`` [trials, voxels] dataset of an open file, or an InputError saying what is wrong.

    ``voxels_from`` names where the expected voxel count comes from, for the error message.
    """
    dset = h5_dataset(f, path, "betas")
    if dset.ndim != 2 or not np.issubdtype(dset.dtype, np.floating):
        raise InputError(f"{path}: expected float betas [trials, voxels], found {dset.dtype} {dset.shape}")
    if dset.shape[1] != voxels:
        raise InputError(f"{path}: expected {voxels} {voxels_from}, found {dset.shape[1]}")
    return dset


def unreadable(path: Path, e: Exception) -> InputError:
    """The error for a file h5py could not read (raise it ``from e``)."""
    return InputError(f"{path}: expected a readable HDF5 file, found a truncated or corrupt file ({e})")
