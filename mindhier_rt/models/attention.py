"""The one attention entry point of the models.

``attention(q, k, v, mask, scale)`` computes softmax(q k^T * scale, masked) v, the way the execution options in
effect say (``mindhier_rt.execution``: ``"sdpa"`` by default, ``"math"`` for graph export, ``"triton"`` for the
block-sparse kernel of ``mindhier_rt.kernels.scale_attention`` in the fast backend).

Shapes: q [..., l, c], k and v [..., S, c], a dense mask broadcastable to [l, S] with True = may attend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mindhier_rt.execution import current


@dataclass(frozen=True)
class RangeMask:
    """A scale mask in both forms: dense bool [Lq, Lk] and per-scale ranges (q0, q1, k0, k1) of allowed keys.

    Every mask of this model lets the queries of one scale see one contiguous run of keys
    (``Schedule.key_ranges``); the dense form serves SDPA and the exporters, the ranges the block-sparse kernel.
    """

    dense: Tensor
    ranges: tuple[tuple[int, int, int, int], ...]


def attention_math(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """Softmax(q k^T * scale, masked) v in the inputs' dtype (the exported form)."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v)


def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | RangeMask | None = None, scale: float | None = None
) -> Tensor:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    impl = current().attention
    if impl == "triton" and not isinstance(mask, Tensor):
        from mindhier_rt.kernels.scale_attention import scale_masked_attention

        B, H, Lq, c = q.shape
        ranges = mask.ranges if mask is not None else ((0, Lq, 0, k.shape[-2]),)
        out = None
        if sum(q1 - q0 for q0, q1, _, _ in ranges) == Lq:  # every query written: no zero fill needed
            # token-major [B, Lq, H, c] seen as [B, H, Lq, c]: the caller's transpose + reshape to [B, Lq, H * c]
            # is then a view, not a copy
            out = torch.empty(B, Lq, H, c, device=q.device, dtype=q.dtype).transpose(1, 2)
        return scale_masked_attention(q, k, v, ranges, scale, out)
    dense = mask.dense if isinstance(mask, RangeMask) else mask
    if impl == "math":
        return attention_math(q, k, v, dense, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale)
