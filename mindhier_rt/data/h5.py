"""HDF5 reading helpers shared by the data readers and the feature cache: one error vocabulary."""

from __future__ import annotations

from pathlib import Path

import h5py

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


def unreadable(path: Path, e: Exception) -> InputError:
    """The error for a file h5py could not read (raise it ``from e``)."""
    return InputError(f"{path}: expected a readable HDF5 file, found a truncated or corrupt file ({e})")
