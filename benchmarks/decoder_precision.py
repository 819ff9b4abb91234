"""How far the fast backend's half-precision image decoder is from float32, per pixel (CPU autocast).

    python benchmarks/decoder_precision.py [--presets tiny,small] [--scans 2]

For each preset (random weights, seed 0) and decoder dtype, decodes the same scans with the eager backend
(float32 decoder) and with ``FastTorchBackend(decoder_dtype=...)`` on the CPU, checks that the tokens are
identical (the decoder does not feed back) and prints the max and mean absolute image difference (images in
[0, 1]) and the share of pixels off by more than 1/255. The numbers behind ``decoder_dtype``'s default
(``runtime/torch_fast.py``, README) come from this script: ``benchmarks/results/decoder_precision_cpu.md``.
"""

from __future__ import annotations

import argparse
import copy

import torch

from mindhier_rt.config import preset
from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.pipeline import reconstruct
from mindhier_rt.runtime.torch_backend import TorchBackend
from mindhier_rt.runtime.torch_fast import FastTorchBackend
from mindhier_rt.sampling import SamplingConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny,small")
    p.add_argument("--scans", type=int, default=2)
    a = p.parse_args()
    print("| preset | decoder dtype | same tokens | max abs diff | mean abs diff | pixels off > 1/255 |")
    print("|---|---|---|---|---|---|")
    for name in a.presets.split(","):
        models = MindHier.from_config(preset(name), seed=0).eval()
        cfg = models.cfg
        voxels = torch.randn(a.scans, cfg.encoder.voxel_count("subj01"), generator=torch.Generator().manual_seed(0))
        sampling = SamplingConfig(seed=1)
        ref = reconstruct(TorchBackend(copy.deepcopy(models)), voxels, "subj01", sampling)
        for dtype in ("float16", "bfloat16"):
            fast = FastTorchBackend(copy.deepcopy(models), device="cpu", decoder_dtype=dtype)
            got = reconstruct(fast, voxels, "subj01", sampling)
            same = all(torch.equal(x, y) for x, y in zip(got.tokens, ref.tokens, strict=True))
            diff = (got.images_NS3HW - ref.images_NS3HW).abs()
            print(
                f"| {name} | {dtype} | {same} | {diff.max().item():.4f} | {diff.mean().item():.5f} "
                f"| {(diff > 1 / 255).float().mean().item():.4%} |"
            )


if __name__ == "__main__":
    main()
