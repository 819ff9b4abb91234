"""``stable_top_k`` (topk + exact tie repair) vs the full stable sort it replaces, on the CPU.

    python benchmarks/topk_cpu.py > benchmarks/results/topk_cpu.md

Logits [2, 256, V] (random normal), median of 15 calls after 2 warm-ups, torch's default threads.
"""

from __future__ import annotations

import statistics
import time

import torch

from mindhier_rt.sampling import stable_top_k


def median_ms(fn, repeats: int = 15, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    print(__doc__.strip().splitlines()[0] + "\n")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| V | k | full stable sort ms | stable_top_k ms | speedup | path |")
    print("|---|---|---|---|---|---|")
    for V, k in ((512, 400), (512, 64), (4096, 400), (4096, 900)):
        x = torch.randn(2, 256, V, generator=torch.Generator().manual_seed(0))
        sort_ms = median_ms(lambda x=x: torch.sort(x, dim=-1, descending=True, stable=True))
        topk_ms = median_ms(lambda x=x, k=k: stable_top_k(x, k))
        path = "topk" if 8 * k <= V else "sort"
        print(f"| {V} | {k} | {sort_ms:.2f} | {topk_ms:.2f} | {sort_ms / topk_ms:.2f}x | {path} |")


if __name__ == "__main__":
    main()
