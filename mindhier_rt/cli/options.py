"""Help texts, option types and output helpers that several commands share."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer

RECORDED = "{} (default: the bundle's recorded setting; a checkpoint's: docs/sampling.md)"
CONTEXT_MAP_HELP = (
    "which context level each token reads: training or reference-pipeline (MindHier's reference inference; "
    "the default for MindHier checkpoints). Default: the checkpoint's"
)
VAE_HELP = "VQ-VAE of a public generator: vae_ch160v4096z32.pth (VAR) or the Switti VQ-VAE folder"
PRESETS_HELP = "tiny, small, demo, mindhier-256 or mindhier-512"

FMRI_HELP = "voxels: .npy / .npz / .h5, one row per scan"
SUBJECT_HELP = "subject id, e.g. subj01"
DECODE_OUT_HELP = "output folder for the PNGs and decode.json"

ArrayKey = Annotated[str | None, typer.Option(help="array name inside .npz / .h5 files (default: voxels)")]
JsonOut = Annotated[Path | None, typer.Option("--json", help="write the results to this JSON file")]


def echo_json(obj: object) -> None:
    typer.echo(json.dumps(obj, indent=2))


def warn_skipped(skipped: list[dict]) -> None:
    for s in skipped:
        typer.echo(f"warning: scan {s['scan']}: {s['reason']}, skipped", err=True)


@contextlib.contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A transient rich progress bar; yields ``advance(n)``."""
    from rich.progress import Progress

    with Progress(transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)
