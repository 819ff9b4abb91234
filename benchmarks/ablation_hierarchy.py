"""Does the hierarchy matter? An ablation on the synthetic benchmark, same data and seeds for every variant.

Variants (everything else equal: data, VQ-VAE, step counts, learning rates, sampling, seeds):
  hierarchical_c2f  full cascaded supervision of the encoder, coarse-to-fine guidance (the method)
  hierarchical_f2c  the same encoder, fine-to-coarse guidance (scale i reads the reversed level)
  single_feature    terminal-only supervision, and every scale cross-attends to e_M

The VQ-VAE is trained once and shared; the two hierarchical variants share their stage-1 encoder.
Each variant's generator is trained for every seed in --seeds; metrics are decoded on the held-out
test scans of subj01 (repeats averaged) and reported per seed plus mean.

    python benchmarks/ablation_hierarchy.py --out runs/ablation --seeds 0 1

writes benchmarks/results/ablation_hierarchy.{json,md} (and the run folder).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from mindhier_rt.config import preset
from mindhier_rt.demo import DemoSettings, evaluate, synthesise, teacher_targets
from mindhier_rt.io import atomic_write_text, write_json
from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.runtime.torch_backend import TorchBackend
from mindhier_rt.train.stages import Stage1Weights, train_stage1, train_stage2, train_vqvae

VARIANTS = {
    "hierarchical_c2f": {"guidance": "coarse_to_fine", "conditioning": "hierarchical"},
    "hierarchical_f2c": {"guidance": "fine_to_coarse", "conditioning": "hierarchical"},
    "single_feature": {"guidance": "coarse_to_fine", "conditioning": "single"},
}
METRICS = ("pixcorr", "ssim", "two_way_pixel", "two_way_feature")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps-scale", type=float, default=1.0)
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    t_start = time.perf_counter()
    torch.manual_seed(0)
    s = DemoSettings().scaled(args.steps_scale)
    base_cfg = preset(s.preset)
    data, images, trials = synthesise(args.out / "data", s)
    train_images = torch.unique(torch.cat([t.image_index_n for t in trials]))

    shared = MindHier.from_config(base_cfg, seed=s.seed)
    train_vqvae(shared, images[train_images], s.train_config("vq"), args.out / "vqvae", resume=False)
    teacher, levels, text = teacher_targets(base_cfg, s.seed, images, data.captions())

    encoders: dict[str, torch.nn.Module] = {}
    for conditioning, mask in (("hierarchical", None), ("single", (0.0,) * (base_cfg.n_levels - 1) + (1.0,))):
        models = MindHier.from_config(base_cfg.replace(conditioning=conditioning), seed=s.seed)
        train_stage1(
            models, trials, levels, text, s.train_config("stage1"), args.out / f"stage1_{conditioning}",
            Stage1Weights(level_mask=mask), resume=False,
        )  # fmt: skip
        encoders[conditioning] = models.encoder

    rows = []
    for name, overrides in VARIANTS.items():
        for seed in args.seeds:
            cfg = base_cfg.replace(**overrides)
            models = MindHier.from_config(cfg, seed=seed)
            models.vqvae.load_state_dict(shared.vqvae.state_dict())
            models.encoder = copy.deepcopy(encoders[overrides["conditioning"]])  # guidance does not touch stage 1
            tcfg = dataclasses.replace(s.train_config("stage2"), seed=seed)
            train_stage2(models, trials, images, tcfg, args.out / f"stage2_{name}_seed{seed}", resume=False)
            sampling = dataclasses.replace(s.sampling, seed=seed)
            scores, _, _ = evaluate(TorchBackend(models.eval()), data, s.decode_subject, sampling, teacher)
            rows.append({"variant": name, "seed": seed, **scores})
            print(json.dumps(rows[-1]))

    summary = {
        name: {m: round(sum(r[m] for r in rows if r["variant"] == name) / len(args.seeds), 4) for m in METRICS}
        for name in VARIANTS
    }
    command = "python benchmarks/ablation_hierarchy.py " + " ".join(
        [f"--out {args.out}", "--seeds " + " ".join(map(str, args.seeds)), f"--steps-scale {args.steps_scale}"]
    )
    report = {
        "command": command,
        "machine": f"{platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "settings": {k: v for k, v in s.__dict__.items() if k != "sampling"} | {"sampling": s.sampling.to_dict()},
        "rows": rows,
        "mean": summary,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.results / "ablation_hierarchy.json", report)
    lines = [
        "# Hierarchy ablation on the synthetic benchmark",
        "",
        f"Command: `{command}`  ",
        f"Machine: {report['machine']}; {report['seconds']} s in all.",
        "",
        "| variant | " + " | ".join(METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    lines += [f"| {name} | " + " | ".join(f"{summary[name][m]:.3f}" for m in METRICS) + " |" for name in VARIANTS]
    lines += ["", f"Means over seeds {args.seeds}; per-seed rows in ablation_hierarchy.json."]
    atomic_write_text(args.results / "ablation_hierarchy.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
