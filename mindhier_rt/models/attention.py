"""The one attention entry point of the models, with a switch for how it is computed.

``attention(q, k, v, mask, scale)`` is ``F.scaled_dot_product_attention`` in eager PyTorch (fused CPU and
GPU kernels). Graph exporters call the models under ``explicit_attention()``, which writes the same math
as plain ops (MatMul, scale, masked Softmax, MatMul): the dynamo exporter's decomposition of SDPA wraps
the key transpose in a Shape/Slice/Concat/Reshape chain per layer, while the explicit form is the
pattern ONNX Runtime folds into one FusedMatMul and TensorRT fuses into its attention kernels.

Shapes: q [..., l, c], k and v [..., S, c], mask broadcastable to [..., l, S] with True = may attend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

_EXPLICIT = False


@contextlib.contextmanager
def explicit_attention() -> Iterator[None]:
    """Within this block, ``attention`` is written as plain matmul / softmax ops (for graph export)."""
    global _EXPLICIT
    previous, _EXPLICIT = _EXPLICIT, True
    try:
        yield
    finally:
        _EXPLICIT = previous


def attention_math(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """Softmax(q k^T * scale, masked) v, accumulated in the inputs' dtype (the exported form)."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if _EXPLICIT:
        return attention_math(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
