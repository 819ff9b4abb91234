"""The demo recipe over several seeds: does its result hold for any seed?

Each seed is a whole `mindhier-rt demo` run (its own synthetic data, simulated subjects, models and sampling
seed), one after the other, so each gets the machine's cores to itself. The seeds are the first ``--n-seeds``
integers, not chosen for their results. Every metric is reported per seed and as mean, min and max.

    python benchmarks/demo_seeds.py --out runs/demo_seeds --n-seeds 5

writes benchmarks/results/demo_seeds_cpu.{json,md} (and every seed's run folder under --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from mindhier_rt.demo import DemoSettings, run_demo
from mindhier_rt.io import atomic_write_text, write_json
from mindhier_rt.seed_spread import spread

METRICS = ("two_way_pixel", "two_way_feature", "pixcorr", "ssim", "seconds")
OBJECT_ATTRIBUTES = ("category", "colour", "position", "size")


def add_seed_arguments(parser: argparse.ArgumentParser, out: Path) -> None:
    """The options of a run over seeds (this script's and the hierarchy ablation's); ``recipe`` reads them."""
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--n-seeds", type=int, default=5)
    parser.add_argument("--steps-scale", type=float, default=1.0)
    parser.add_argument("--n-train", type=int, help="fewer training stimuli than the recipe (smoke runs)")
    parser.add_argument("--n-test", type=int, help="fewer test stimuli than the recipe (smoke runs)")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")


def recipe(seed: int, args: argparse.Namespace) -> DemoSettings:
    """The demo recipe for ``seed``, its steps scaled and (for smoke runs) its data sizes overridden."""
    s = DemoSettings(seed=seed).scaled(args.steps_scale)
    return dataclasses.replace(s, **{k: v for k in ("n_train", "n_test") if (v := getattr(args, k)) is not None})


def command_line(script: str, args: argparse.Namespace) -> str:
    parts = [f"python benchmarks/{script}.py --out {args.out} --n-seeds {args.n_seeds}"]
    parts += [f"--steps-scale {args.steps_scale}"] if args.steps_scale != 1.0 else []
    parts += [
        f"--{k.replace('_', '-')} {getattr(args, k)}" for k in ("n_train", "n_test") if getattr(args, k) is not None
    ]
    return " ".join(parts)


def flat_scores(metrics: dict) -> dict[str, float]:
    """The numbers of one run that the spread is taken over: the image scores, the seconds and, per attribute,
    how often the object read-out was right (``object_<attribute>``) and its ground-truth ceiling."""
    row = {m: float(metrics[m]) for m in METRICS}
    for name, score in metrics.get("object", {}).items():
        row[f"object_{name}"] = float(score["recon"])
        row[f"object_{name}_ground_truth"] = float(score["ground_truth"])
    return row


def markdown(report: dict) -> str:
    s, n = report["spread"], len(report["seeds"])
    lines = [
        "# The demo over seeds",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}; {report['seconds']} s in all.",
        "",
        "| metric | mean | min | max | chance |",
        "|---|---|---|---|---|",
    ]
    chance = {"two_way_pixel": "0.5", "two_way_feature": "0.5", "pixcorr": "0"} | {
        f"object_{a}": f"{report['object_chance'][a]:.3f}" for a in report["object_chance"]
    }
    for key, v in s.items():
        lines.append(f"| {key} | {v['mean']:.4f} | {v['min']:.4f} | {v['max']:.4f} | {chance.get(key, '')} |")
    lines += [
        "",
        f"Seeds {report['seeds']} ({n} runs, one after the other); per-seed rows in demo_seeds_cpu.json. "
        "object_X: how often the object probe reads attribute X of a reconstruction right; "
        "object_X_ground_truth: the same probe on the stimuli themselves (the ceiling).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_seed_arguments(parser, Path("runs/demo_seeds"))
    parser.add_argument("--name", default="demo_seeds_cpu", help="result file stem")
    args = parser.parse_args(argv)

    t_start = time.perf_counter()
    seeds = list(range(args.n_seeds))
    runs = []
    for seed in seeds:
        metrics = run_demo(args.out / f"seed{seed}", recipe(seed, args), progress=False)
        runs.append({"seed": seed, **flat_scores(metrics), "phase_seconds": metrics["phase_seconds"]})
        print(json.dumps(runs[-1]), flush=True)

    settings = recipe(seeds[0], args)
    first = json.loads((args.out / f"seed{seeds[0]}" / "metrics.json").read_text())
    command = command_line("demo_seeds", args)
    report = {
        "command": command,
        "machine": f"{platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "settings": {k: v for k, v in settings.__dict__.items() if k not in ("sampling", "seed")}
        | {"sampling": settings.sampling.to_dict()},
        "seeds": seeds,
        "spread": spread([{k: v for k, v in r.items() if k not in ("seed", "phase_seconds")} for r in runs]),
        "object_chance": {name: score["chance"] for name, score in first.get("object", {}).items()},
        "runs": runs,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.results / f"{args.name}.json", report)
    atomic_write_text(args.results / f"{args.name}.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
