"""Kernel-level profile of one generator step of the fast backend (eager launches, no CUDA graph), on a GPU.

    python benchmarks/gpu_step_profile.py --preset mindhier-512 --scale 0 [--rows 2] [--out FILE]

Profiles the step with the fused norm kernels and without them (``fused=False``), prints each one's CUDA kernels
by total time (torch.profiler) and, last, the number of kernels one step launches and the median step time with
graph-free launches: what bounds the small scales, and what the fusion removes.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from mindhier_rt.config import preset
from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.runtime.torch_fast import FastTorchBackend

REPEATS = 5


def profile_step(models: MindHier, fused: bool, a: argparse.Namespace) -> tuple[str, float, float]:
    cfg = models.cfg
    fast = FastTorchBackend(models, device="cuda", cuda_graphs=False, attention=a.attention, fused=fused)
    subject = cfg.encoder.subjects[0][0]
    vox = torch.randn(a.rows, cfg.encoder.voxel_count(subject), device="cuda")
    state = fast.prepare(*fast.encode(vox, subject))
    n = cfg.schedule.token_counts[a.scale]
    x = None if a.scale == 0 else torch.randn(state.scan.rows, n, cfg.generator.width, device="cuda")  # embedded
    for _ in range(3):
        fast.step(a.scale, state, x)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        fast.step(a.scale, state, x)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(REPEATS):
            fast.step(a.scale, state, x)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    kernels = sum(e.count for e in averages if e.device_type == DeviceType.CUDA) / REPEATS
    return averages.table(sort_by="cuda_time_total", row_limit=25), kernels, 1e3 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="mindhier-512")
    p.add_argument("--scale", type=int, default=0)
    p.add_argument("--rows", type=int, default=2, help="generator rows (2: one scan with guidance)")
    p.add_argument("--attention", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    with torch.device("cuda"):
        models = MindHier.from_config(preset(a.preset), seed=0)
    report, summary = [], []
    for fused in (True, False):
        table, kernels, ms = profile_step(copy.deepcopy(models) if fused else models, fused, a)
        report.append(f"== fused={fused}\n{table}")
        summary.append(f"{a.preset} scale {a.scale}, fused={fused}: {kernels:.0f} CUDA kernels per step, {ms:.2f} ms")
    text = "\n".join(report + summary)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
