"""Fused RMSNorm chains of the Switti block in Triton, with PyTorch references of the same signatures.

A Switti block (``models.blocks.SwittiBlock``) wraps each of its three sub-layers in sandwich RMSNorms and
AdaLN modulation. Written as PyTorch ops, one block is about 70 small elementwise kernels in half precision
(each RMSNorm alone is a float32 cast, square, mean, add, sqrt, divide, gain cast, multiply and cast back); on
an H200 those kernels, not the GEMMs, bound the small scales of the fast backend
(``benchmarks/results/gpu_h200/README.md``). The block's elementwise work between its matmuls is four row-wise
chains plus SwiGLU's gate, five kernels here:

    rms_norm_modulate(x, w, eps, scale, shift)      RMSNorm(x) * w * (1 + scale) + shift   (before self-attn)
    residual_rms_norm(x, h, w, eps, gate,           x' = x + RMSNorm(h) * w * gate         (after a sub-layer)
                      next_w, next_eps,             and, from the same row of x',
                      next_scale, next_shift)       RMSNorm(x') * next_w [* (1 + next_scale) + next_shift]
    silu_mul(a, b)                                  silu(a) * b                             (SwiGLU)

``scale``, ``shift`` and ``gate`` are per batch row, [B, 1, C] (AdaLN vectors); x and h are [B, l, C]. The
``*_ref`` functions compute the same results with the model's own PyTorch code (``models.blocks.rms_norm``),
which is what the block runs when fusion is off; ``models.blocks.fused_norms`` switches the block to these
kernels, as the fast backend does on CUDA.

Numerics: the kernels compute in float32 and round once to the input dtype at each output. The references
round the way the eager model does (the RMSNorm output is cast back to the input dtype before modulation),
so in float32 the two agree to float32 rounding (different summation order), and in bfloat16/float16 the
kernels are the more accurate of the two (tests: ``tests/test_kernels.py``).

Backends as in ``scale_attention``: CUDA tensors run compiled kernels; CPU tensors run only under Triton's
interpreter (``TRITON_INTERPRET=1`` before import), in float32. Without Triton the references still work and
the kernels raise ``BackendError``. Inference only: no backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mindhier_rt.errors import BackendError, ConfigError

try:
    import triton
    import triton.language as tl
except ImportError as _triton_import_error:
    triton = None
    tl = None
    HAS_TRITON = False
    _TRITON_MISSING = f"{type(_triton_import_error).__name__}: {_triton_import_error}"
else:
    HAS_TRITON = True
    _TRITON_MISSING = ""

MAX_WIDTH = 16384  # one program holds a whole row in registers

if HAS_TRITON:

    @triton.jit
    def _norm_chain_kernel(
        H,  # [R, C] rows to normalise (the sub-layer output, or x itself when there is no residual)
        X,  # [R, C] residual stream (read when HAS_RES)
        W1,  # [C] gain of the first norm
        GATE,  # [B, C] gate of the first norm's output (HAS_GATE)
        W2,  # [C] gain of the second norm (HAS_NEXT)
        SCALE,  # [B, C] AdaLN scale of the modulated output (HAS_MOD)
        SHIFT,  # [B, C] AdaLN shift of the modulated output (HAS_MOD)
        OUT_X,  # [R, C] x + norm1(h) * gate (HAS_RES)
        OUT_N,  # [R, C] the normalised (and modulated) output
        n_cols,
        tokens,  # rows per batch entry: AdaLN vectors are indexed by row // tokens
        stride_h,
        stride_x,
        stride_ox,
        stride_on,
        stride_gate,
        stride_scale,
        stride_shift,
        eps1,
        eps2,
        HAS_RES: tl.constexpr,
        HAS_GATE: tl.constexpr,
        HAS_NEXT: tl.constexpr,
        HAS_MOD: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        row = tl.program_id(0)
        b = row // tokens
        cols = tl.arange(0, BLOCK_C)
        valid = cols < n_cols
        h = tl.load(H + row * stride_h + cols, mask=valid, other=0.0).to(tl.float32)
        w1 = tl.load(W1 + cols, mask=valid, other=0.0).to(tl.float32)
        y = h / tl.sqrt(tl.sum(h * h, axis=0) / n_cols + eps1) * w1
        if HAS_GATE:
            y = y * tl.load(GATE + b * stride_gate + cols, mask=valid, other=0.0).to(tl.float32)
        if HAS_RES:
            y = tl.load(X + row * stride_x + cols, mask=valid, other=0.0).to(tl.float32) + y
            tl.store(OUT_X + row * stride_ox + cols, y.to(OUT_X.dtype.element_ty), mask=valid)
        if HAS_NEXT:
            # the next norm reads x' as stored (rounded to the stream's dtype), as the unfused block would
            y = y.to(OUT_X.dtype.element_ty).to(tl.float32)
            w2 = tl.load(W2 + cols, mask=valid, other=0.0).to(tl.float32)
            y = y / tl.sqrt(tl.sum(y * y, axis=0) / n_cols + eps2) * w2
        if HAS_MOD:
            scale = tl.load(SCALE + b * stride_scale + cols, mask=valid, other=0.0).to(tl.float32)
            shift = tl.load(SHIFT + b * stride_shift + cols, mask=valid, other=0.0).to(tl.float32)
            y = y * (1.0 + scale) + shift
        if HAS_NEXT or not HAS_RES:
            tl.store(OUT_N + row * stride_on + cols, y.to(OUT_N.dtype.element_ty), mask=valid)

    @triton.jit
    def _silu_mul_kernel(A, B, OUT, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n
        a = tl.load(A + offs, mask=valid, other=0.0).to(tl.float32)
        b = tl.load(B + offs, mask=valid, other=0.0).to(tl.float32)
        out = a / (1.0 + tl.exp(-a)) * b
        tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=valid)

    _INTERPRETED = bool(triton.knobs.runtime.interpret)
else:
    _INTERPRETED = False


# ---- references: the model's own arithmetic --------------------------------------------------------------
def rms_norm_modulate_ref(
    x_BlC: Tensor, weight_C: Tensor, eps: float, scale_B1C: Tensor | None = None, shift_B1C: Tensor | None = None
) -> Tensor:
    from mindhier_rt.models.blocks import rms_norm

    y = rms_norm(x_BlC, weight_C, eps)
    return y if scale_B1C is None else y * (1 + scale_B1C) + shift_B1C


def residual_rms_norm_ref(
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
    from mindhier_rt.models.blocks import rms_norm

    y = rms_norm(h_BlC, weight_C, eps)
    x_BlC = x_BlC + (y if gate_B1C is None else y * gate_B1C)
    if next_weight_C is None:
        return x_BlC, None
    return x_BlC, rms_norm_modulate_ref(x_BlC, next_weight_C, next_eps, next_scale_B1C, next_shift_B1C)


def silu_mul_ref(a: Tensor, b: Tensor) -> Tensor:
    return F.silu(a) * b


# ---- kernels -------------------------------------------------------------------------------------------
def _check_backend(t: Tensor, rows: bool = True) -> None:
    if rows and t.dim() != 3:
        raise ConfigError(f"the norm kernels take [B, l, C] tensors, got shape {tuple(t.shape)}")
    if not HAS_TRITON:
        raise BackendError(f"the fused-norm kernels need Triton (pip install triton): {_TRITON_MISSING}")
    if t.is_cuda:
        return
    if t.device.type != "cpu" or not _INTERPRETED:
        raise BackendError(
            f"Triton needs a CUDA GPU or TRITON_INTERPRET=1 (set before importing {__name__}); "
            f"got tensors on {t.device} with the interpreter {'on' if _INTERPRETED else 'off'}"
        )
    if t.dtype != torch.float32:
        raise BackendError(f"Triton's CPU interpreter runs float32 only, got {t.dtype}")


def _rows(t: Tensor, name: str, width: int) -> Tensor:
    """[B, l, C] with unit stride along C as [B * l, C] (a view where possible)."""
    if t.dim() != 3 or t.shape[-1] != width:
        raise ConfigError(f"{name} must be [B, l, {width}], got shape {tuple(t.shape)}")
    rows = t.reshape(-1, width)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _per_batch(t: Tensor | None, name: str, batch: int, width: int) -> Tensor | None:
    """[B, 1, C] AdaLN vector as a [B, C] view (any row stride, e.g. a slice of [B, 6, C]), unit stride along C."""
    if t is None:
        return None
    if tuple(t.shape) != (batch, 1, width):
        raise ConfigError(f"{name} must be [{batch}, 1, {width}], got shape {tuple(t.shape)}")
    t = t[:, 0]
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_chain(
    h_RC: Tensor,
    x_RC: Tensor | None,
    w1: Tensor,
    eps1: float,
    gate: Tensor | None,
    w2: Tensor | None,
    eps2: float,
    scale: Tensor | None,
    shift: Tensor | None,
    out_x: Tensor | None,
    out_n: Tensor | None,
    tokens: int,
) -> None:
    R, C = h_RC.shape
    if C > MAX_WIDTH:
        raise ConfigError(f"the fused-norm kernels hold a row in registers: width {C} > {MAX_WIDTH}")
    if R == 0:
        return
    block_c = triton.next_power_of_2(C)
    dummy = h_RC  # pointer for the operands a specialisation never reads
    _norm_chain_kernel[(R,)](
        h_RC,
        dummy if x_RC is None else x_RC,
        w1,
        dummy if gate is None else gate,
        dummy if w2 is None else w2,
        dummy if scale is None else scale,
        dummy if shift is None else shift,
        dummy if out_x is None else out_x,
        dummy if out_n is None else out_n,
        C,
        tokens,
        h_RC.stride(0),
        0 if x_RC is None else x_RC.stride(0),
        0 if out_x is None else out_x.stride(0),
        0 if out_n is None else out_n.stride(0),
        *(0 if t is None else t.stride(0) for t in (gate, scale, shift)),
        float(eps1),
        float(eps2),
        HAS_RES=x_RC is not None,
        HAS_GATE=gate is not None,
        HAS_NEXT=w2 is not None,
        HAS_MOD=scale is not None,
        BLOCK_C=block_c,
        num_warps=4 if block_c <= 1024 else 8,
    )


def rms_norm_modulate(
    x_BlC: Tensor, weight_C: Tensor, eps: float, scale_B1C: Tensor | None = None, shift_B1C: Tensor | None = None
) -> Tensor:
    """RMSNorm(x) * weight, then * (1 + scale) + shift when given: one kernel. Same signature as the ref."""
    _check_backend(x_BlC)
    if (scale_B1C is None) != (shift_B1C is None):
        raise ConfigError("scale and shift come together")
    B, l, C = x_BlC.shape
    x_RC = _rows(x_BlC, "x", C)
    out = torch.empty(B, l, C, device=x_BlC.device, dtype=x_BlC.dtype)
    scale, shift = _per_batch(scale_B1C, "scale", B, C), _per_batch(shift_B1C, "shift", B, C)
    _launch_chain(x_RC, None, weight_C, eps, None, None, 0.0, scale, shift, None, out.view(-1, C), l)
    return out


def residual_rms_norm(
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
    """x + RMSNorm(h) * weight [* gate], and the next sub-layer's normalised input from it: one kernel."""
    _check_backend(x_BlC)
    if (next_scale_B1C is None) != (next_shift_B1C is None):
        raise ConfigError("next_scale and next_shift come together")
    if next_weight_C is None and next_scale_B1C is not None:
        raise ConfigError("next_scale / next_shift need next_weight")
    B, l, C = x_BlC.shape
    if h_BlC.shape != x_BlC.shape:
        raise ConfigError(f"x and h must have one shape, got {tuple(x_BlC.shape)} and {tuple(h_BlC.shape)}")
    out_x = torch.empty(B, l, C, device=x_BlC.device, dtype=x_BlC.dtype)
    out_n = None if next_weight_C is None else torch.empty_like(out_x)
    _launch_chain(
        _rows(h_BlC, "h", C),
        _rows(x_BlC, "x", C),
        weight_C,
        eps,
        _per_batch(gate_B1C, "gate", B, C),
        next_weight_C,
        0.0 if next_eps is None else next_eps,
        _per_batch(next_scale_B1C, "next_scale", B, C),
        _per_batch(next_shift_B1C, "next_shift", B, C),
        out_x.view(-1, C),
        None if out_n is None else out_n.view(-1, C),
        l,
    )
    return out_x, out_n


def silu_mul(a: Tensor, b: Tensor) -> Tensor:
    """silu(a) * b elementwise in one kernel (float32 inside); a and b of one shape."""
    _check_backend(a, rows=False)
    if a.shape != b.shape:
        raise ConfigError(f"silu_mul needs one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.contiguous(), b.contiguous()
    out = torch.empty_like(a)
    n = a.numel()
    if n:
        block = 1024
        _silu_mul_kernel[(triton.cdiv(n, block),)](a, b, out, n, BLOCK=block)
    return out
