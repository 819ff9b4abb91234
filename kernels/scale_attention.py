"""Block-sparse scale-masked attention forward in Triton and its PyTorch reference.

Every attention mask of this model lets a run of queries see ONE contiguous run of keys, a *range*
``(q0, q1, k0, k1)`` with exclusive ends (``Schedule.key_ranges``): the queries of one scale see their own scale
(``scale_local``) or the pyramid up to and including it (``block_causal``); in ``cross`` each run of tokens
that reads one context segment sees that segment (one run per scale with the training context map, up to M
runs per scale with the reference-pipeline map, where one scale's tokens read several segments). The kernel
is built on that: the host cuts each range's queries into BLOCK_M tiles (a tile never straddles two ranges)
and writes an int32 tile table ``[n_tiles, 4] = (tile q start, tile q end, k start, k end)``; program
``(tile, b * H + h)`` reads its row and loops over keys ``k0..k1`` in BLOCK_N steps with an online softmax.
It only ever loads the key/value tiles its mask allows: that is the block sparsity (cross-attention reads
1/M of the context, a scale-local query tile reads its own scale only). There is no dense mask anywhere on
the kernel path.

Semantics shared by the kernel and ``scale_masked_attention_ref``:
  out[b, h, q] = softmax_k(scale * q . k, k in the range covering q) @ v, for every q covered by a range.
  Queries covered by no range are left untouched in ``out``: a caller-provided ``out`` keeps its values
  there, and a freshly allocated ``out`` is zero-filled there (it is allocated uninitialised when the
  ranges cover every query). Query ranges must not overlap; key ranges must be non-empty.

Numerics: scores, the running max/sum and the output accumulator are float32 for every input dtype; the
output is cast to q's dtype. For float32 inputs on a GPU the dot products use IEEE fp32 (not TF32), so fp32
results match the reference to ~1e-6 relative; fp16/bf16 inputs feed the tensor cores directly.

Backends: CUDA tensors run the compiled kernel. CPU tensors run only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before this module is imported), in float32; that is how the CPU tests run.
``HAS_TRITON`` says whether Triton imported; without it this module still imports and the references,
range helpers work, while the kernel raises a ``BackendError`` saying how to install it.

Backward: none. Training runs the reference path, ``F.scaled_dot_product_attention`` with the dense boolean
mask (``models.attention.attention``), because the forward is what inference needs: decoding and the
teacher-forced pass at serving time never differentiate, and a backward kernel would be more code to keep
correct for a training cost that is not this project's bottleneck. This is a choice of scope, not a limit
of the method: the same tile table would drive a block-sparse backward.

Axis legend: B batch, H heads, L / l query tokens (whole pyramid / one scale), S key tokens (context or
self-attention cache), c head dim. BLOCK_M query rows and BLOCK_N keys per tile, BLOCK_D = head dim
rounded up to a power of two (>= 16) and masked.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from mindhier_rt.errors import BackendError, ConfigError
from mindhier_rt.kernels import import_triton, require_runnable

log = logging.getLogger(__name__)

triton, tl, HAS_TRITON, _TRITON_MISSING = import_triton()  # optional: reported when a kernel is used

Range = tuple[int, int, int, int]  # (query start, query end, key start, key end), ends exclusive
Kind = Literal["cross", "scale_local", "block_causal"]
KINDS: tuple[str, ...] = ("cross", "scale_local", "block_causal")

MAX_HEAD_DIM = 256
MAX_GRID_Y = 65535  # CUDA's limit on the second grid axis, which holds B * H
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634

# ---- the kernel --------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _attend_key_range(
        q_md,
        k_base,
        v_base,
        k_start,
        k_end,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        qk_scale_log2,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """softmax(scale * q k^T) v of a query tile over keys k_start..k_end (online softmax, float32)."""
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_valid = offs_d < HEAD_DIM
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of the log2-scaled scores
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running softmax denominator
        acc_md = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        # Only the key tiles of this range are visited. The range is non-empty (host check), so the first
        # step makes every row's max finite, masked query rows included (their q is 0, their scores 0).
        for n0 in range(k_start, k_end, BLOCK_N):
            n_idx = n0 + offs_n
            n_valid = n_idx < k_end
            k_dn = tl.load(
                k_base + n_idx[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                mask=n_valid[None, :] & d_valid[:, None],
                other=0.0,
            )
            s_mn = tl.dot(q_md, k_dn, input_precision=DOT_PRECISION) * qk_scale_log2
            s_mn = tl.where(n_valid[None, :], s_mn, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s_mn, 1))
            p_mn = tl.math.exp2(s_mn - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p_mn, 1)
            v_nd = tl.load(
                v_base + n_idx[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=n_valid[:, None] & d_valid[None, :],
                other=0.0,
            )
            acc_md = acc_md * alpha[:, None] + tl.dot(p_mn.to(v_nd.dtype), v_nd, input_precision=DOT_PRECISION)
            m_i = m_new

        return acc_md / l_i[:, None]

    @triton.jit
    def _scale_attn_fwd_kernel(
        Q,
        K,
        V,
        O,
        TILES,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_vd,
        stride_ob,
        stride_oh,
        stride_om,
        stride_od,
        n_heads,
        qk_scale_log2,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """One query tile of one (batch, head) against the key range of its row in the tile table."""
        tl.static_assert(BLOCK_M >= 16, "tl.dot needs BLOCK_M >= 16")
        tl.static_assert(BLOCK_N >= 16, "tl.dot needs BLOCK_N >= 16")
        tl.static_assert(BLOCK_D >= 16, "tl.dot needs BLOCK_D >= 16")
        tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D must cover the head dim")
        tile = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // n_heads).to(tl.int64)
        h = (bh % n_heads).to(tl.int64)

        # This tile's row of the table: scalar loads.
        q_start = tl.load(TILES + tile * 4 + 0)
        q_end = tl.load(TILES + tile * 4 + 1)
        k_start = tl.load(TILES + tile * 4 + 2)
        k_end = tl.load(TILES + tile * 4 + 3)

        offs_m = q_start + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < q_end
        d_valid = offs_d < HEAD_DIM

        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
        q_md = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh

        out_md = _attend_key_range(
            q_md, k_base, v_base, k_start, k_end, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale_log2,
            HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION,
        )  # fmt: skip
        o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out_md.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])

    @triton.jit
    def _single_range_attn_fwd_kernel(
        Q,
        K,
        V,
        n_heads,
        len_q,
        len_k,
        O,
        QK_SCALE_LOG2: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """Every query of contiguous q [B, H, len_q, c] over all keys of k, v [B, H, len_k, c]: one range.

        The attention of one decode step (a scale's queries over its own scale, its context segment or the
        cache up to it) is always a single range. The argument order (inputs, integer scalars, outputs) and
        the constexpr scale are the calling convention of TensorRT's ahead-of-time plugins
        (``export/attention_plugin.py``); strides follow from the contiguous layout.
        """
        tile = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < len_q
        d_valid = offs_d < HEAD_DIM
        q_ptrs = Q + bh * len_q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        q_md = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
        kv_offset = bh * len_k * HEAD_DIM
        out_md = _attend_key_range(
            q_md, K + kv_offset, V + kv_offset, 0, len_k, HEAD_DIM, 1, HEAD_DIM, 1, QK_SCALE_LOG2,
            HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION,
        )  # fmt: skip
        o_ptrs = O + bh * len_q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(o_ptrs, out_md.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])

    # Triton decides interpreted vs compiled when a kernel is decorated: remember which one we got.
    _INTERPRETED = bool(triton.knobs.runtime.interpret)
else:
    _INTERPRETED = False


# ---- host side: ranges, tile tables, launch ------------------------------------------------------------
@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


def launch_config(head_dim: int, block_m: int | None = None, block_n: int | None = None) -> LaunchConfig:
    """Tile sizes and launch parameters for a head dim (explicit block sizes override the defaults).

    Defaults follow the usual flash-attention choices for Hopper/Ampere at c <= 64 (64 x 64 tiles, 4 warps,
    3 stages) and shrink the key tile as the head dim grows so the K/V tiles of all stages fit shared memory.
    They are untuned on this project's hardware: ``benchmark`` is where to tune them.
    """
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ConfigError(f"head dim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    if block_d <= 64:
        d_m, d_n, stages = 64, 64, 3
    elif block_d <= 128:
        d_m, d_n, stages = 64, 32, 2
    else:
        d_m, d_n, stages = 32, 32, 1
    block_m = d_m if block_m is None else block_m
    block_n = d_n if block_n is None else block_n
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value < 16 or value & (value - 1):
            raise ConfigError(f"{name} must be a power of two >= 16 (tl.dot tiles), got {value}")
    return LaunchConfig(block_m, block_n, block_d, num_warps=4, num_stages=stages)


def normalize_ranges(ranges: Sequence[Sequence[int]]) -> tuple[Range, ...]:
    out = []
    for j, r in enumerate(ranges):
        if len(r) != 4:
            raise ConfigError(f"range {j} must be (q_start, q_end, k_start, k_end), got {tuple(r)!r}")
        out.append(tuple(int(x) for x in r))
    return tuple(out)


@dataclass(frozen=True)
class RangeSummary:
    q_max: int  # largest query end
    k_max: int  # largest key end
    covered: int  # queries covered by some range (no overlaps, so the sum of the query lengths)


@functools.lru_cache(maxsize=512)
def check_ranges(ranges: tuple[Range, ...]) -> RangeSummary:
    """Structural checks that do not depend on tensor shapes: cached per ranges tuple."""
    if not ranges:
        raise ConfigError("expected at least one (q_start, q_end, k_start, k_end) range, got none")
    for j, (q0, q1, k0, k1) in enumerate(ranges):
        if q0 < 0 or k0 < 0:
            raise ConfigError(f"range {j} {ranges[j]}: expected starts >= 0, got q_start {q0}, k_start {k0}")
        if q1 <= q0:
            raise ConfigError(f"range {j} {ranges[j]}: expected q_end > q_start (empty query range)")
        if k1 <= k0:
            raise ConfigError(
                f"range {j} {ranges[j]}: expected k_end > k_start, got an empty key range "
                "(a query with no keys has no softmax)"
            )
    by_start = sorted(ranges)
    for a, b in itertools.pairwise(by_start):
        if b[0] < a[1]:
            raise ConfigError(f"query ranges must not overlap: {a} and {b} both cover query {b[0]}")
    return RangeSummary(
        q_max=max(r[1] for r in ranges),
        k_max=max(r[3] for r in ranges),
        covered=sum(r[1] - r[0] for r in ranges),
    )


def _check_bounds(ranges: tuple[Range, ...], summary: RangeSummary, n_queries: int, n_keys: int) -> None:
    if summary.q_max > n_queries:
        bad = next(r for r in ranges if r[1] > n_queries)
        raise ConfigError(f"range {bad} ends past the queries: expected q_end <= Lq = {n_queries}, got {bad[1]}")
    if summary.k_max > n_keys:
        bad = next(r for r in ranges if r[3] > n_keys)
        raise ConfigError(f"range {bad} ends past the keys: expected k_end <= Lk = {n_keys}, got {bad[3]}")


@functools.lru_cache(maxsize=512)
def tile_rows(ranges: tuple[Range, ...], block_m: int) -> tuple[Range, ...]:
    """Each range's queries cut into BLOCK_M tiles, longest key range first (the heaviest tiles launch first)."""
    check_ranges(ranges)
    rows = [
        (t, min(t + block_m, q1), k0, k1)
        for q0, q1, k0, k1 in sorted(ranges, key=lambda r: r[3] - r[2], reverse=True)
        for t in range(q0, q1, block_m)
    ]
    return tuple(rows)


@functools.lru_cache(maxsize=512)
def tile_table(ranges: tuple[Range, ...], block_m: int, device: torch.device) -> Tensor:
    """int32 [n_tiles, 4] = (tile q start, tile q end, k start, k end) on ``device``, cached per arguments.

    Rows are ordered longest key range first, so the heaviest tiles (the finest block-causal scales) are
    scheduled first and the short ones fill the tail of the launch. Warm it up before a CUDA graph capture:
    the first call for a (ranges, BLOCK_M, device) copies the table to the device.
    """
    return torch.tensor(tile_rows(ranges, block_m), dtype=torch.int32, device=device).reshape(-1, 4)


def _check_tensors(q: Tensor, k: Tensor, v: Tensor, out: Tensor | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ConfigError(f"{name} must be 4-D [B, H, L, c], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ConfigError(f"k and v must have the same shape [B, H, Lk, c], got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ConfigError(
            f"q [B, H, Lq, c] and k [B, H, Lk, c] must agree on B, H and c: got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if not 1 <= q.shape[3] <= MAX_HEAD_DIM:
        raise ConfigError(f"head dim must be in 1..{MAX_HEAD_DIM}, got {q.shape[3]}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        raise ConfigError(
            f"q, k, v must share one dtype of {[str(d) for d in DTYPES]}, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ConfigError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ConfigError(
            f"out must match q: expected {tuple(q.shape)} {q.dtype} on {q.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )


def _check_backend(q: Tensor) -> None:
    require_runnable(q, HAS_TRITON, _INTERPRETED, _TRITON_MISSING, __name__)


def _new_out(q: Tensor, summary: RangeSummary) -> Tensor:
    return torch.empty_like(q) if summary.covered == q.shape[2] else torch.zeros_like(q)


def scale_masked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ranges: Sequence[Sequence[int]],
    scale: float | None = None,
    out: Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> Tensor:
    """Block-sparse attention of q [B, H, Lq, c] over k, v [B, H, Lk, c] restricted to ``ranges``.

    ``ranges``: (q_start, q_end, k_start, k_end) per group of queries, ends exclusive, query ranges disjoint,
    key ranges non-empty. Queries covered by no range are left untouched in ``out`` (zero in a fresh one).
    Any strides (cache views, permuted tensors); nothing is copied. ``scale`` defaults to c ** -0.5.
    Returns ``out`` (allocated when None), in q's dtype. ``block_m`` / ``block_n`` (powers of two >= 16)
    override the tile sizes of ``launch_config``. Raises ConfigError for bad shapes, dtypes, devices or
    ranges, BackendError when Triton cannot run here (no Triton; CPU tensors without the interpreter).
    """
    _check_tensors(q, k, v, out)
    key = normalize_ranges(ranges)
    summary = check_ranges(key)
    _check_bounds(key, summary, q.shape[2], k.shape[2])
    _check_backend(q)
    B, H, _, c = q.shape
    if q.device.type == "cuda" and B * H > MAX_GRID_Y:
        raise ConfigError(f"batch x heads must be <= {MAX_GRID_Y} (CUDA grid axis 1), got {B} x {H} = {B * H}")
    cfg = launch_config(c, block_m, block_n)
    scale = c**-0.5 if scale is None else float(scale)
    out_BHLc = _new_out(q, summary) if out is None else out
    if B * H == 0:
        return out_BHLc
    tiles_N4 = tile_table(key, cfg.block_m, q.device)
    grid = (tiles_N4.shape[0], B * H)
    # Triton launches on the current CUDA device: make it q's.
    on_device = torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        _launch(q, k, v, out_BHLc, tiles_N4, grid, scale, cfg)
    return out_BHLc


def _launch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out_BHLc: Tensor,
    tiles_N4: Tensor,
    grid: tuple[int, int],
    scale: float,
    cfg: LaunchConfig,
) -> None:
    _scale_attn_fwd_kernel[grid](
        q,
        k,
        v,
        out_BHLc,
        tiles_N4,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out_BHLc.stride(),
        q.shape[1],
        scale * _LOG2E,
        HEAD_DIM=q.shape[3],
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_D=cfg.block_d,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


# ---- the single-range kernel: what a decode step needs, with TensorRT's plugin calling convention -------------
def single_range_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """softmax(scale * q k^T) v for contiguous q [B, H, Lq, c] and k, v [B, H, Lk, c], every query over every
    key: the kernel the TensorRT attention plugin runs (``export/attention_plugin.py``), launched here the same
    way (grid = (ceil(Lq / BLOCK_M), B * H)). Equals ``scale_masked_attention(q, k, v, [(0, Lq, 0, Lk)])``."""
    _check_tensors(q, k, v, None)
    if k.shape[2] == 0:
        raise ConfigError("attention needs at least one key")
    _check_backend(q)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, Lq, c = q.shape
    cfg = launch_config(c)
    out = torch.empty_like(q)
    if B * H * Lq == 0:
        return out
    grid = (triton.cdiv(Lq, cfg.block_m), B * H)
    on_device = torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        _single_range_attn_fwd_kernel[grid](
            q, k, v, H, Lq, k.shape[2], out,
            **single_range_constants(q.dtype, c, c**-0.5 if scale is None else float(scale)),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )  # fmt: skip
    return out


def single_range_constants(dtype: torch.dtype, head_dim: int, scale: float) -> dict[str, Any]:
    """The constexpr arguments of the single-range kernel for a dtype, head dim and softmax scale."""
    cfg = launch_config(head_dim)
    return {
        "QK_SCALE_LOG2": float(scale) * _LOG2E,
        "HEAD_DIM": head_dim,
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "BLOCK_D": cfg.block_d,
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else None,
    }


TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class CompiledKernel:
    """An ahead-of-time compiled single-range kernel: what a TensorRT plan embeds."""

    name: str  # the kernel's symbol in the PTX
    ptx: str
    num_warps: int  # block = num_warps * 32 threads
    shared_bytes: int  # dynamic shared memory per block
    block_m: int  # queries per program: grid x = ceil(Lq / block_m), grid y = B * H
    scratch_bytes: int  # global scratch memory Triton asks the launcher for (0: none)


def compile_single_range(
    dtype: torch.dtype, head_dim: int, scale: float, capability: tuple[int, int], ptx_version: int | None = None
) -> CompiledKernel:
    """Compile the single-range kernel to PTX for a GPU of compute ``capability`` without needing that GPU.

    A process that imported Triton in interpreter mode cannot compile; run this where ``TRITON_INTERPRET`` is
    unset (the TensorRT build does). Raises BackendError without Triton.
    """
    if not HAS_TRITON:
        raise BackendError(f"compiling the attention kernel needs Triton (pip install triton): {_TRITON_MISSING}")
    if dtype not in TRITON_DTYPES:
        raise ConfigError(f"the attention kernel takes {sorted(map(str, TRITON_DTYPES))}, got {dtype}")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _single_range_attn_fwd_kernel
    consts = single_range_constants(dtype, head_dim, scale)
    ptr = "*" + TRITON_DTYPES[dtype]
    signature = {
        name: ptr if name in ("Q", "K", "V", "O") else "constexpr" if name in consts else "i32" for name in fn.arg_names
    }
    src = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(n),): v for n, v in consts.items()})
    cfg = launch_config(head_dim)
    major, minor = capability
    options: dict[str, Any] = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if ptx_version is not None:
        options["ptx_version"] = ptx_version
    compiled = triton.compile(src, target=GPUTarget("cuda", 10 * major + minor, 32), options=options)
    return CompiledKernel(
        name=compiled.metadata.name,
        ptx=compiled.asm["ptx"],
        num_warps=compiled.metadata.num_warps,
        shared_bytes=compiled.metadata.shared,
        block_m=cfg.block_m,
        scratch_bytes=int(getattr(compiled.metadata, "global_scratch_size", 0) or 0),
    )


def dense_mask(
    ranges: Sequence[Sequence[int]], n_queries: int, n_keys: int, device: torch.device | str | None = None
) -> Tensor:
    """Bool [Lq, Lk] mask (True = may attend) of a set of ranges: what SDPA and the reference take."""
    key = normalize_ranges(ranges)
    _check_bounds(key, check_ranges(key), n_queries, n_keys)
    mask_LS = torch.zeros(n_queries, n_keys, dtype=torch.bool, device=device)
    for q0, q1, k0, k1 in key:
        mask_LS[q0:q1, k0:k1] = True
    return mask_LS


def scale_masked_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ranges: Sequence[Sequence[int]],
    scale: float | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Pure-PyTorch reference of ``scale_masked_attention``: dense bool mask, float32 softmax, same semantics."""
    _check_tensors(q, k, v, out)
    key = normalize_ranges(ranges)
    summary = check_ranges(key)
    _check_bounds(key, summary, q.shape[2], k.shape[2])
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    mask_LS = dense_mask(key, q.shape[2], k.shape[2], device=q.device)
    rows_L = mask_LS.any(-1)
    q_BHlc = q[:, :, rows_L].float()
    scores_BHlS = torch.matmul(q_BHlc, k.float().transpose(-2, -1)) * scale
    scores_BHlS = scores_BHlS.masked_fill(~mask_LS[rows_L], float("-inf"))
    o_BHlc = torch.matmul(scores_BHlS.softmax(dim=-1), v.float())
    out_BHLc = _new_out(q, summary) if out is None else out
    out_BHLc[:, :, rows_L] = o_BHlc.to(q.dtype)
    return out_BHLc
