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
Then, at batch 1 and 1 sample of each preset:

- ``float32``: eager and fast both in float32 (``bench_float32``): the fast path must be no slower;
- ``phases``: the fast backend's per-phase profile (``mindhier_rt.profile``), each phase against its target
  (``PHASE_TARGETS``) and its own floor, so that a missed target says what bounds it;
- ``compiled``: what a user would try first, the eager step under ``torch.compile`` (``--compile-mode``), in a
  child process capped at ``--compile-cap`` seconds, compile time reported, timed in turns with the fast backend.

Then the image decoder alone in float32, float16 and bfloat16, NCHW and channels-last (``bench_decoder``), and the
kernels: ``mindhier_rt.kernels.scale_attention_costs.benchmark`` on the teacher-forced pyramid of each preset.

    python benchmarks/gpu_bench.py --out results/ [--presets mindhier-256,mindhier-512] [--batches 1,4]
        [--samples 1,4] [--repeats 5] [--warmup 2] [--dtype bfloat16] [--device cuda]
        [--compile-mode reduce-overhead] [--compile-cap 150]

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

# Issue 14, one H100 or H200, bf16, batch 1, guidance on every scale: end to end by samples per scan ...
TARGET_MS = {"mindhier-512": {1: 40.0, 4: 120.0}}
# ... and per phase of the 1-sample decode: (phases, "max_ms" | "min_tflops", value)
PHASE_TARGETS = {
    "mindhier-512": [
        (("encode", "context"), "max_ms", 2.0),
        *(((f"step {i}",), "max_ms", 1.2) for i in range(6)),
        (tuple(f"step {i}" for i in range(6, 10)), "min_tflops", 600.0),
        (("decode",), "max_ms", 5.0),
    ]
}


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
    models_f32 = copy.deepcopy(models)  # for the float32 comparison (a copy is quicker than a second init)
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
            target = TARGET_MS.get(name, {}).get(samples) if batch == 1 else None
            if target is not None:
                row["target_ms"] = target
            rows.append(row)
            print(
                f"[{name}] batch {batch} samples {samples}: eager {eager_ms:.1f} ms, fast {fast_ms:.1f} ms "
                f"({eager_ms / fast_ms:.2f}x), floor {1e3 * floor:.1f} ms (fast at {fast_ms / (1e3 * floor):.2f}x)",
                flush=True,
            )
    extra: dict[str, Any] = {"preset": name}
    # a failure in any part below must not cost the rows above: each is recorded with its error and printed
    extra["phases"] = _guarded(name, "phase profile", bench_phases, fast, sampling, args, rates)
    rows_decoder = _guarded(name, "decoder benchmark", bench_decoder, fast, args)
    del eager, fast, unfused
    if device.type == "cuda":
        torch.cuda.empty_cache()
    extra["float32"] = _guarded(name, "float32 comparison", bench_float32, models_f32, args)
    extra["compiled"] = _guarded(name, "torch.compile row", bench_compiled_child, name, args)
    return rows, rows_decoder if isinstance(rows_decoder, list) else [rows_decoder], extra


def _guarded(name: str, what: str, fn: Any, *fn_args: Any) -> Any:
    try:
        return fn(*fn_args)
    except Exception as e:
        print(f"[{name}] {what} failed: {type(e).__name__}: {e}", flush=True)
        return {"preset": name, "error": f"{type(e).__name__}: {e}"}


def _phase_times(profile: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in profile["phases"]}


def bench_phases(
    fast: FastTorchBackend, sampling: SamplingConfig, args: argparse.Namespace, rates: dict[str, float]
) -> dict[str, Any]:
    """The fast backend's per-phase profile of one scan, 1 sample (phases synchronised), each phase against its
    target and its floor (max of FLOPs at the measured matmul rate and bytes at the copy bandwidth)."""
    from mindhier_rt.profile import profile_backend

    cfg = fast.cfg
    subject = cfg.encoder.subjects[0][0]
    profile = profile_backend(fast, subject, 1, 1, sampling, repeats=args.repeats, warmup=1)
    by_name = _phase_times(profile)
    phases = []
    for p in profile["phases"]:
        flops, nbytes = p.get("flops"), p.get("bytes")
        floor_ms = None
        if flops is not None and nbytes is not None:
            compute = flops / rates["matmul_flops_per_s"]
            traffic = nbytes / rates["copy_bytes_per_s"]
            floor_ms = 1e3 * max(compute, traffic)
            bound = "FLOPs" if compute >= traffic else "bytes"
        phases.append({
            "name": p["name"], "ms": p["median_ms"], "floor_ms": floor_ms, "floor_bound": bound if floor_ms else None,
            "tflops_per_s": None if flops is None else flops / p["median_ms"] / 1e9,
            "tbytes_per_s": None if nbytes is None else nbytes / p["median_ms"] / 1e9,
        })  # fmt: skip
    targets = evaluate_targets(by_name, PHASE_TARGETS.get(cfg.name, []))
    for t in targets:
        print(f"[{cfg.name}] target {'+'.join(t['phases'])} {t['kind']} {t['target']}: {t['measured']:.2f} "
              f"({'met' if t['met'] else 'not met'})")  # fmt: skip
    return {"preset": cfg.name, "end_to_end_ms": profile["end_to_end"]["median_ms"], "phases": phases,
            "targets": targets}  # fmt: skip


def evaluate_targets(by_name: dict[str, dict[str, Any]], targets: list[tuple]) -> list[dict[str, Any]]:
    """Each (phases, kind, value) target against profile phases by name: the phases' summed median ms against
    ``max_ms``, or their summed FLOPs over that time against ``min_tflops``."""
    out = []
    for names, kind, value in targets:
        ms = sum(by_name[n]["median_ms"] for n in names)
        flops = sum(by_name[n].get("flops") or 0 for n in names)
        got = ms if kind == "max_ms" else flops / ms / 1e9
        met = got <= value if kind == "max_ms" else got >= value
        out.append({"phases": list(names), "kind": kind, "target": value, "measured": got, "ms": ms, "met": met})
    return out


def bench_float32(models: MindHier, args: argparse.Namespace) -> dict[str, Any]:
    """Eager and fast backends both in float32 at batch 1, 1 sample, taking turns: the fast path must be no
    slower. TF32 is on for both (as everywhere in this script); the fast backend's float32 attention is SDPA."""
    device, name = torch.device(args.device), models.cfg.name
    eager = TorchBackend(copy.deepcopy(models), device=device, dtype=torch.float32)
    fast = FastTorchBackend(models, device=device, dtype="float32")
    subject = fast.cfg.encoder.subjects[0][0]
    voxels = torch.randn(1, fast.cfg.encoder.voxel_count(subject), generator=torch.Generator().manual_seed(0))
    sampling = SamplingConfig(cfg_scale=6.0, seed=0)
    times: dict[str, list[float]] = {"eager": [], "fast": []}
    pair = [("eager", eager), ("fast", fast)]
    for r in range(args.warmup + args.repeats):
        for label, backend in pair if r % 2 == 0 else pair[::-1]:
            _sync(device)
            t = time.perf_counter()
            reconstruct(backend, voxels, subject, sampling)
            _sync(device)
            if r >= args.warmup:
                times[label].append(time.perf_counter() - t)
    eager_ms, fast_ms = (1e3 * statistics.median(times[k]) for k in ("eager", "fast"))
    print(f"[{name}] float32: eager {eager_ms:.1f} ms, fast {fast_ms:.1f} ms ({eager_ms / fast_ms:.2f}x)")
    del eager, fast, models
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"preset": name, "eager_ms": eager_ms, "fast_ms": fast_ms, "fast_attention": "sdpa",
            "no_slower": fast_ms <= eager_ms}  # fmt: skip


def bench_compiled_child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """``bench_compiled`` in a child process, killed after ``--compile-cap`` seconds (compiling can take long)."""
    import subprocess

    cmd = [
        sys.executable, __file__, "--compiled-row", "--out", str(args.out), "--presets", name, "--dtype", args.dtype,
        "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--device", args.device,
        "--compile-mode", args.compile_mode, "--compile-backend", args.compile_backend,
    ]  # fmt: skip
    t0 = time.perf_counter()
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=args.compile_cap)
    except subprocess.TimeoutExpired:
        print(f"[{name}] torch.compile row: not done within the cap of {args.compile_cap} s", flush=True)
        return {"preset": name, "mode": args.compile_mode, "error": f"not done within the {args.compile_cap} s cap"}
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode != 0 or not lines:
        tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
        return {"preset": name, "mode": args.compile_mode, "error": " | ".join(tail)}
    row = json.loads(lines[-1])
    row["child_seconds"] = time.perf_counter() - t0
    print(f"[{name}] torch.compile ({args.compile_mode}): {row['compiled_ms']:.1f} ms vs fast {row['fast_ms']:.1f} ms, "
          f"compile {row['compile_s']:.0f} s", flush=True)  # fmt: skip
    return row


def bench_compiled(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The eager backend with its per-scale step under ``torch.compile(mode=args.compile_mode)`` (static shapes,
    one graph per scale), timed in turns with the fast backend; compile time = first decode minus a later one."""
    import torch._dynamo

    for knob in ("recompile_limit", "cache_size_limit"):  # one specialisation per scale: more than the default 8
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    device, dtype = torch.device(args.device), HALF_DTYPES[args.dtype]
    models = MindHier.from_config(preset(name), seed=0).eval()
    compiled = TorchBackend(copy.deepcopy(models), device=device, dtype=dtype)
    gen = compiled.models.generator
    inductor = args.compile_backend == "inductor"
    gen.step_embedded = torch.compile(  # what TorchBackend.step runs
        gen.step_embedded, backend=args.compile_backend, mode=args.compile_mode if inductor else None, dynamic=False
    )
    fast = FastTorchBackend(models, device=device, dtype=args.dtype)
    subject = fast.cfg.encoder.subjects[0][0]
    voxels = torch.randn(1, fast.cfg.encoder.voxel_count(subject), generator=torch.Generator().manual_seed(0))
    sampling = SamplingConfig(cfg_scale=6.0, seed=0)

    def run(backend: Any) -> float:
        _sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            reconstruct(backend, voxels, subject, sampling)
        _sync(device)
        return time.perf_counter() - t

    first = run(compiled)
    times: dict[str, list[float]] = {"compiled": [], "fast": []}
    pair = [("compiled", compiled), ("fast", fast)]
    for r in range(max(args.warmup, 2) + args.repeats):  # reduce-overhead records its graphs in the first runs
        for label, backend in pair if r % 2 == 0 else pair[::-1]:
            t = run(backend)
            if r >= max(args.warmup, 2):
                times[label].append(t)
    compiled_ms, fast_ms = (1e3 * statistics.median(times[k]) for k in ("compiled", "fast"))
    return {"preset": name, "mode": args.compile_mode, "backend": args.compile_backend,
            "what": "eager backend, generator step compiled",
            "compile_s": first - compiled_ms / 1e3, "compiled_ms": compiled_ms, "fast_ms": fast_ms}  # fmt: skip


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
        from mindhier_rt.kernels.scale_attention import HAS_TRITON
        from mindhier_rt.kernels.scale_attention_costs import benchmark
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
    for extra in result.get("extra", []):
        lines += _extra_markdown(extra)
    lines += ["", "Kernels (teacher-forced pyramid, vs SDPA with the dense mask):", "", "```"]
    lines += [json.dumps(k) for k in result["kernels"]]
    lines += ["```", ""]
    return "\n".join(lines)


def _extra_markdown(extra: dict[str, Any]) -> list[str]:
    name = extra["preset"]
    lines = ["", f"## {name}: batch 1, 1 sample", ""]
    ph = extra.get("phases", {})
    if "error" in ph:
        lines.append(f"Phase profile failed: {ph['error']}")
    elif ph:
        lines += [f"Fast backend per phase (synchronised; end to end {ph['end_to_end_ms']:.1f} ms):", "",
                  "| phase | ms | floor ms | floor bound | TFLOP/s | TB/s |", "|---|---|---|---|---|---|"]  # fmt: skip
        for p in ph["phases"]:
            f = lambda x, fmt: "-" if x is None else format(x, fmt)  # noqa: E731
            lines.append(f"| {p['name']} | {p['ms']:.2f} | {f(p['floor_ms'], '.2f')} | {p['floor_bound'] or '-'} "
                         f"| {f(p['tflops_per_s'], '.3g')} | {f(p['tbytes_per_s'], '.3g')} |")  # fmt: skip
        if ph["targets"]:
            lines += ["", "| target | measured | met |", "|---|---|---|"]
            for t in ph["targets"]:
                unit = "ms" if t["kind"] == "max_ms" else "TFLOP/s"
                rel = "<=" if t["kind"] == "max_ms" else ">="
                lines.append(f"| {' + '.join(t['phases'])} {rel} {t['target']:g} {unit} | {t['measured']:.2f} {unit} "
                             f"| {'met' if t['met'] else 'not met'} |")  # fmt: skip
    f32 = extra.get("float32", {})
    if f32:
        lines += ["", "Float32: " + (f"failed: {f32['error']}" if "error" in f32 else
                  f"eager {f32['eager_ms']:.1f} ms, fast {f32['fast_ms']:.1f} ms "
                  f"({'no slower' if f32['no_slower'] else 'SLOWER'})")]  # fmt: skip
    comp = extra.get("compiled", {})
    if comp:
        text = comp.get("error") or (
            f"{comp['compiled_ms']:.1f} ms vs fast {comp['fast_ms']:.1f} ms, compile {comp['compile_s']:.0f} s"
        )
        lines += ["", f"torch.compile ({comp.get('mode')}): {text}"]
    return lines


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
    p.add_argument("--compile-mode", default="reduce-overhead", help="torch.compile mode of the compiled row")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (the CPU test uses eager)")
    p.add_argument("--compile-cap", type=float, default=150.0, help="seconds the compiled row may take in all")
    p.add_argument("--compiled-row", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    args.batches = [int(x) for x in args.batches.split(",")]
    args.samples = [int(x) for x in args.samples.split(",")]
    names = [x.strip() for x in args.presets.split(",") if x.strip()]
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.compiled_row:
        print(json.dumps(bench_compiled(names[0], args)), flush=True)
        return 0
    rates = measure_rates(device, HALF_DTYPES[args.dtype])
    print(f"rates: {rates}", flush=True)
    result: dict[str, Any] = {
        "command": "python benchmarks/gpu_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(device),
        "dtype": args.dtype,
        "rates": rates,
        "end_to_end": [],
        "decoder": [],
        "extra": [],
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
        end_to_end, decoder, extra = bench_preset(name, args, rates)
        result["end_to_end"] += end_to_end
        result["decoder"] += decoder
        result["extra"].append(extra)
        md = save()
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
