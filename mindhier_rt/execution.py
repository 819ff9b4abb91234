"""How the models compute, chosen in one place: which attention implementation, and whether the Switti block's
norm chains run as fused Triton kernels.

The models read the options in effect (``current()``) where they branch; callers set them for a block of code:

    with execution(attention="triton", fused_norms=True):   # the fast backend on CUDA
        logits = generator.blocks_step(...)
    with exporting():                                       # graph export: explicit attention, PyTorch norms
        torch.onnx.export(...)

``execution`` changes only the fields it is given and restores the previous options on exit. The options live in
a ``ContextVar``: they hold in the calling thread (and in tasks that copy its context), not process-wide, so two
threads can run the models differently at the same time. Outside any ``execution`` block the models run their
reference form, ``ExecutionOptions()``: SDPA attention and the PyTorch norm code.

Attention implementations (``models.attention.attention``):

- ``"sdpa"``: ``F.scaled_dot_product_attention`` with the dense boolean mask (fused CPU/GPU kernels).
- ``"math"``: the same math as plain ops (MatMul, scale, masked Softmax, MatMul). The exporters use it: the dynamo
  exporter's decomposition of SDPA wraps the key transpose in a Shape/Slice/Concat/Reshape chain per layer, while
  the explicit form is the pattern ONNX Runtime folds into one FusedMatMul and TensorRT fuses into its attention.
- ``"triton"``: the block-sparse kernel of ``mindhier_rt.kernels.scale_attention``, which reads only the key
  tiles the mask allows. It needs the mask as ranges (``RangeMask``) or no mask; a dense mask falls back to SDPA.

``fused_norms``: the block's sandwich RMSNorms with AdaLN modulation, the residual norm chains, SwiGLU's gate and
self-attention's q/k LayerNorm + rotation + cache write run as the kernels of ``mindhier_rt.kernels.fused_norm``;
off, they are the PyTorch functions of ``models.elementwise`` (the kernels' references, what the graphs contain).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, get_args

from mindhier_rt.errors import ConfigError

AttentionImpl = Literal["sdpa", "math", "triton"]
ATTENTION_IMPLS: tuple[str, ...] = get_args(AttentionImpl)


@dataclass(frozen=True)
class ExecutionOptions:
    """Which code paths the models take; validated on construction (ConfigError)."""

    attention: AttentionImpl = "sdpa"
    fused_norms: bool = False

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        if not isinstance(self.fused_norms, bool):
            raise ConfigError(f"fused_norms must be a bool, got {self.fused_norms!r}")


REFERENCE = ExecutionOptions()  # outside any execution block
_CURRENT: contextvars.ContextVar[ExecutionOptions] = contextvars.ContextVar(
    "mindhier_rt_execution",
    default=REFERENCE,
)


def current() -> ExecutionOptions:
    """The options in effect in this context."""
    return _CURRENT.get()


@contextlib.contextmanager
def execution(
    options: ExecutionOptions | None = None,
    *,
    attention: AttentionImpl | None = None,
    fused_norms: bool | None = None,
) -> Iterator[ExecutionOptions]:
    """Run the block with ``options`` (default: the current ones), with the fields given as keywords replaced;
    yields the options in effect. The previous options are restored on exit."""
    chosen = current() if options is None else options
    changes = {k: v for k, v in (("attention", attention), ("fused_norms", fused_norms)) if v is not None}
    token = _CURRENT.set(dataclasses.replace(chosen, **changes))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)


def exporting() -> contextlib.AbstractContextManager[ExecutionOptions]:
    """The options of graph export: explicit attention ops, the PyTorch norm code."""
    return execution(ExecutionOptions(attention="math", fused_norms=False))
