"""GPU benchmark: eager vs fast torch backend end to end, the attention kernels vs dense-mask SDPA, the floor.

Run by ``benchmarks/gpu_check.sh`` on a GPU machine; also runs on the CPU with ``--device cpu --presets tiny``
to check the plumbing (numbers then mean nothing). For each preset (random weights) it times the decode loop
(``pipeline.reconstruct``: encoder + context step + every scale + VQ decode, guidance on at every scale) with

- ``eager``: ``TorchBackend`` with the encoder and generator in ``--dtype`` (the same precision as the fast path),
- ``fast``: ``FastTorchBackend`` (static buffers, one CUDA graph per scale, Triton attention, fused norm kernels,
  ``--dtype``),
- ``fast_unfused``: the same without the fused kernels (``fused=False``), at batch 1 / 1 sample only, to
  measure what the fusion gives (if the fused kernels fail on the GPU, ``fast`` is timed unfused and the row
  says why in ``fused_error``),

taking turns run by run, median of ``--repeats`` after ``--warmup`` runs, at every (batch, samples) pair. Next to
each number: the compute floor of that decode, the sum over phases of max(FLOPs / measured matmul rate,
bytes / measured copy bandwidth), from the cost model ``mindhier_rt.costs``, and how far the measurement is from it.
Then the image decoder alone in float32, float16 and bfloat16, NCHW and channels-last (``bench_decoder``), and the
kernels: ``mindhier_rt.kernels.scale_attention.benchmark`` on the teacher-forced pyramid of each preset.

    python benchmarks/gpu_bench.py --out results/ [--presets mindhier-256,mindhier-512] [--batches 1,4]
        [--samples 1,4] [--repeats 5] [--warmup 2] [--dtype bfloat16] [--device cuda]

Writes ``gpu_bench.json`` and ``gpu_bench.md`` (a table) to ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mindhier_rt.config import preset
from mindhier_rt.costs import decode_costs
from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.pipeline import reconstruct
from mindhier_rt.runtime.torch_backend import TorchBackend
from mindhier_rt.runtime.torch_fast import HALF_DTYPES, FastTorchBackend
from mindhier_rt.sampling import SamplingConfig

TARGET_MS = {"mindhier-512": 60.0}  # issue 5: 1 scan, 1 sample, guidance on, one H100


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_rates(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Matmul rate (FLOP/s of an n x n x n product in ``dtype``) and copy bandwidth (bytes read + written / s)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm = _median_seconds(lambda: a @ b, device, repeats=10, warmup=3)
    src = torch.empty(256 << 20 if device.type == "cuda" else 16 << 20, device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    cp = _median_seconds(lambda: dst.copy_(src), device, repeats=10, warmup=3)
    return {"matmul_flops_per_s": 2 * n**3 / mm, "copy_bytes_per_s": 2 * src.numel() / cp, "matmul_n": n}


def floor_seconds(costs, rates: dict[str, float]) -> float:
    """Sum over phases of max(compute time at the measured matmul rate, traffic time at the copy bandwidth)."""
    phases = [costs.encode, costs.context, *costs.steps, *costs.updates, costs.decode]
    return sum(max(c.flops / rates["matmul_flops_per_s"], c.bytes / rates["copy_bytes_per_s"]) for c in phases)


def bench_preset(
    name: str, args: argparse.Namespace, rates: dict[str, float]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    device, dtype = torch.device(args.device), HALF_DTYPES[args.dtype]
    t0 = time.perf_counter()
    models = MindHier.from_config(preset(name), seed=0).eval()
    print(f"[{name}] random weights in {time.perf_counter() - t0:.1f} s", flush=True)
    eager = TorchBackend(copy.deepcopy(models), device=device, dtype=dtype)
    unfused = FastTorchBackend(copy.deepcopy(models), device=device, dtype=args.dtype, fused=False)
    fast = FastTorchBackend(models, device=device, dtype=args.dtype)
    del models
    cfg = fast.cfg
    subject = cfg.encoder.subjects[0][0]
    sampling = SamplingConfig(cfg_scale=6.0, seed=0)
    fused_error = None
    try:  # the fused kernels' first run on this GPU: if they fail, time the fast path without them
        reconstruct(fast, torch.randn(1, cfg.encoder.voxel_count(subject)), subject, sampling)
    except Exception as e:
        if not fast.fused:
            raise
        fused_error = f"{type(e).__name__}: {e}"
        print(f"[{name}] the fast backend failed with its fused kernels ({fused_error}); timing it unfused", flush=True)
        fast = unfused
    rows = []
    for batch in args.batches:
        for samples in args.samples:
            voxels = torch.randn(batch, cfg.encoder.voxel_count(subject), generator=torch.Generator().manual_seed(0))
            times: dict[str, list[float]] = {"eager": [], "fast": [], "fast_unfused": []}
            backends = [("eager", eager), ("fast", fast)]
            if (batch, samples) == (1, 1) and fast.fused:
                backends.append(("fast_unfused", unfused))
            for r in range(args.warmup + args.repeats):
                for label, backend in backends if r % 2 == 0 else backends[::-1]:
                    _sync(device)
                    t = time.perf_counter()
                    rec = reconstruct(backend, voxels, subject, sampling, samples=samples)
                    _sync(device)
                    if r >= args.warmup:
                        times[label].append(time.perf_counter() - t)
            costs = decode_costs(cfg, batch, samples, sampling, subject, args.dtype)
            floor = floor_seconds(costs, rates)
            eager_ms = 1e3 * statistics.median(times["eager"])
            fast_ms = 1e3 * statistics.median(times["fast"])
            row = {
                "preset": name,
                "batch": batch,
                "samples": samples,
                "generator_rows": costs.context.rows,
                "eager_ms": eager_ms,
                "fast_ms": fast_ms,
                "speedup": eager_ms / fast_ms,
                "floor_ms": 1e3 * floor,
                "fast_over_floor": fast_ms / (1e3 * floor),
                "flops": costs.total.flops,
                "bytes": costs.total.bytes,
                "eager_runs_ms": [1e3 * t for t in times["eager"]],
                "fast_runs_ms": [1e3 * t for t in times["fast"]],
                "fast_unfused_ms": 1e3 * statistics.median(times["fast_unfused"]) if times["fast_unfused"] else None,
                "image_shape": list(rec.images_NS3HW.shape),
                "fused_error": fused_error,
            }
            target = TARGET_MS.get(name) if (batch, samples) == (1, 1) else None
            if target is not None:
                row["target_ms"] = target
            rows.append(row)
            print(
                f"[{name}] batch {batch} samples {samples}: eager {eager_ms:.1f} ms, fast {fast_ms:.1f} ms "
                f"({eager_ms / fast_ms:.2f}x), floor {1e3 * floor:.1f} ms (fast at {fast_ms / (1e3 * floor):.2f}x)",
                flush=True,
            )
    try:  # a failure here must not cost the end-to-end rows above
        rows_decoder = bench_decoder(fast, args)
    except Exception as e:  # recorded in the results and printed
        print(f"[{name}] decoder benchmark failed: {type(e).__name__}: {e}", flush=True)
        rows_decoder = [{"preset": name, "error": f"{type(e).__name__}: {e}"}]
    del eager, fast, unfused
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, rows_decoder


DECODER_VARIANTS = (("float32", "nchw"), ("float16", "nchw"), ("float16", "channels_last"), ("bfloat16", "nchw"))


def bench_decoder(fast: FastTorchBackend, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The VQ-VAE image decoder alone in each (dtype, layout) of ``DECODER_VARIANTS``, eager launches (no graph),
    taking turns; max per-pixel distance to float32. Restores the backend's own setting afterwards."""
    device, cfg = fast.device, fast.cfg
    own = (fast.decoder_dtype, fast.decoder_layout)
    n = cfg.schedule.last_side
    out = []
    for batch in args.batches:
        f_hat = torch.randn(batch, cfg.latent_dim, n, n, device=device)
        times: dict[tuple[str, str], list[float]] = {v: [] for v in DECODER_VARIANTS}
        images: dict[tuple[str, str], torch.Tensor] = {}
        for r in range(args.warmup + args.repeats):
            for variant in DECODER_VARIANTS if r % 2 == 0 else DECODER_VARIANTS[::-1]:
                fast.decoder_dtype = HALF_DTYPES[variant[0]]
                fast.set_decoder_layout(variant[1])
                with torch.inference_mode():
                    _sync(device)
                    t = time.perf_counter()
                    images[variant] = fast._decode_eager(f_hat)
                    _sync(device)
                if r >= args.warmup:
                    times[variant].append(time.perf_counter() - t)
        ref = images[("float32", "nchw")]
        for variant in DECODER_VARIANTS:
            ms = 1e3 * statistics.median(times[variant])
            diff = float((images[variant] - ref).abs().max())
            out.append({"preset": cfg.name, "batch": batch, "dtype": variant[0], "layout": variant[1], "ms": ms,
                        "max_abs_vs_float32": diff})  # fmt: skip
            print(f"[{cfg.name}] decoder batch {batch} {variant[0]} {variant[1]}: {ms:.2f} ms (max {diff:.4f})")
    fast.decoder_dtype = own[0]
    fast.set_decoder_layout(own[1])
    return out


def bench_kernels(names: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    try:
        from mindhier_rt.kernels.scale_attention import HAS_TRITON, benchmark
    except ImportError as e:
        return [{"skipped": f"kernel module not importable: {e}"}]
    if not HAS_TRITON or args.device != "cuda":
        return [{"skipped": "the kernel benchmark needs Triton and a CUDA device"}]
    out = []
    for name in names:
        result = benchmark(preset_name=name, batch=2, dtype=HALF_DTYPES[args.dtype])
        print(f"[{name}] kernels: {json.dumps(result)[:400]}", flush=True)
        out.append({"preset": name, **result})
    return out


def machine(device: torch.device) -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, sm_count=p.multi_processor_count, memory_gib=p.total_memory / 2**30)
        info["compute_capability"] = f"{p.major}.{p.minor}"
    return info


def to_markdown(result: dict[str, Any]) -> str:
    m, r = result["machine"], result["rates"]
    lines = [
        f"# GPU benchmark on {m.get('gpu', m['device'])}",
        "",
        f"torch {m['torch']}, triton {m['triton']}, dtype {result['dtype']}; measured matmul rate "
        f"{r['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s ({r['matmul_n']}^3), copy bandwidth "
        f"{r['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + written).",
        "",
        f"Command: `{result['command']}`",
        "",
        "| preset | batch | samples | rows | eager ms | fast ms | fast unfused ms | speedup | floor ms | fast / floor "
        "| target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["end_to_end"]:
        unfused = "-" if row.get("fast_unfused_ms") is None else f"{row['fast_unfused_ms']:.1f}"
        target = "-"
        if "target_ms" in row:
            target = f"{row['target_ms']:.0f} ms: {'met' if row['fast_ms'] <= row['target_ms'] else 'not met'}"
        lines.append(
            f"| {row['preset']} | {row['batch']} | {row['samples']} | {row['generator_rows']} | {row['eager_ms']:.1f} "
            f"| {row['fast_ms']:.1f} | {unfused} | {row['speedup']:.2f}x | {row['floor_ms']:.1f} "
            f"| {row['fast_over_floor']:.2f} | {target} |"
        )
    failed = {row["preset"]: row["fused_error"] for row in result["end_to_end"] if row.get("fused_error")}
    for preset_name, error in failed.items():
        lines += ["", f"**{preset_name}: the fused kernels failed ({error}); its fast column is unfused.**"]
    lines += [
        "",
        "Image decoder alone (eager launches), by precision and layout:",
        "",
        "| preset | batch | dtype | layout | ms | max abs vs float32 |",
        "|---|---|---|---|---|---|",
    ]
    for d in result["decoder"]:
        if "error" in d:
            lines.append(f"| {d['preset']} | failed: {d['error']} | | | | |")
            continue
        lines.append(
            f"| {d['preset']} | {d['batch']} | {d['dtype']} | {d['layout']} | {d['ms']:.2f} "
            f"| {d['max_abs_vs_float32']:.4f} |"
        )
    lines += ["", "Kernels (teacher-forced pyramid, vs SDPA with the dense mask):", "", "```"]
    lines += [json.dumps(k) for k in result["kernels"]]
    lines += ["```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--presets", default="mindhier-256,mindhier-512")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--samples", default="1,4")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(HALF_DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    args.batches = [int(x) for x in args.batches.split(",")]
    args.samples = [int(x) for x in args.samples.split(",")]
    names = [x.strip() for x in args.presets.split(",") if x.strip()]
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rates = measure_rates(device, HALF_DTYPES[args.dtype])
    print(f"rates: {rates}", flush=True)
    result: dict[str, Any] = {
        "command": "python benchmarks/gpu_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(device),
        "dtype": args.dtype,
        "rates": rates,
        "end_to_end": [],
        "decoder": [],
        "kernels": bench_kernels(names, args),
    }
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> str:  # after every preset, so that a run cut short keeps what finished
        (args.out / "gpu_bench.json").write_text(json.dumps(result, indent=2))
        md = to_markdown(result)
        (args.out / "gpu_bench.md").write_text(md)
        return md

    save()
    for name in names:
        end_to_end, decoder = bench_preset(name, args, rates)
        result["end_to_end"] += end_to_end
        result["decoder"] += decoder
        md = save()
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
