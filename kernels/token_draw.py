"""The token draw in one Triton kernel: float64 softmax, top-p prefix, counter-based uniform, inverse CDF.

``sampling.sample_tokens`` turns each position's stable descending order of the logits (top-k kept) into a
token with about 110 small PyTorch ops after the sort (``benchmarks/kernel_count.py``): the counter hash alone
is four fmix32 rounds of about 22 int64 ops each (a 32 x 32-bit product takes eight, on 16-bit halves), then
exp, cumsum, the top-p prefix, gathers. On a GPU each op is a kernel of at least ~2 us even inside a CUDA graph,
so per scale that is about 0.2 ms of kernel minimums for a few microseconds of work. Here the steps after the
sort are one program per token position:

    draw_sorted(top_Nlk, order_Nlk, top_p, seed, scan_N, sample_N, scale)   -> int64 [N, l]

    e_j = exp(x_j - x_0), E = cumsum(e) in float64     (x: the position's sorted values, j < k)
    m = 1 + #{j < k - 1 : E_j < top_p * E_{k-1}}       (the top-p prefix 0..m-1)
    u = fmix32 hash of (seed, scan, sample, scale, token) * 2^-32, in uint32 arithmetic
    token = order[min(#{j < m : E_j <= u * E_{m-1}}, m - 1)]

which is the selection rule of ``docs/sampling.md`` (steps 3-6) as ``seeded_draw.draw_from_sorted`` computes it;
``draw_sorted_ref`` (that function with ``seeded_draw.uniforms``) is the reference of the same signature. The sort
stays ``torch.sort`` (stable, descending) in ``sampling.stable_top_k``. The uniforms are bit-exact; the float64
``exp`` and the order of the cumulative sum may differ from PyTorch's in the last bit, which changes a token
only when a draw lands within a few ulps of a cumulative sum (probability ~1e-15 per token, as between any two
backends: docs/sampling.md, "Exactness").

Backends as in ``scale_attention``: CUDA tensors run compiled kernels; CPU tensors run only under Triton's
interpreter (``TRITON_INTERPRET=1`` before import), with float32 values. Inference only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mindhier_rt.errors import ConfigError
from mindhier_rt.kernels import import_triton, require_runnable
from mindhier_rt.seeded_draw import FMIX_C1, FMIX_C2, draw_from_sorted, seed_hash, uniforms

triton, tl, HAS_TRITON, _TRITON_MISSING = import_triton()  # optional: reported when a kernel is used

MAX_K = 8192  # one program holds a position's k sorted values (float64) in registers

if HAS_TRITON:
    _C1 = tl.constexpr(FMIX_C1)
    _C2 = tl.constexpr(FMIX_C2)

    @triton.jit
    def _fmix32(x):
        """MurmurHash3's finaliser on uint32 ``x``. Products are truncated back to uint32 explicitly, so the
        result does not depend on the integer type a literal constant promotes the product to."""
        x = x ^ (x >> 16)
        x = (x * _C1).to(tl.uint32)
        x = x ^ (x >> 13)
        x = (x * _C2).to(tl.uint32)
        return x ^ (x >> 16)

    # Arguments that change from launch to launch (per scale, per row count, per seed) are not specialised:
    # Triton turns an integer equal to 1 into a compile-time constant, and `scale.to(...)` on a constant fails
    # to compile (scale 1 did, on the first GPU). Not specialising them also gives one compile for every scale.
    DRAW_PER_LAUNCH_ARGS = ("n_tok", "h_seed", "scale")

    @triton.jit(do_not_specialize=DRAW_PER_LAUNCH_ARGS)
    def _draw_kernel(
        VALS,  # [P, >= k] sorted values of each position (descending), float32, unit stride along k
        ORDER,  # [P, >= k] their token indices, int64
        SCAN,  # [N] scan ids (int64)
        SAMPLE,  # [N] sample ids (int64)
        TOP_P,  # [] float64: top_p, read from memory so that it is not rounded to a float32 argument
        OUT,  # [P] int64 tokens
        k,
        n_tok,  # positions per row: P = N * n_tok
        stride_vals,
        stride_order,
        h_seed,  # the hash after the two seed words (host-computed, < 2^32)
        scale,
        BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)  # pid * stride can pass 2^31 on large batches
        row = pid // n_tok
        tok = pid % n_tok
        j = tl.arange(0, BLOCK_K)
        in_k = j < k

        x = tl.load(VALS + pid * stride_vals + j, mask=in_k, other=float("-inf")).to(tl.float64)
        x0 = tl.max(x, 0)  # the first sorted value
        e = tl.exp(x - x0)  # 0 outside k
        cum = tl.cumsum(e, 0)
        z = tl.sum(tl.where(j == k - 1, cum, 0.0), 0)
        top_p = tl.load(TOP_P)
        m = 1 + tl.sum(((cum < top_p * z) & (j < k - 1)).to(tl.int32), 0)
        mass = tl.sum(tl.where(j == m - 1, cum, 0.0), 0)

        h = _fmix32(h_seed.to(tl.uint32) ^ tl.load(SCAN + row).to(tl.uint32))
        h = _fmix32(h ^ tl.load(SAMPLE + row).to(tl.uint32))
        h = _fmix32(h ^ scale.to(tl.uint32))
        h = _fmix32(h ^ tok.to(tl.uint32))
        u = h.to(tl.float64) * 2.3283064365386963e-10  # 2^-32, exact

        pos = tl.sum(((cum <= u * mass) & (j < m)).to(tl.int32), 0)
        pos = tl.minimum(pos, m - 1)
        order = tl.load(ORDER + pid * stride_order + j, mask=in_k, other=0)
        tl.store(OUT + pid, tl.sum(tl.where(j == pos, order, 0), 0))

    _INTERPRETED = bool(triton.knobs.runtime.interpret)
else:
    _INTERPRETED = False


def _check(top_Nlk: Tensor, order_Nlk: Tensor, scan_N: Tensor, sample_N: Tensor) -> tuple[int, int, int]:
    if top_Nlk.dim() != 3 or order_Nlk.shape != top_Nlk.shape:
        raise ConfigError(
            f"top values and order must both be [N, l, k], got {tuple(top_Nlk.shape)} and {tuple(order_Nlk.shape)}"
        )
    N, n_tok, k = top_Nlk.shape
    if not 1 <= k <= MAX_K:
        raise ConfigError(f"draw_sorted takes 1 <= k <= {MAX_K} sorted values per position, got {k}")
    if top_Nlk.dtype != torch.float32 or order_Nlk.dtype != torch.int64:
        raise ConfigError(f"draw_sorted takes float32 values and int64 indices, got {top_Nlk.dtype}, {order_Nlk.dtype}")
    if tuple(scan_N.shape) != (N,) or tuple(sample_N.shape) != (N,):
        raise ConfigError(f"scan and sample ids must be [{N}], got {tuple(scan_N.shape)}, {tuple(sample_N.shape)}")
    return N, n_tok, k


def _positions(t: Tensor) -> Tensor:
    """[N, l, k] as [N * l, k] with unit stride along k (a view of a slice of a sorted [N, l, V] where possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def draw_sorted(
    top_Nlk: Tensor,
    order_Nlk: Tensor,
    top_p: float,
    seed: int,
    scan_N: Tensor,
    sample_N: Tensor,
    scale: int,
) -> Tensor:
    """Tokens [N, l] (int64) of positions whose stable descending order is given: the first k sorted values
    (``top_Nlk``, float32) and their token indices (``order_Nlk``); ids per row, on the same device."""
    require_runnable(top_Nlk, HAS_TRITON, _INTERPRETED, _TRITON_MISSING, __name__)
    N, n_tok, k = _check(top_Nlk, order_Nlk, scan_N, sample_N)
    out = torch.empty(N, n_tok, dtype=torch.int64, device=top_Nlk.device)
    if out.numel() == 0:
        return out
    vals_Pk, order_Pk = _positions(top_Nlk), _positions(order_Nlk)
    # a fill on the device, not a host copy, so that a CUDA graph can hold it
    top_p_t = torch.full((), float(top_p), dtype=torch.float64, device=top_Nlk.device)
    block = triton.next_power_of_2(k)
    _draw_kernel[(N * n_tok,)](
        vals_Pk, order_Pk, scan_N.to(torch.int64).contiguous(), sample_N.to(torch.int64).contiguous(), top_p_t,
        out, k, n_tok, vals_Pk.stride(0), order_Pk.stride(0), seed_hash(seed), int(scale),
        BLOCK_K=block, num_warps=4 if block <= 1024 else 8,
    )  # fmt: skip
    return out


def draw_sorted_ref(
    top_Nlk: Tensor,
    order_Nlk: Tensor,
    top_p: float,
    seed: int,
    scan_N: Tensor | Sequence[int],
    sample_N: Tensor | Sequence[int],
    scale: int,
) -> Tensor:
    """``draw_sorted`` in PyTorch: ``seeded_draw.draw_from_sorted`` with ``seeded_draw.uniforms``."""
    u_Nl = uniforms(seed, scan_N, sample_N, scale, top_Nlk.shape[1]).to(top_Nlk.device)
    return draw_from_sorted(top_Nlk, order_Nlk, top_p, u_Nl)
