"""`mindhier-rt`: the command line. Commands parse their options, call the library and print; the library logs.

Every MindhierError is printed as one line (``error: ...``) with exit code 1, never a traceback; a missing
optional dependency (``MissingDependencyError``: TensorRT, a GPU) exits with code 2. Training stopped by SIGINT /
SIGTERM saves its state, prints how to resume and exits with 128 + the signal number.

The commands live by topic in this package (``*_commands`` modules: model, decode, demo, train, serve) and are
registered here, in the order ``--help`` lists them. Nothing heavy is imported until a command runs, so
``--help`` answers at once.
"""

from __future__ import annotations

import logging
import sys

import typer

from mindhier_rt.cli.decode_commands import decode, evaluate, profile
from mindhier_rt.cli.demo_commands import demo, synth
from mindhier_rt.cli.model_commands import build, export, info, init
from mindhier_rt.cli.serve_commands import client, export_triton, serve
from mindhier_rt.cli.train_commands import train_memory_cmd, train_stage1_cmd, train_stage2_cmd, train_vqvae_cmd
from mindhier_rt.errors import MindhierError, MissingDependencyError, TrainingInterrupted

app = typer.Typer(
    name="mindhier-rt",
    help="MindHier fMRI-to-image reconstruction: reference models, engines and benchmarks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for command in (info, init, export, build, decode, profile, synth, demo, evaluate):
    app.command()(command)

train_app = typer.Typer(help="Train the VQ-VAE, stage 1 (encoder) or stage 2 (generator) on a data folder.")
train_app.command("vqvae")(train_vqvae_cmd)
train_app.command("stage1")(train_stage1_cmd)
train_app.command("stage2")(train_stage2_cmd)
train_app.command("memory")(train_memory_cmd)
app.add_typer(train_app, name="train")

app.command()(serve)
app.command("export-triton")(export_triton)
app.command()(client)

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry: run the app, turning our errors into one line and a non-zero exit."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except TrainingInterrupted as e:  # the state is saved: a clean stop, with the shell's code for a signal
        typer.echo(str(e), err=True)
        sys.exit(128 + e.signum)
    except MissingDependencyError as e:  # TensorRT, a GPU, cuda-python: exit code 2
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except MindhierError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
