"""The block-sparse attention kernel seen from the schedule: each decode step's ranges, the FLOPs and bytes of a
call (what ``profile`` and the cost model quote), and a GPU benchmark against SDPA with the dense mask.

    python -m mindhier_rt.kernels.scale_attention_costs [--preset P] [--batch B] [--benchmark] [--dtype D]

prints the preset's mask savings and per-kind kernel costs as JSON (and the timings with ``--benchmark``).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mindhier_rt.errors import BackendError, ConfigError
from mindhier_rt.kernels.scale_attention import (
    DTYPES,
    HAS_TRITON,
    KINDS,
    Kind,
    Range,
    check_ranges,
    dense_mask,
    launch_config,
    normalize_ranges,
    scale_masked_attention,
    tile_rows,
    triton,
)
from mindhier_rt.schedule import Schedule

log = logging.getLogger(__name__)


# ---- schedule -> ranges --------------------------------------------------------------------------------
def ranges_for_step(schedule: Schedule, i: int, kind: Kind, cached: bool = True) -> tuple[Range, ...]:
    """The ranges of decode step ``i`` (queries = the l_i tokens of scale i).

    cross: ``schedule.step_cross_ranges(i)`` against the full context K/V [B, H, S, c]: one range
    (0, l_i, seg * T, (seg + 1) * T) with the training context map, one per run of tokens reading one segment
    with the reference-pipeline map (several where the scale's tokens read several segments).
    block_causal: (0, l_i, 0, offset_i + l_i) against the preallocated self-attention cache (whole or its
    prefix view; ``cached`` does not change it: block-causal keys always come from the cache).
    scale_local: (0, l_i, offset_i, offset_i + l_i) against the preallocated cache when ``cached``, else
    (0, l_i, 0, l_i) against the scale's own K/V.
    """
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    if not 0 <= i < schedule.n_scales:
        raise ConfigError(f"scale index must be in 0..{schedule.n_scales - 1}, got {i}")
    if kind == "cross":
        return schedule.step_cross_ranges(i)
    _, _, k0, k1 = schedule.key_ranges(kind)[i]
    n = schedule.token_counts[i]
    if kind == "scale_local" and not cached:
        k0, k1 = 0, n
    return ((0, n, k0, k1),)


# ---- costs ---------------------------------------------------------------------------------------------
def attention_cost(
    ranges: Sequence[Sequence[int]],
    batch: int,
    heads: int,
    head_dim: int,
    dtype_bytes: int,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> dict[str, Any]:
    """FLOPs and bytes of one ``scale_masked_attention`` call (tile sizes as the kernel would pick them).

    flops: 4 c per allowed (query, key) pair (q.k and p.v, a multiply-add each), times B H.
    softmax_exps: one exp per allowed pair (the other softmax ops are a few per pair, not counted as flops).
    mma_flops: what the tensor cores actually execute: full BLOCK_M x BLOCK_N x BLOCK_D tiles, padding included.
    bytes: q read and out written once per query, plus each query tile's K and V loads over its key range:
    the load traffic the kernel issues (an upper bound on DRAM traffic, since tiles of one range re-read
    the same K/V, which L2 often serves). The 16-byte tile-table row per program is left out.
    """
    key = normalize_ranges(ranges)
    cfg = launch_config(head_dim, block_m, block_n)
    bh = batch * heads
    pairs = sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in key)
    queries = check_ranges(key).covered
    rows = tile_rows(key, cfg.block_m)
    kv_per_tile = sum(k1 - k0 for _, _, k0, k1 in rows)
    key_steps = sum(math.ceil((k1 - k0) / cfg.block_n) for _, _, k0, k1 in rows)
    flops = 4 * head_dim * pairs * bh
    bytes_q_out = 2 * queries * head_dim * dtype_bytes * bh
    bytes_kv = 2 * kv_per_tile * head_dim * dtype_bytes * bh
    total_bytes = bytes_q_out + bytes_kv
    return {
        "pairs": pairs * bh,
        "flops": flops,
        "softmax_exps": pairs * bh,
        "mma_flops": 4 * cfg.block_m * cfg.block_n * cfg.block_d * key_steps * bh,
        "bytes": total_bytes,
        "bytes_q_out": bytes_q_out,
        "bytes_kv": bytes_kv,
        "arithmetic_intensity": flops / total_bytes,
        "n_tiles": len(rows),
        "block_m": cfg.block_m,
        "block_n": cfg.block_n,
    }


def _dense_shape(schedule: Schedule, kind: str) -> tuple[int, int]:
    return schedule.total_tokens, schedule.context_length if kind == "cross" else schedule.total_tokens


def mask_savings(schedule: Schedule) -> dict[str, float]:
    """Per kind, the fraction of the dense [L, Lk] (query, key) work that the mask skips.

    cross: each scale reads one of M context segments, so 1 - 1/M. scale_local: 1 - sum n_i^2 / L^2.
    block_causal: 1 - sum n_i (offset_i + n_i) / L^2.
    """
    out = {}
    for kind in KINDS:
        n_q, n_k = _dense_shape(schedule, kind)
        allowed = sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in schedule.key_ranges(kind))
        out[kind] = 1.0 - allowed / (n_q * n_k)
    return out


def cost_report(preset_name: str = "mindhier-512", batch: int = 1, dtype_bytes: int = 2) -> dict[str, Any]:
    """Mask savings and per-kind kernel costs (block-sparse vs one dense range) of a preset's pyramid."""
    from mindhier_rt.config import preset

    cfg = preset(preset_name)
    sched, heads, head_dim = cfg.schedule, cfg.generator.heads, cfg.generator.head_dim
    kinds = {}
    for kind in KINDS:
        n_q, n_k = _dense_shape(sched, kind)
        sparse = attention_cost(sched.key_ranges(kind), batch, heads, head_dim, dtype_bytes)
        dense = attention_cost([(0, n_q, 0, n_k)], batch, heads, head_dim, dtype_bytes)
        kinds[kind] = {
            "block_sparse": sparse,
            "dense": dense,
            "flops_ratio": sparse["flops"] / dense["flops"],
            "bytes_ratio": sparse["bytes"] / dense["bytes"],
        }
    return {
        "preset": preset_name,
        "batch": batch,
        "heads": heads,
        "head_dim": head_dim,
        "dtype_bytes": dtype_bytes,
        "tokens": sched.total_tokens,
        "context_tokens": sched.context_length,
        "mask_savings": mask_savings(sched),
        "kinds": kinds,
    }


# ---- benchmark (GPU) -----------------------------------------------------------------------------------
def _time_cuda(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` calls after ``warmup``, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def benchmark(
    preset_name: str = "mindhier-512",
    batch: int = 2,
    dtype: torch.dtype = torch.float16,
    warmup: int = 10,
    repeats: int = 50,
    seed: int = 0,
) -> dict[str, Any]:
    """Time the kernel against SDPA with the equivalent dense boolean mask on a preset's teacher-forced pyramid.

    For each kind (cross, scale_local, block_causal): random q [B, H, L, c] and k, v [B, H, Lk, c] on the GPU,
    the median of ``repeats`` timed calls after ``warmup``. TFLOP/s count the useful work (4 c per allowed
    pair) for both, so they compare directly; ``speedup`` = SDPA ms / kernel ms. ``max_abs_diff`` checks
    the two agree. Returns a JSON-ready dict.
    """
    if not torch.cuda.is_available():
        raise BackendError("benchmark needs a CUDA GPU; torch.cuda.is_available() is False")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {[str(d) for d in DTYPES]}, got {dtype}")
    from mindhier_rt.config import preset

    cfg = preset(preset_name)
    sched, H, c = cfg.schedule, cfg.generator.heads, cfg.generator.head_dim
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(seed)
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    results: dict[str, Any] = {}
    for kind in KINDS:
        n_q, n_k = _dense_shape(sched, kind)
        q, k, v = (torch.randn(batch, H, n, c, device=dev, dtype=dtype, generator=gen) for n in (n_q, n_k, n_k))
        ranges = sched.key_ranges(kind)
        mask_LS = dense_mask(ranges, n_q, n_k, device=dev)
        out = torch.empty_like(q)
        run_kernel = functools.partial(scale_masked_attention, q, k, v, ranges, out=out)
        run_sdpa = functools.partial(F.scaled_dot_product_attention, q, k, v, attn_mask=mask_LS)
        ms_kernel = _time_cuda(run_kernel, warmup, repeats)
        ms_sdpa = _time_cuda(run_sdpa, warmup, repeats)
        ref = run_sdpa()
        flops = attention_cost(ranges, batch, H, c, dtype_bytes)["flops"]
        results[kind] = {
            "ms_kernel": ms_kernel,
            "ms_sdpa_dense_mask": ms_sdpa,
            "tflops_kernel": flops / ms_kernel / 1e9,
            "tflops_sdpa": flops / ms_sdpa / 1e9,
            "speedup": ms_sdpa / ms_kernel,
            "max_abs_diff": (out.float() - ref.float()).abs().max().item(),
            "queries": n_q,
            "keys": n_k,
        }
        log.info("%s %s: kernel %.3f ms, SDPA %.3f ms", preset_name, kind, ms_kernel, ms_sdpa)
    return {
        "preset": preset_name,
        "device": torch.cuda.get_device_name(dev),
        "dtype": str(dtype).removeprefix("torch."),
        "batch": batch,
        "heads": H,
        "head_dim": c,
        "warmup": warmup,
        "repeats": repeats,
        "triton": triton.__version__ if HAS_TRITON else None,
        "torch": torch.__version__,
        "kinds": results,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m mindhier_rt.kernels.scale_attention_costs [--preset P] [--benchmark]``: print costs (and timings)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mindhier-512")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--benchmark", action="store_true", help="time kernel vs SDPA (needs a CUDA GPU)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    report: dict[str, Any] = {
        "costs": cost_report(args.preset, args.batch, torch.empty((), dtype=dtype).element_size())
    }
    if args.benchmark:
        report["benchmark"] = benchmark(args.preset, args.batch, dtype)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
