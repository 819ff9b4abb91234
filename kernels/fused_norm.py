"""Fused RMSNorm chains of the Switti block in Triton, with PyTorch references of the same signatures.

A Switti block (``models.blocks.SwittiBlock``) wraps each of its three sub-layers in sandwich RMSNorms and AdaLN
modulation. Written as PyTorch ops, one block is about 75 small elementwise kernels in half precision
(``benchmarks/kernel_count.py``: 83 kernels per block, 7 GEMMs and 2 attentions among them; each RMSNorm alone is a
float32 cast, square, mean, add, sqrt, divide, gain cast, multiply and cast back): the H200 profile counted about
2,000 per step of mindhier-512's 30 blocks, and those kernels, not the GEMMs, bound the small scales of the fast
backend (``benchmarks/results/gpu_h200/README.md``). The block's elementwise work between its matmuls is four
row-wise norm chains, SwiGLU's gate and self-attention's prologue, six kernels here:

    rms_norm_modulate(x, w, eps, scale, shift)      RMSNorm(x) * w * (1 + scale) + shift   (before self-attn)
    residual_rms_norm(x, h, w, eps, gate,           x' = x + RMSNorm(h) * w * gate         (after a sub-layer)
                      next_w, next_eps,             and, from the same row of x',
                      next_scale, next_shift)       RMSNorm(x') * next_w [* (1 + next_scale) + next_shift]
    silu_mul(a, b)                                  silu(a) * b                             (SwiGLU)
    qk_norm_rope(qkv, cos, sin, heads, eps,         q, k, v heads of self-attention: LayerNorm of q and k,
                 cache, offset)                     the rotation, k and v written into the cache at offset

``scale``, ``shift`` and ``gate`` are per batch row, [B, 1, C] (AdaLN vectors); x and h are [B, l, C]. The
``*_ref`` functions are the model's own PyTorch code (``models.elementwise.rms_norm_modulate_eager``,
``residual_rms_norm_eager``, ``qk_heads``), which is what the block runs when fusion is off; the execution option
``fused_norms`` (``mindhier_rt.execution``) switches the block to these kernels, as the fast backend does on CUDA.

Numerics: the kernels compute in float32 and round once to the input dtype at each output. The references
round the way the eager model does (the RMSNorm output is cast back to the input dtype before modulation),
so in float32 the two agree to float32 rounding (different summation order), and in bfloat16/float16 the
kernels are the more accurate of the two (tests: ``tests/test_fused_norm.py``).

Backends as in ``scale_attention``: CUDA tensors run compiled kernels; CPU tensors run only under Triton's
interpreter (``TRITON_INTERPRET=1`` before import), in float32. Without Triton the references still work and
the kernels raise ``BackendError``. Inference only: no backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mindhier_rt.errors import ConfigError
from mindhier_rt.kernels import import_triton, require_runnable
from mindhier_rt.models.elementwise import qk_heads, residual_rms_norm_eager, rms_norm_modulate_eager

triton, tl, HAS_TRITON, _TRITON_MISSING = import_triton()  # optional: reported when a kernel is used

MAX_WIDTH = 16384  # one program holds a whole row in registers

if HAS_TRITON:
    # `tokens` and `offset` change with the scale: not specialised, so one compile serves every scale and no
    # scale sees them as compile-time constants (Triton makes an integer equal to 1 one).
    @triton.jit(do_not_specialize=("tokens",))
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
    def _silu_mul_kernel(A, B, OUT, n_cols, stride_a, stride_b, BLOCK: tl.constexpr):
        """Rows of A and B (any row strides, e.g. the two halves of one packed projection) into contiguous OUT."""
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        valid = cols < n_cols
        a = tl.load(A + row * stride_a + cols, mask=valid, other=0.0).to(tl.float32)
        b = tl.load(B + row * stride_b + cols, mask=valid, other=0.0).to(tl.float32)
        out = a / (1.0 + tl.exp(-a)) * b
        tl.store(OUT + row * n_cols + cols, out.to(OUT.dtype.element_ty), mask=valid)

    @triton.jit(do_not_specialize=("tokens", "offset"))
    def _qk_norm_rope_kernel(
        QKV,  # [R, 3C] rows of the fused projection: q | k | v, each C = H * c wide
        COS,  # [tokens, c] rotary tables of this scale's tokens (contiguous)
        SIN,
        Q_OUT,  # [B, H, tokens, c]
        K_OUT,  # [B, H, >= offset + tokens, c]: a fresh tensor or the self-attention cache
        V_OUT,
        tokens,
        offset,  # position of this scale's first token in K_OUT / V_OUT
        stride_row,
        stride_qb,
        stride_qh,
        stride_qt,
        stride_kb,
        stride_kh,
        stride_kt,
        stride_vb,
        stride_vh,
        stride_vt,
        eps,
        WIDTH: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        row = tl.program_id(0)
        b = (row // tokens).to(tl.int64)
        t = row % tokens
        cols = tl.arange(0, BLOCK_C)
        valid = cols < WIDTH
        h = (cols // HEAD_DIM).to(tl.int64)
        d = cols % HEAD_DIM
        swapped = cols ^ 1  # the other element of each rotary pair
        base = QKV + row.to(tl.int64) * stride_row
        cos = tl.load(COS + t * HEAD_DIM + d, mask=valid, other=0.0).to(tl.float32)
        sin = tl.load(SIN + t * HEAD_DIM + d, mask=valid, other=0.0).to(tl.float32)
        for part in tl.static_range(2):  # q, then k: LayerNorm over the full width, then the rotation
            x = tl.load(base + part * WIDTH + cols, mask=valid, other=0.0).to(tl.float32)
            x_sw = tl.load(base + part * WIDTH + swapped, mask=valid, other=0.0).to(tl.float32)
            mean = tl.sum(x, axis=0) / WIDTH
            diff = tl.where(valid, x - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / WIDTH + eps)
            y = (x - mean) * rstd * cos + (x_sw - mean) * rstd * sin
            if part == 0:
                ptr = Q_OUT + b * stride_qb + h * stride_qh + t * stride_qt + d
            else:
                ptr = K_OUT + b * stride_kb + h * stride_kh + (offset + t) * stride_kt + d
            tl.store(ptr, y.to(ptr.dtype.element_ty), mask=valid)
        v = tl.load(base + 2 * WIDTH + cols, mask=valid, other=0.0)
        tl.store(V_OUT + b * stride_vb + h * stride_vh + (offset + t) * stride_vt + d, v, mask=valid)

    _INTERPRETED = bool(triton.knobs.runtime.interpret)
else:
    _INTERPRETED = False


# ---- references: the model's own arithmetic --------------------------------------------------------------
rms_norm_modulate_ref = rms_norm_modulate_eager
residual_rms_norm_ref = residual_rms_norm_eager


def qk_norm_rope_ref(
    qkv_Bl3C: Tensor,
    cos_lc: Tensor,
    sin_lc: Tensor,
    heads: int,
    eps: float,
    cache: tuple[Tensor, Tensor] | None = None,
    offset: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``models.elementwise.qk_heads``; with ``cache`` (the K and V buffers [B, H, L, c] of a ``SelfKVCache``) k and v
    are written at ``offset`` and the returned k, v are the buffers up to and including this scale."""
    q, k, v = qk_heads(qkv_Bl3C, cos_lc, sin_lc, heads, eps)
    if cache is None:
        return q, k, v
    k_all, v_all = cache
    end = offset + qkv_Bl3C.shape[1]
    k_all[:, :, offset:end] = k
    v_all[:, :, offset:end] = v
    return q, k_all[:, :, :end], v_all[:, :, :end]


def silu_mul_ref(a: Tensor, b: Tensor) -> Tensor:
    return F.silu(a) * b


# ---- kernels -------------------------------------------------------------------------------------------
def _check_backend(t: Tensor, rows: bool = True) -> None:
    if rows and t.dim() != 3:
        raise ConfigError(f"the norm kernels take [B, l, C] tensors, got shape {tuple(t.shape)}")
    require_runnable(t, HAS_TRITON, _INTERPRETED, _TRITON_MISSING, __name__)


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


def qk_norm_rope(
    qkv_Bl3C: Tensor,
    cos_lc: Tensor,
    sin_lc: Tensor,
    heads: int,
    eps: float,
    cache: tuple[Tensor, Tensor] | None = None,
    offset: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``qk_norm_rope_ref`` in one kernel: q written head-major, k and v straight into the cache when given."""
    _check_backend(qkv_Bl3C, rows=False)
    if qkv_Bl3C.dim() != 4 or qkv_Bl3C.shape[2] != 3:
        raise ConfigError(f"qkv must be [B, l, 3, C], got shape {tuple(qkv_Bl3C.shape)}")
    B, l, _, C = qkv_Bl3C.shape
    if C % heads or (C // heads) % 2:
        raise ConfigError(f"width {C} must split into {heads} heads of an even size")
    c = C // heads
    if tuple(cos_lc.shape) != (l, c) or tuple(sin_lc.shape) != (l, c):
        raise ConfigError(f"rotary tables must be [{l}, {c}], got {tuple(cos_lc.shape)} and {tuple(sin_lc.shape)}")
    rows = qkv_Bl3C.reshape(B * l, 3 * C)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    dev, dt = qkv_Bl3C.device, qkv_Bl3C.dtype
    q = torch.empty(B, heads, l, c, device=dev, dtype=dt)
    if cache is None:
        k_all, v_all = torch.empty_like(q), torch.empty_like(q)
        offset = 0
    else:
        k_all, v_all = cache
        if k_all.shape[:2] != (B, heads) or k_all.shape[3] != c or k_all.shape[2] < offset + l:
            shape = tuple(k_all.shape)
            raise ConfigError(f"cache {shape} cannot take {l} tokens of [{B}, {heads}, ., {c}] at {offset}")
        if k_all.stride(-1) != 1 or v_all.stride(-1) != 1:
            raise ConfigError("the cache needs a unit stride along the head dim")
    if B * l:
        _qk_norm_rope_kernel[(B * l,)](
            rows, cos_lc.contiguous(), sin_lc.contiguous(), q, k_all, v_all, l, offset, rows.stride(0),
            *q.stride()[:3], *k_all.stride()[:3], *v_all.stride()[:3], float(eps),
            WIDTH=C, HEAD_DIM=c, BLOCK_C=triton.next_power_of_2(C), num_warps=4 if C <= 1024 else 8,
        )  # fmt: skip
    end = offset + l
    if cache is None:
        return q, k_all, v_all
    return q, k_all[:, :, :end], v_all[:, :, :end]


def silu_mul(a: Tensor, b: Tensor) -> Tensor:
    """silu(a) * b elementwise in one kernel (float32 inside); a and b of one shape, read in place when their rows
    have unit stride (e.g. ``gu[..., :h]`` and ``gu[..., h:]`` of a packed gate/up projection)."""
    _check_backend(a, rows=False)
    if a.shape != b.shape or a.dim() == 0:
        raise ConfigError(f"silu_mul needs one shape of at least one axis, got {tuple(a.shape)} and {tuple(b.shape)}")
    n = a.shape[-1]
    a_Rn, b_Rn = _rows(a.reshape(-1, 1, n), "a", n), _rows(b.reshape(-1, 1, n), "b", n)
    out = torch.empty(a.shape, device=a.device, dtype=a.dtype)
    if out.numel():
        block = min(1024, triton.next_power_of_2(n))
        grid = (a_Rn.shape[0], triton.cdiv(n, block))
        _silu_mul_kernel[grid](a_Rn, b_Rn, out, n, a_Rn.stride(0), b_Rn.stride(0), BLOCK=block)
    return out
