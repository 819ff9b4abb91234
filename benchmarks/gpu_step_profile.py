"""Kernel-level profile of one generator step of the fast backend (eager launches, no CUDA graph), on a GPU.

    python benchmarks/gpu_step_profile.py --preset mindhier-512 --scale 0 [--rows 2] [--out FILE]

Prints the CUDA kernels of that step by total time (torch.profiler), to see what bounds the small scales.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from mindhier_rt.config import preset
from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.runtime.torch_fast import FastTorchBackend


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="mindhier-512")
    p.add_argument("--scale", type=int, default=0)
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--attention", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    cfg = preset(a.preset)
    with torch.device("cuda"):
        models = MindHier.from_config(cfg, seed=0)
    fast = FastTorchBackend(models, device="cuda", cuda_graphs=False, attention=a.attention)
    subject = cfg.encoder.subjects[0][0]
    vox = torch.randn(a.rows, cfg.encoder.voxel_count(subject), device="cuda")
    pooled, ctx = fast.encode(vox, subject)
    state = fast.prepare(pooled, ctx)
    n = cfg.schedule.token_counts[a.scale]
    x = None if a.scale == 0 else torch.randn(a.rows, n, cfg.latent_dim, device="cuda")
    for _ in range(3):
        fast.step(a.scale, state, x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fast.step(a.scale, state, x)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
