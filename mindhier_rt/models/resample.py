"""Per-scale resampling of VQ latents as fixed, separable linear maps.

``F.interpolate(mode="area")`` to a size that does not divide the input (16 -> 13, say) has no ONNX
export, and bicubic resizing exports with backend-specific rounding. Both are linear along each axis,
so here each one becomes a small matrix ``M [n_out, n_in]`` and a 2D resize of ``x [B, E, h, w]`` is
``M_h @ x @ M_w^T``. The matrices reproduce PyTorch's results (to float rounding); they are built once
on the CPU and cached, and so are their copies on other devices (a resize on a GPU then copies nothing from
the host, which is also what lets a CUDA graph replay it).

Axis letters: B batch, E latent channels, h/w input grid sides, H/W output grid sides.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["area_matrix", "bicubic_matrix", "resample", "resize_area", "resize_bicubic"]


def _check_sizes(n_in: int, n_out: int) -> None:
    assert n_in >= 1 and n_out >= 1, f"resample sizes must be positive, got {n_in} -> {n_out}"


@lru_cache(maxsize=256)
def area_matrix(n_in: int, n_out: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """CPU ``[n_out, n_in]``: ``F.interpolate(mode="area")`` (adaptive average pooling) on one axis.

    Output ``i`` averages inputs ``[floor(i * n_in / n_out), ceil((i + 1) * n_in / n_out))``.
    The returned tensor is shared by all callers: do not modify it in place.
    """
    _check_sizes(n_in, n_out)
    with torch.inference_mode(False), torch.no_grad():
        mat_oi = torch.zeros(n_out, n_in, dtype=torch.float64, device="cpu")
        for i in range(n_out):
            start = (i * n_in) // n_out
            end = -((-(i + 1) * n_in) // n_out)  # ceil division
            mat_oi[i, start:end] = 1.0 / (end - start)
        return mat_oi.to(dtype)


@lru_cache(maxsize=256)
def bicubic_matrix(n_in: int, n_out: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """CPU ``[n_out, n_in]``: ``F.interpolate(mode="bicubic", align_corners=False)`` on one axis.

    Built by resizing the identity basis: ``n_in`` images of size ``[n_in, 1]`` go to ``[n_out, 1]``;
    bicubic 1 -> 1 along the second axis is the identity, so each output column is one matrix column.
    The basis is resized in ``dtype`` because PyTorch computes the cubic weights in the input's precision
    (float32 for float32/half/bfloat16 inputs): use float32 to match a float32 ``F.interpolate`` exactly.
    The returned tensor is shared by all callers: do not modify it in place.
    """
    _check_sizes(n_in, n_out)
    with torch.inference_mode(False), torch.no_grad():
        basis_NChw = torch.eye(n_in, dtype=dtype, device="cpu").reshape(n_in, 1, n_in, 1)
        out_NCHw = F.interpolate(basis_NChw, size=(n_out, 1), mode="bicubic", align_corners=False)
        return out_NCHw.reshape(n_in, n_out).t().contiguous()


def resample(x_BEhw: Tensor, mat_Hh: Tensor, mat_Ww: Tensor) -> Tensor:
    """Separable linear resize: ``out = M_h @ x @ M_w^T`` over the last two axes.

    ``mat_Hh`` is ``[H_out, h_in]`` and ``mat_Ww`` is ``[W_out, w_in]`` (as built by ``area_matrix`` /
    ``bicubic_matrix``); they are cast to ``x``'s device and dtype here (a no-op when they already match).
    """
    assert x_BEhw.shape[-2] == mat_Hh.shape[1] and x_BEhw.shape[-1] == mat_Ww.shape[1], (
        f"resample: input {tuple(x_BEhw.shape[-2:])} vs matrices {tuple(mat_Hh.shape)}, {tuple(mat_Ww.shape)}"
    )
    mat_Hh = _on_device(mat_Hh, x_BEhw.device).to(dtype=x_BEhw.dtype)
    mat_Ww = _on_device(mat_Ww, x_BEhw.device).to(dtype=x_BEhw.dtype)
    # two broadcast matmuls rather than an einsum: exports to plain MatMul nodes that every runtime takes
    return mat_Hh @ x_BEhw @ mat_Ww.transpose(0, 1)


def _on_device(mat: Tensor, device: torch.device) -> Tensor:
    """``mat`` on ``device``: CPU matrices as they are, copies on other devices cached per matrix."""
    if mat.device == device or device.type == "cpu":
        return mat.to(device)
    return _device_copy(mat, device)


@lru_cache(maxsize=512)
def _device_copy(mat: Tensor, device: torch.device) -> Tensor:
    # keyed by the CPU matrix object, which area_matrix / bicubic_matrix cache and share
    return mat.to(device)


def _matrix_dtype(x: Tensor) -> torch.dtype:
    """Precision in which PyTorch itself would compute the resize weights for ``x``."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _size2(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize_area(x_BEhw: Tensor, size: int | tuple[int, int]) -> Tensor:
    """``F.interpolate(x, size, mode="area")`` through cached matrices (identity sizes pass through)."""
    out_h, out_w = _size2(size)
    in_h, in_w = x_BEhw.shape[-2], x_BEhw.shape[-1]
    if (in_h, in_w) == (out_h, out_w):
        return x_BEhw
    dt = _matrix_dtype(x_BEhw)
    return resample(x_BEhw, area_matrix(in_h, out_h, dt), area_matrix(in_w, out_w, dt))


def resize_bicubic(x_BEhw: Tensor, size: int | tuple[int, int]) -> Tensor:
    """``F.interpolate(x, size, mode="bicubic", align_corners=False)`` through cached matrices."""
    out_h, out_w = _size2(size)
    in_h, in_w = x_BEhw.shape[-2], x_BEhw.shape[-1]
    if (in_h, in_w) == (out_h, out_w):
        return x_BEhw
    dt = _matrix_dtype(x_BEhw)
    return resample(x_BEhw, bicubic_matrix(in_h, out_h, dt), bicubic_matrix(in_w, out_w, dt))
