"""What a batch of voxels must be before it is encoded: one check, used by the encoder and by the decode loop."""

from __future__ import annotations

from torch import Tensor

from mindhier_rt.errors import InputError


def check_voxels(voxels_BV: Tensor, subject: str, count: int, finite: bool = True) -> None:
    """InputError unless ``voxels_BV`` is a floating-point [batch, ``count``] tensor for ``subject`` and, with
    ``finite``, free of NaN and inf (a data-dependent check: a host sync on a GPU tensor)."""
    if voxels_BV.ndim != 2:
        raise InputError(
            f"subject {subject} expects voxels of shape [batch, {count}], got shape {tuple(voxels_BV.shape)}"
        )
    if voxels_BV.shape[1] != count:
        raise InputError(f"subject {subject} expects {count} voxels per scan, got {voxels_BV.shape[1]}")
    if not voxels_BV.is_floating_point():
        raise InputError(f"voxels must be floating point, got dtype {voxels_BV.dtype}")
    if not finite:
        return
    bad_rows = int((~voxels_BV.isfinite()).any(dim=1).sum())
    if bad_rows:
        raise InputError(
            f"{bad_rows} of {voxels_BV.shape[0]} voxel rows for subject {subject} contain NaN or inf values"
        )
