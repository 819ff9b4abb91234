"""The one attention entry point of the models, with a switch for how it is computed.

``attention(q, k, v, mask, scale)`` computes softmax(q k^T * scale, masked) v. How:

- ``"sdpa"`` (default): ``F.scaled_dot_product_attention`` with the dense boolean mask (fused CPU/GPU kernels).
- ``"math"``: the same math as plain ops (MatMul, scale, masked Softmax, MatMul). Graph exporters run the
  models in this mode (``explicit_attention()``): the dynamo exporter's decomposition of SDPA wraps the key
  transpose in a Shape/Slice/Concat/Reshape chain per layer, while the explicit form is the pattern ONNX Runtime
  folds into one FusedMatMul and TensorRT fuses into its attention kernels.
- ``"triton"``: the block-sparse kernel of ``mindhier_rt.kernels.scale_attention``, which reads only the key
  tiles the mask allows. It needs the mask as ranges (``RangeMask``) or no mask; a plain dense mask falls back
  to SDPA. The fast torch backend uses this mode on CUDA.

Shapes: q [..., l, c], k and v [..., S, c], a dense mask broadcastable to [l, S] with True = may attend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mindhier_rt.errors import ConfigError

AttentionMode = Literal["sdpa", "math", "triton"]
ATTENTION_MODES: tuple[str, ...] = ("sdpa", "math", "triton")
_MODE: AttentionMode = "sdpa"


@dataclass(frozen=True)
class RangeMask:
    """A scale mask in both forms: dense bool [Lq, Lk] and per-scale ranges (q0, q1, k0, k1) of allowed keys.

    Every mask of this model lets the queries of one scale see one contiguous run of keys
    (``Schedule.key_ranges``); the dense form serves SDPA and the exporters, the ranges the block-sparse kernel.
    """

    dense: Tensor
    ranges: tuple[tuple[int, int, int, int], ...]


@contextlib.contextmanager
def attention_mode(mode: AttentionMode) -> Iterator[None]:
    """Within this block, ``attention`` is computed the given way (see the module docstring)."""
    global _MODE
    if mode not in ATTENTION_MODES:
        raise ConfigError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")
    previous, _MODE = _MODE, mode
    try:
        yield
    finally:
        _MODE = previous


def explicit_attention() -> contextlib.AbstractContextManager[None]:
    """Attention as plain matmul / softmax ops, for graph export."""
    return attention_mode("math")


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
    if _MODE == "triton" and not isinstance(mask, Tensor):
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
    if _MODE == "math":
        return attention_math(q, k, v, dense, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale)
