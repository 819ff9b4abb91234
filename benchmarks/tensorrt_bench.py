"""TensorRT benchmark: build plans for a random-weight bundle of each preset and time the decode loop on them.

Run by ``benchmarks/gpu_check.sh`` on a GPU machine with TensorRT (it calls ``--out "$OUT"`` and nothing else,
under a 200 s timeout, so the defaults fit that: the small preset first, then mindhier-256 while the time
budget lasts; mindhier-512 needs ``--presets mindhier-512`` and minutes of export and build).

    python benchmarks/tensorrt_bench.py --out FOLDER
        [--presets small,mindhier-256]   presets to export (random weights, seed 0), in this order
        [--batches 1,4]                  scans per decode; plans are rebuilt for each (static shapes)
        [--samples 1]                    samples per scan
        [--precision fp16]               fp16 / fp32 (strongly typed: the bundle is exported in that dtype);
                                         bf16 builds a float32 bundle with TensorRT 10's BF16 flag
        [--kv-cache auto]                block-causal presets: auto / in-place / ping-pong
        [--memory torch]                 torch or cuda-python device memory
        [--repeats 5] [--warmup 2]       timed decodes (median reported) after untimed ones
        [--budget-s 180]                 start no new preset / batch after this many seconds
        [--workdir DIR]                  where bundles and the timing cache go (default: a temp folder)

For each (preset, batch) it records the export and build times, the plan sizes, the cache mode and the decode
loop end to end (``pipeline.reconstruct``: encoders, context step, every scale's step and VQ update, VQ decode;
guidance on at every scale, sampling on the GPU), median / min / max ms over ``--repeats``, and the peak GPU
memory torch saw. Writes ``tensorrt_bench.json`` and ``tensorrt_bench.md`` to ``--out`` after every result (so a
timeout keeps what finished) and nothing else there; prints the card name first and the table last.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mindhier_rt.config import preset
from mindhier_rt.errors import MindhierError
from mindhier_rt.io import atomic_write_text, write_json
from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.pipeline import reconstruct
from mindhier_rt.sampling import SamplingConfig

EXPORT_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "float32"}


def _median_ms(fn, repeats: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def _table(results: list[dict[str, Any]]) -> str:
    head = "| preset | batch | samples | precision | self cache | build s | plans MB | decode ms (median) | min | max |"
    lines = [head, "|" + "---|" * 10]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['batch']} | {r['samples']} | {r['precision']} | error: {r['error']} |")
            continue
        d = r["decode"]
        lines.append(
            f"| {r['preset']} | {r['batch']} | {r['samples']} | {r['precision']} | {r['self_cache']} | "
            f"{r['build_s']:.0f} | {r['plans_mb']:.0f} | {d['median_ms']:.1f} | {d['min_ms']:.1f} | {d['max_ms']:.1f} |"
        )
    return "\n".join(lines)


def _write(out: Path, meta: dict[str, Any], results: list[dict[str, Any]]) -> None:
    write_json(out / "tensorrt_bench.json", {**meta, "results": results})
    text = [
        f"# TensorRT decode loop on {meta['gpu']}",
        "",
        f"TensorRT {meta['tensorrt']}, torch {meta['torch']}; random weights; guidance on at every scale; "
        f"median of {meta['settings']['repeats']} decodes after {meta['settings']['warmup']}. Command: "
        f"`{meta['command']}`",
        "",
        _table(results),
        "",
    ]
    atomic_write_text(out / "tensorrt_bench.md", "\n".join(text))


def run(args: argparse.Namespace) -> int:
    from mindhier_rt.export.onnx_export import export_bundle
    from mindhier_rt.export.tensorrt_build import BuildOptions, build_plans, require_tensorrt
    from mindhier_rt.runtime.tensorrt_backend import TensorRTBackend

    trt = require_tensorrt()
    if not torch.cuda.is_available():
        print("error: no CUDA GPU visible", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name()
    print(f"GPU: {gpu}; TensorRT {trt.__version__}; torch {torch.__version__}", flush=True)
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mindhier-trt-"))
    meta = {
        "gpu": gpu,
        "tensorrt": trt.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(["python", *sys.argv]),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    results: list[dict[str, Any]] = []
    batches = [int(b) for b in args.batches.split(",")]
    sampling = SamplingConfig(seed=0)
    for name in [p.strip() for p in args.presets.split(",") if p.strip()]:
        if time.perf_counter() - t_start > args.budget_s:
            print(f"time budget spent: {name} skipped", flush=True)
            break
        cfg = preset(name)
        subject = cfg.encoder.subjects[0][0]
        models = MindHier.from_config(cfg, seed=0).eval()
        root = workdir / name
        t0 = time.perf_counter()
        export_bundle(
            models, root, dtype=EXPORT_DTYPE[args.precision], batch=max(batches), samples=args.samples,
            sampling=sampling, subjects=[subject],
        )  # fmt: skip
        export_s = time.perf_counter() - t0
        print(f"{name}: exported in {export_s:.0f} s", flush=True)
        voxels = torch.randn(max(batches), cfg.encoder.voxel_count(subject), generator=torch.Generator().manual_seed(0))
        for batch in batches:
            if time.perf_counter() - t_start > args.budget_s:
                print(f"time budget spent: {name} batch {batch} skipped", flush=True)
                break
            entry: dict[str, Any] = {
                "preset": name,
                "batch": batch,
                "samples": args.samples,
                "precision": args.precision,
            }
            try:
                options = BuildOptions(
                    precision=args.precision, timing_cache=workdir / "timing.cache", scans=batch,
                    samples=args.samples, self_cache=args.kv_cache.replace("-", "_"),
                )  # fmt: skip
                report = build_plans(root, options)
                plans_mb = sum(report.bundle.path(p["file"]).stat().st_size for p in report.plans.values()) / 1e6
                backend = TensorRTBackend(report.bundle, memory=args.memory, verify=False)
                torch.cuda.reset_peak_memory_stats()
                decode = _median_ms(
                    lambda b=backend, v=voxels[:batch], s=subject: reconstruct(b, v, s, sampling, samples=args.samples),
                    args.repeats, args.warmup,
                )  # fmt: skip
                entry.update(
                    export_s=round(export_s, 1),
                    build_s=report.seconds,
                    plans_mb=plans_mb,
                    self_cache=report.self_cache,
                    decode=decode,
                    peak_gpu_mib=torch.cuda.max_memory_allocated() / 2**20,
                    build=report.bundle.manifest["plans"][report.bundle.manifest["tensorrt"]["step_graph"]],
                )
                entry["build"] = {k: v for k, v in entry["build"].items() if k != "profiles"}
                del backend
            except (MindhierError, RuntimeError) as e:
                entry["error"] = str(e).splitlines()[0][:300]
            results.append(entry)
            print(json.dumps({k: v for k, v in entry.items() if k != "build"}), flush=True)
            _write(args.out, meta, results)
    _write(args.out, meta, results)
    print(_table(results))
    return 0 if results and not all("error" in r for r in results) else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--presets", default="small,mindhier-256")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--precision", default="fp16", choices=sorted(EXPORT_DTYPE))
    parser.add_argument("--kv-cache", default="auto", choices=["auto", "in-place", "ping-pong"])
    parser.add_argument("--memory", default="torch", choices=["torch", "cuda-python"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=180.0)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    try:
        sys.exit(run(args))
    except MindhierError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
