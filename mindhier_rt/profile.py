"""Phase-by-phase profiling of a decode backend through the one decode loop, ``pipeline.reconstruct``.

``profile_backends`` wraps each backend in a proxy that times ``encode``, ``prepare`` (the context step),
``step``, ``choose_tokens`` (guidance combine + token draw: the "sample" phase) and ``update`` (per scale) and
``decode_image``, and forwards everything else untouched. Nothing in the pipeline or the backends changes, so
the loop measured is the loop that decodes. Several backends
take turns run by run, so that they are compared over the same stretch of machine time. Each phase is
reported as the median (and min, max) over ``repeats`` runs after ``warmup`` untimed runs, next to the
cost model's FLOPs and bytes (``mindhier_rt.costs``), the arithmetic intensity and, from the median
time, the achieved GFLOP/s and GB/s. ``format_table`` lays several backends' results side by side.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

import mindhier_rt.pipeline as pipeline
from mindhier_rt.config import ModelConfig
from mindhier_rt.costs import Cost, decode_costs
from mindhier_rt.errors import ConfigError, InputError
from mindhier_rt.runtime.base import DecodeBackend, ScaleUpdate
from mindhier_rt.sampling import SamplingConfig

log = logging.getLogger(__name__)

__all__ = ["format_table", "machine_info", "profile_backend", "profile_backends"]


class _Timer:
    """Accumulates wall-clock seconds per phase name for the current run."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[phase] += time.perf_counter() - t0

    def reset(self) -> None:
        self.seconds = defaultdict(float)


class TimedBackend:
    """Proxy of a backend that times the contract's compute methods; any other attribute is forwarded."""

    def __init__(self, backend: DecodeBackend, timer: _Timer) -> None:
        self._backend = backend
        self._timer = timer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def encode(self, voxels_BV: Tensor, subject: str) -> tuple[Tensor, Tensor]:
        with self._timer("encode"):
            return self._backend.encode(voxels_BV, subject)

    def prepare(self, pooled_BD: Tensor, context_BSD: Tensor) -> Any:
        with self._timer("context"):
            return self._backend.prepare(pooled_BD, context_BSD)

    def step(self, i: int, state: Any, h_BlC: Tensor | None) -> Tensor:
        with self._timer(f"step {i}"):
            return self._backend.step(i, state, h_BlC)

    def choose_tokens(
        self,
        logits_BlV: Tensor,
        scfg: SamplingConfig,
        scale: int,
        guidance: float | None,
        scan_ids: Tensor,
        sample_ids: Tensor,
    ) -> Tensor:
        with self._timer(f"sample {scale}"):
            return self._backend.choose_tokens(logits_BlV, scfg, scale, guidance, scan_ids, sample_ids)

    def update(self, i: int, f_hat_BEhw: Tensor, idx_Bl: Tensor) -> ScaleUpdate:
        with self._timer(f"update {i}"):
            return self._backend.update(i, f_hat_BEhw, idx_Bl)

    def decode_image(self, f_hat_BEhw: Tensor) -> Tensor:
        with self._timer("decode"):
            return self._backend.decode_image(f_hat_BEhw)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class _PeakMemory:
    """Peak memory over a block: CUDA allocator peak, or the process's peak RSS (VmHWM) on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset_done = False
        self.note = ""
        self.rss_at_reset: int | None = None

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.reset_done = True
            return
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
            self.reset_done = True
        except OSError as e:
            self.note = f"peak RSS could not be reset ({e}): it is the process peak since start"
            log.info("%s", self.note)
        rss = _status_kib("VmRSS")
        self.rss_at_reset = None if rss is None else rss * 1024

    def read(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            return {
                "kind": "cuda_max_memory_allocated",
                "peak_bytes": int(torch.cuda.max_memory_allocated(self.device)),
                "reset": self.reset_done,
                "note": "torch's CUDA allocator only (memory of other runtimes is not seen)",
            }
        hwm = _status_kib("VmHWM")
        note = self.note or "process peak RSS (VmHWM) after a reset: includes everything resident in the process"
        if hwm is None:
            note = "no /proc/self/status here: peak RSS unknown"
        return {
            "kind": "peak_rss",
            "peak_bytes": None if hwm is None else hwm * 1024,
            "rss_at_reset_bytes": self.rss_at_reset,
            "reset": self.reset_done,
            "note": note,
        }


# ---- statistics --------------------------------------------------------------------------------
def _stats(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1e3 for s in seconds]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms)}


def _phase_entry(name: str, seconds: list[float], cost: Cost | None, scale: int | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "scale": scale, **_stats(seconds)}
    if cost is not None:
        median_s = entry["median_ms"] / 1e3
        entry.update(
            flops=cost.flops,
            bytes=cost.bytes,
            intensity=cost.intensity,
            gflops_per_s=cost.flops / median_s / 1e9 if median_s > 0 else None,
            gbytes_per_s=cost.bytes / median_s / 1e9 if median_s > 0 else None,
        )
    return entry


def _backend_dtype(backend: DecodeBackend) -> str:
    dtype = getattr(backend, "dtype", None)
    if dtype is not None:
        return str(dtype).removeprefix("torch.")
    models = getattr(backend, "models", None)
    if models is not None:
        return str(next(models.generator.parameters()).dtype).removeprefix("torch.")
    return "float32"


# ---- the profiler ------------------------------------------------------------------------------
class _Session:
    """One backend's timer, timed proxy, memory probe and collected runs."""

    def __init__(self, backend: DecodeBackend) -> None:
        self.backend = backend
        self.timer = _Timer(backend.device)
        self.proxy = TimedBackend(backend, self.timer)
        self.memory = _PeakMemory(backend.device)
        self.mem: dict[str, Any] | None = None
        self.runs: list[dict[str, float]] = []
        self.e2e: list[float] = []

    def run_once(self, voxels: Tensor, subject: str, sampling: SamplingConfig, samples: int, keep: bool) -> None:
        first = self.mem is None
        if first:
            self.memory.reset()
        self.timer.reset()
        t0 = time.perf_counter()
        pipeline.reconstruct(self.proxy, voxels, subject, sampling, samples=samples)
        if self.backend.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if first:
            self.mem = self.memory.read()
        if keep:
            self.runs.append(dict(self.timer.seconds))
            self.e2e.append(seconds)
        log.debug("%s run: %.1f ms", self.backend.name, seconds * 1e3)


def profile_backend(
    backend: DecodeBackend,
    subject: str,
    batch: int,
    samples: int,
    sampling: SamplingConfig,
    repeats: int = 5,
    warmup: int = 1,
    voxels: Tensor | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """``profile_backends`` of one backend."""
    return profile_backends([backend], subject, batch, samples, sampling, repeats, warmup, voxels, seed)[0]


def profile_backends(
    backends: list[DecodeBackend],
    subject: str,
    batch: int,
    samples: int,
    sampling: SamplingConfig,
    repeats: int = 5,
    warmup: int = 1,
    voxels: Tensor | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Time every phase of ``reconstruct`` on each backend: ``batch`` scans x ``samples`` draws each.

    The backends take turns: every round runs each of them once, the order rotating between rounds, so
    that a machine whose speed drifts (shared VMs, turbo, thermals) slows them alike and the ratios hold.
    ``voxels`` default to seeded standard-normal voxels of ``subject``'s voxel count. Returns one
    JSON-ready dict per backend: settings, ``phases`` (a list of entries with ``name``, median/min/max ms
    and, where the cost model covers the phase, flops, bytes, intensity, GFLOP/s and GB/s), ``scales``
    (per scale: tokens, rows and the step, update and sampling timings), ``end_to_end`` (median, min, max
    ms), ``memory`` (peak over the backend's first run) and ``costs``; every backend after the first also
    gets ``paired_ratio``: the median over rounds of its end-to-end time over the first backend's.
    ``sample`` is ``choose_tokens`` (guidance combine + draw); ``other`` is the rest of the loop's own work
    (concatenations, copies, thread settings): end to end minus the timed phases.
    """
    if not backends:
        raise ConfigError("profile_backends needs at least one backend")
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if batch < 1 or samples < 1:
        raise ConfigError(f"batch and samples must be >= 1, got {batch} and {samples}")
    cfg = backends[0].cfg
    if voxels is None:
        gen = torch.Generator().manual_seed(seed)
        voxels = torch.randn(batch, cfg.encoder.voxel_count(subject), generator=gen)
    elif voxels.ndim != 2 or voxels.shape[0] != batch:
        raise InputError(f"expected voxels [batch={batch}, voxels], got shape {tuple(voxels.shape)}")

    sessions = [_Session(b) for b in backends]
    for r in range(warmup + repeats):
        k = r % len(sessions)
        for session in sessions[k:] + sessions[:k]:
            session.run_once(voxels, subject, sampling, samples, keep=r >= warmup)
    results = [_summarise(s, cfg, subject, batch, samples, sampling, repeats, warmup) for s in sessions]
    for session, result in zip(sessions[1:], results[1:], strict=True):
        ratios = [t / t0 for t, t0 in zip(session.e2e, sessions[0].e2e, strict=True)]
        result["paired_ratio"] = {"to": results[0]["backend"], **_ratio_stats(ratios)}
    return results


def _ratio_stats(ratios: list[float]) -> dict[str, float]:
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def _summarise(
    session: _Session,
    cfg: ModelConfig,
    subject: str,
    batch: int,
    samples: int,
    sampling: SamplingConfig,
    repeats: int,
    warmup: int,
) -> dict[str, Any]:
    backend, runs, e2e = session.backend, session.runs, session.e2e
    K = cfg.schedule.n_scales
    costs = decode_costs(cfg, batch, samples, sampling, subject, _backend_dtype(backend))
    mem = {**(session.mem or {}), "over": "the backend's first run"}

    def series(name: str) -> list[float]:
        return [run.get(name, 0.0) for run in runs]

    steps_total = [sum(run.get(f"step {i}", 0.0) for i in range(K)) for run in runs]
    updates_total = [sum(run.get(f"update {i}", 0.0) for i in range(K)) for run in runs]
    sample_total = [sum(v for k, v in run.items() if k.startswith("sample ")) for run in runs]
    timed_total = [sum(run.values()) for run in runs]  # encode, context, steps, updates, sampling, decode
    other = [max(t - s, 0.0) for t, s in zip(e2e, timed_total, strict=True)]

    phases = [
        _phase_entry("encode", series("encode"), costs.encode),
        _phase_entry("context", series("context"), costs.context),
    ]
    phases += [_phase_entry(f"step {i}", series(f"step {i}"), costs.steps[i], i) for i in range(K)]
    phases.append(_phase_entry("step (all)", steps_total, Cost.total("steps", costs.steps)))
    phases += [_phase_entry(f"update {i}", series(f"update {i}"), costs.updates[i], i) for i in range(K)]
    phases.append(_phase_entry("update (all)", updates_total, Cost.total("updates", costs.updates)))
    phases.append(_phase_entry("sample (all)", sample_total, None))
    phases.append(_phase_entry("decode", series("decode"), costs.decode))
    phases.append(_phase_entry("other", other, None))
    phases.append(_phase_entry("end to end", e2e, costs.total))

    sched = cfg.schedule
    scales = [
        {
            "scale": i,
            "patch_num": sched.patch_nums[i],
            "tokens": sched.token_counts[i],
            "step_rows": costs.steps[i].rows,
            "update_rows": costs.updates[i].rows,
            "step": _stats(series(f"step {i}")),
            "update": _stats(series(f"update {i}")),
            "sample": _stats(series(f"sample {i}")),
        }
        for i in range(K)
    ]
    result = {
        "backend": backend.name,
        "device": str(backend.device),
        "dtype": _backend_dtype(backend),
        "config": cfg.name,
        "attn_mode": cfg.generator.attn_mode,
        "subject": subject,
        "batch": batch,
        "samples": samples,
        "rows": {"conditional": batch * samples, "generator": costs.context.rows},
        "sampling": sampling.to_dict(),
        "repeats": repeats,
        "warmup": warmup,
        "interleaved": True,
        "phases": phases,
        "scales": scales,
        "end_to_end": _stats(e2e),
        "memory": mem,
        "costs": costs.to_dict(),
    }
    log.info("%s: end to end %.1f ms (median of %d)", backend.name, result["end_to_end"]["median_ms"], repeats)
    return result


# ---- reporting ---------------------------------------------------------------------------------
def _si(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}".rstrip()


def format_table(results: list[dict[str, Any]]) -> str:
    """A text table: rows = phases and scales; columns = each backend's median ms, the ratio of every
    further backend to the first, then the cost model's FLOPs, bytes and intensity (from the first result)."""
    if not results:
        return "(no results)"
    first = results[0]
    names = [r["backend"] for r in results]
    header = ["phase", *(f"{n} ms" for n in names)]
    header += [f"{n}/{names[0]}" for n in names[1:]]
    header += ["FLOPs", "bytes", "FLOP/B", *(f"{n} GFLOP/s" for n in names)]
    by_name = [{p["name"]: p for p in r["phases"]} for r in results]
    lines: list[list[str]] = []
    for phase in first["phases"]:
        name = phase["name"]
        row = [name]
        medians = [b.get(name, {}).get("median_ms") for b in by_name]
        row += ["-" if m is None else f"{m:.2f}" for m in medians]
        for m in medians[1:]:
            base = medians[0]
            row.append("-" if m is None or not base else f"{m / base:.2f}")
        row += [
            _si(phase.get("flops")),
            _si(phase.get("bytes"), "B"),
            "-" if phase.get("intensity") is None else f"{phase['intensity']:.1f}",
        ]
        for b in by_name:
            g = b.get(name, {}).get("gflops_per_s")
            row.append("-" if g is None else f"{g:.2f}")
        lines.append(row)
    widths = [max(len(r[c]) for r in [header, *lines]) for c in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "  ".join(
            cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths, strict=True))
        )

    rule = "-" * len(fmt(header))
    out = [fmt(header), rule]
    for row in lines:
        out.append(fmt(row))
        if row[0] in ("context", "step (all)", "update (all)", "other"):
            out.append(rule)
    for r in results:
        e = r["end_to_end"]
        mem = r["memory"]
        peak = _si(mem.get("peak_bytes"), "B")
        out.append(
            f"{r['backend']}: end to end median {e['median_ms']:.1f} ms "
            f"(min {e['min_ms']:.1f}, max {e['max_ms']:.1f}), {r['repeats']} runs after {r['warmup']} warm-up; "
            f"peak memory {peak} ({mem['kind']})"
        )
        paired = r.get("paired_ratio")
        if paired is not None:
            out.append(
                f"{r['backend']} / {paired['to']} end to end, paired by round: median {paired['median']:.3f} "
                f"(min {paired['min']:.3f}, max {paired['max']:.3f})"
            )
    return "\n".join(out)


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Where the numbers come from: platform, CPU, core counts, library versions, device."""
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import onnxruntime

        ort_version: str | None = onnxruntime.__version__
    except ImportError:
        ort_version = None
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": ort_version,
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info
