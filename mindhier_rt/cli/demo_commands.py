"""Data and demo commands: synth (the synthetic fMRI benchmark) and demo (synthesise, train, decode, score)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def synth(
    out: Annotated[Path, typer.Option("--out", help="folder for the synthetic data set")],
    preset_name: Annotated[
        str, typer.Option("--preset", help="subjects and image size come from this preset")
    ] = "demo",
    n_train: Annotated[int, typer.Option(min=1)] = 6000,
    n_test: Annotated[int, typer.Option(min=2)] = 100,
    repeats: Annotated[int, typer.Option(min=1, help="presentations of each test image")] = 3,
    seed: Annotated[int, typer.Option(min=0)] = 0,
) -> None:
    """Write the synthetic fMRI benchmark in the on-disk layout the NSD loader reads."""
    from mindhier_rt.data.nsd import synth_command_impl

    root = synth_command_impl(out, preset_name, n_train=n_train, n_test=n_test, repeats=repeats, seed=seed)
    typer.echo(f"wrote {root}")


def demo(
    out: Annotated[Path, typer.Option("--out", help="output folder")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(min=0)] = 0,
    steps_scale: Annotated[float, typer.Option(min=0.001, help="multiply every training step count")] = 1.0,
    quick: Annotated[
        bool, typer.Option(help="a first picture in about a minute: a tenth of the training (scores near chance)")
    ] = False,
    progress: Annotated[bool, typer.Option(help="progress bars")] = True,
) -> None:
    """Synthesise data, train tiny models, decode the held-out scans, write images and metrics."""
    from mindhier_rt.demo import DemoSettings, run_demo

    settings = DemoSettings(seed=seed).scaled(steps_scale)
    if quick:
        settings = settings.quick()
    metrics = run_demo(out, settings, progress=progress, say=typer.echo)
    keys = ("pixcorr", "ssim", "two_way_pixel", "two_way_feature", "n_test", "backend", "seconds")
    typer.echo("metrics: " + ", ".join(f"{k}={metrics[k]}" for k in keys) + " (two-way chance: 0.5)")
    files = ("reconstructions.png", "progression.png", "metrics.png", "losses.png", "metrics.json")
    typer.echo(f"wrote {', '.join(str(out / f) for f in files if (out / f).exists())}")
