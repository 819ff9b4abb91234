"""The Switti block's elementwise math as plain PyTorch functions: RMSNorm, AdaLN modulation, the residual norm
chain, q/k LayerNorm and the 2D rotary rotation.

This is what eager decoding and the exported graphs run, and the reference that the fused Triton kernels of
``mindhier_rt.kernels.fused_norm`` are held to: both the blocks (``models.blocks``) and the kernels import it,
and it imports neither. Axis legend as in ``models.blocks``: B batch, l tokens, C width, H heads, c head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x^2) + eps) * weight in float32, returned in x's dtype.

    Written this way because the exported pattern (Pow, ReduceMean, Add, Sqrt, Div, Mul) is the one ONNX
    Runtime fuses into a single SimplifiedLayerNormalization kernel.
    """
    x32 = x.float()
    y = x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def rms_norm_modulate_eager(
    x_BlC: Tensor, weight_C: Tensor, eps: float, scale_B1C: Tensor | None = None, shift_B1C: Tensor | None = None
) -> Tensor:
    """RMSNorm(x) * weight, then * (1 + scale) + shift when given (AdaLN): the PyTorch form, which the exported
    graphs contain and ``kernels.fused_norm.rms_norm_modulate`` (same signature) is held to."""
    y_BlC = rms_norm(x_BlC, weight_C, eps)
    return y_BlC if scale_B1C is None else y_BlC * (1 + scale_B1C) + shift_B1C


def residual_rms_norm_eager(
    x_BlC: Tensor,
    h_BlC: Tensor,
    weight_C: Tensor,
    eps: float,
    gate_B1C: Tensor | None = None,
    next_weight_C: Tensor | None = None,
    next_eps: float | None = None,
    next_scale_B1C: Tensor | None = None,
    next_shift_B1C: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """x' = x + RMSNorm(h) * weight [* gate], and ``rms_norm_modulate_eager(x', next_weight, ...)`` when
    ``next_weight_C`` is given: the PyTorch form of ``kernels.fused_norm.residual_rms_norm`` (same signature)."""
    y_BlC = rms_norm(h_BlC, weight_C, eps)
    x_BlC = x_BlC + (y_BlC if gate_B1C is None else y_BlC * gate_B1C)
    if next_weight_C is None:
        return x_BlC, None
    return x_BlC, rms_norm_modulate_eager(x_BlC, next_weight_C, next_eps, next_scale_B1C, next_shift_B1C)


def layer_norm_no_affine(x: Tensor, width: int, eps: float) -> Tensor:
    """LayerNorm over the last axis without gain or bias (``width`` is passed so tracers see a constant)."""
    return F.layer_norm(x, (width,), eps=eps)


def qk_heads(qkv_Bl3C: Tensor, cos_lc: Tensor, sin_lc: Tensor, heads: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Self-attention's q, k, v [B, H, l, c] from the fused projection viewed [B, l, 3, C]: non-affine LayerNorm
    of q and k over the full width, the rotation (``apply_rope``), heads split. The PyTorch form of
    ``kernels.fused_norm.qk_norm_rope`` (which also writes k and v into the cache)."""
    B, l, _, C = qkv_Bl3C.shape
    c = C // heads
    # q and k share the LayerNorm (per row) and the rotation: one op each for both.
    qk_Bl2C = layer_norm_no_affine(qkv_Bl3C[:, :, :2], C, eps)
    qk_Bl2Hc = apply_rope(qk_Bl2C.view(B, l, 2, heads, c), cos_lc[:, None, None], sin_lc[:, None, None])
    q, k = qk_Bl2Hc.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, l, c] each
    v = qkv_Bl3C[:, :, 2].view(B, l, heads, c).transpose(1, 2)
    return q, k, v


def apply_rope(x: Tensor, cos_c: Tensor, sin_c: Tensor) -> Tensor:
    """Rotate adjacent pairs (x[2j], x[2j+1]) of the last axis by the tables of ``rope_tables``.

    out[2j] = x[2j] cos - x[2j+1] sin, out[2j+1] = x[2j+1] cos + x[2j] sin: the pair-swapped x times the
    signed sin table. The tables broadcast against x (the caller lines up the token axis).
    """
    even, odd = x.unflatten(-1, (-1, 2)).split(1, dim=-1)
    swapped = torch.cat((odd, even), dim=-1).flatten(-2)  # Split + Concat: far cheaper in ONNX Runtime than a flip
    return (x * cos_c + swapped * sin_c).type_as(x)
