"""Does the hierarchy matter? An ablation on the synthetic benchmark, the demo's seeds and recipe for every variant.

Variants (everything else equal: data, VQ-VAE, step counts, learning rates, sampling, seeds):
  hierarchical_c2f  full cascaded supervision of the encoder, coarse-to-fine guidance (the method)
  hierarchical_f2c  the same encoder, fine-to-coarse guidance (scale i reads the reversed level)
  single_feature    terminal-only supervision, and every scale cross-attends to e_M

Each seed is what `benchmarks/demo_seeds.py` runs for that seed: its own synthetic data, VQ-VAE, encoders and
generators. Within a seed the VQ-VAE is trained once and shared, and the two hierarchical variants share their
stage-1 encoder. Metrics are decoded on the held-out test scans of subj01 (repeats averaged). The report gives
every variant's mean, min and max over the seeds, and states a direction between two variants only where their
per-seed values do not overlap (``mindhier_rt.seed_spread.separation``).

    python benchmarks/ablation_hierarchy.py --out runs/ablation --n-seeds 5

writes benchmarks/results/ablation_hierarchy.{json,md} (and the run folder). With ``--demo-runs DIR`` (the --out of
a finished `demo_seeds.py` run of the same recipe) each seed's demo checkpoint is the hierarchical_c2f variant and
lends its VQ-VAE and encoder to the others, instead of training them again: the ablation then compares against the
very models the demo reports, in about two thirds of the time. Both ways train the same weights
(tests/test_demo_seeds.py).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mindhier_rt.bundle.files import sha256_file
from mindhier_rt.checkpoint import read_checkpoint_header
from mindhier_rt.config import preset
from mindhier_rt.demo import DemoSettings, evaluate, synthesise, teacher_targets
from mindhier_rt.errors import CheckpointError
from mindhier_rt.io import atomic_write_text, write_json
from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.object_probe import ProbeSettings, train_probe
from mindhier_rt.runtime.torch_backend import TorchBackend
from mindhier_rt.seed_spread import separation, spread
from mindhier_rt.train.stages import Stage1Weights, train_stage1, train_stage2, train_vqvae

sys.path.insert(0, str(Path(__file__).resolve().parent))  # demo_seeds: the one home of the seed-run options
from demo_seeds import add_seed_arguments, command_line, recipe

VARIANTS = {
    "hierarchical_c2f": {"guidance": "coarse_to_fine", "conditioning": "hierarchical"},
    "hierarchical_f2c": {"guidance": "fine_to_coarse", "conditioning": "hierarchical"},
    "single_feature": {"guidance": "coarse_to_fine", "conditioning": "single"},
}
METRICS = ("pixcorr", "ssim", "two_way_pixel", "two_way_feature", "object_category")


def demo_checkpoint(runs: Path, s: DemoSettings) -> Path:
    """``runs/seed<seed>/model.safetensors``, checked to be a demo checkpoint of recipe ``s`` in the method's
    configuration (the hierarchical_c2f variant) and a file inside ``runs``. Raises SystemExit saying what differs."""
    path = runs / f"seed{s.seed}" / "model.safetensors"
    if path.is_symlink() or not path.is_file() or not path.resolve().is_relative_to(runs.resolve()):
        raise SystemExit(f"--demo-runs: expected a demo checkpoint at {path}, found none (or one outside {runs})")
    try:
        header = read_checkpoint_header(path)
    except CheckpointError as e:
        raise SystemExit(f"--demo-runs: {e}") from None
    want_cfg = preset(s.preset).replace(**VARIANTS["hierarchical_c2f"])
    if header.cfg.to_dict() != want_cfg.to_dict():
        raise SystemExit(f"--demo-runs: {path} holds a {header.cfg.name!r} model whose config is not the recipe's")
    want = {k: v for k, v in asdict(s).items() if k != "sampling"}
    found = header.extra.get("demo")
    if found != want:
        differ = sorted(k for k in want if not isinstance(found, dict) or found.get(k) != want[k])
        raise SystemExit(f"--demo-runs: {path} was trained with other demo settings ({', '.join(differ)} differ)")
    return path


def run_seed(out: Path, s: DemoSettings, demo_ckpt: Path | None = None) -> list[dict]:
    """Every variant's scores for one seed of the demo recipe ``s`` (``demo_ckpt``: that seed's demo models, from
    ``demo_checkpoint``, stand for hierarchical_c2f and lend their VQ-VAE and encoder)."""
    torch.manual_seed(s.seed)
    base_cfg = preset(s.preset)
    data, images, trials = synthesise(out / "data", s)
    train_images = torch.unique(torch.cat([t.image_index_n for t in trials]))

    if demo_ckpt is None:
        shared = MindHier.from_config(base_cfg, seed=s.seed)
        train_vqvae(shared, images[train_images], s.train_config("vq"), out / "vqvae", resume=False, progress=False)
    else:
        shared = MindHier.load(demo_ckpt)
    teacher, levels, text = teacher_targets(base_cfg, s.seed, images, data.captions())
    probe = train_probe(base_cfg.image_size, s.seed, ProbeSettings(n_images=s.probe_images, steps=s.probe_steps))

    encoders: dict[str, torch.nn.Module] = {}
    if demo_ckpt is not None:
        encoders["hierarchical"] = shared.encoder
    for conditioning, mask in (("hierarchical", None), ("single", (0.0,) * (base_cfg.n_levels - 1) + (1.0,))):
        if conditioning in encoders:
            continue
        models = MindHier.from_config(base_cfg.replace(conditioning=conditioning), seed=s.seed)
        train_stage1(
            models, trials, levels, text, s.train_config("stage1"), out / f"stage1_{conditioning}",
            Stage1Weights(level_mask=mask), resume=False, progress=False,
        )  # fmt: skip
        encoders[conditioning] = models.encoder

    rows = []
    for name, overrides in VARIANTS.items():
        if demo_ckpt is not None and name == "hierarchical_c2f":
            models = shared  # the demo's own models are this variant
        else:
            models = MindHier.from_config(base_cfg.replace(**overrides), seed=s.seed)
            models.vqvae.load_state_dict(shared.vqvae.state_dict())
            models.encoder = copy.deepcopy(encoders[overrides["conditioning"]])  # guidance does not touch stage 1
            train_stage2(models, trials, images, s.train_config("stage2"), out / f"stage2_{name}", resume=False,
                         progress=False)  # fmt: skip
        scores, _, _ = evaluate(TorchBackend(models.eval()), data, s.decode_subject, s.sampling, teacher, probe)
        rows.append({"variant": name, "seed": s.seed, **{m: float(scores[m]) for m in METRICS[:4]},
                     "object_category": float(scores["object"]["category"]["recon"])})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def directions(rows: list[dict]) -> list[dict]:
    """For every pair of variants and metric: ">" / "<" where the per-seed values separate, else "overlap"."""
    out = []
    for a, b in itertools.combinations(VARIANTS, 2):
        for m in METRICS:
            va = [r[m] for r in rows if r["variant"] == a]
            vb = [r[m] for r in rows if r["variant"] == b]
            out.append({"a": a, "b": b, "metric": m, "direction": separation(va, vb)})
    return out


def markdown(report: dict) -> str:
    s = report["spread"]
    lines = [
        "# Hierarchy ablation on the synthetic benchmark",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}; {report['seconds']} s in all.",
        "",
        "Mean [min, max] over seeds " + ", ".join(map(str, report["seeds"])) + ":",
        "",
        "| variant | " + " | ".join(METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    if report.get("demo_checkpoints"):
        lines[5:5] = [  # before "Mean [min, max] ..."
            "hierarchical_c2f is each seed's demo checkpoint (`--demo-runs`; sha256 in the json); the other variants "
            "use its VQ-VAE, and hierarchical_f2c its encoder.",
            "",
        ]
    for name in VARIANTS:
        cells = [f"{s[name][m]['mean']:.3f} [{s[name][m]['min']:.3f}, {s[name][m]['max']:.3f}]" for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    separated = [d for d in report["directions"] if d["direction"] != "overlap"]
    lines += ["", "Directions where every seed of one variant is above every seed of the other:"]
    lines += [f"- {d['metric']}: {d['a']} {d['direction']} {d['b']}" for d in separated] or [
        "- none: on every metric the variants' per-seed values overlap, so no direction is stated."
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_seed_arguments(parser, Path("runs/ablation"))
    parser.add_argument("--demo-runs", type=Path, help="a finished demo_seeds.py --out of the same recipe (reused)")
    args = parser.parse_args(argv)

    t_start = time.perf_counter()
    seeds = list(range(args.n_seeds))
    # every seed's demo checkpoint is checked, and its digest taken, before the first seed spends any time
    demo_ckpts = {seed: demo_checkpoint(args.demo_runs, recipe(seed, args)) for seed in seeds} if args.demo_runs else {}
    digests = {seed: {"path": str(p), "sha256": sha256_file(p)} for seed, p in demo_ckpts.items()}
    rows = [r for seed in seeds for r in run_seed(args.out / f"seed{seed}", recipe(seed, args), demo_ckpts.get(seed))]

    s = recipe(seeds[0], args)
    command = command_line("ablation_hierarchy", args) + (f" --demo-runs {args.demo_runs}" if args.demo_runs else "")
    report = {
        "command": command,
        "machine": f"{platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "settings": {k: v for k, v in s.__dict__.items() if k not in ("sampling", "seed")}
        | {"sampling": s.sampling.to_dict()},
        "seeds": seeds,
        "demo_checkpoints": digests,
        "rows": rows,
        "spread": {
            name: spread([{m: r[m] for m in METRICS} for r in rows if r["variant"] == name]) for name in VARIANTS
        },
        "directions": directions(rows),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.results / "ablation_hierarchy.json", report)
    atomic_write_text(args.results / "ablation_hierarchy.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
