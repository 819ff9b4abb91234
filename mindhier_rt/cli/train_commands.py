"""Training commands: the VQ-VAE, stage 1 (encoder), stage 2 (generator) and stage 2's memory estimate.

The default steps and learning rates are the demo's recipe (``DemoSettings``; tests/test_train.py checks that they
agree). Stages 1 and 2 also run under torchrun, one process per GPU:
    torchrun --standalone --nproc_per_node N -m mindhier_rt.cli train stage2 ...   (or: --no-python mindhier-rt ...)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mindhier_rt.cli.options import echo_json
from mindhier_rt.errors import InputError

DataOpt = Annotated[
    Path, typer.Option("--data", help="data folder: the mindhier-rt layout (`synth`) or the MindEye2 NSD files")
]
RunOpt = Annotated[Path, typer.Option("--out", help="run folder: state, loss log, model.safetensors")]
InitOpt = Annotated[Path | None, typer.Option("--init", help="checkpoint to start from (earlier stages' weights)")]
PresetOpt = Annotated[str, typer.Option("--preset", help="model preset when starting from scratch")]
StepsOpt = Annotated[int, typer.Option(min=1)]
ResumeOpt = Annotated[bool, typer.Option(help="continue from the run folder's saved state")]
AmpOpt = Annotated[str, typer.Option(help="mixed precision of the loss: off, bf16 or fp16 (fp16 scales gradients)")]
SaveEveryOpt = Annotated[
    int, typer.Option(min=1, help="steps between saves of the training state (also saved at the end and on Ctrl-C)")
]


def train_vqvae_cmd(
    data: DataOpt,
    out: RunOpt,
    init: InitOpt = None,
    preset_name: PresetOpt = "demo",
    steps: StepsOpt = 1000,
    batch_size: StepsOpt = 32,
    lr: float = 2e-3,
    seed: int = 0,
    resume: ResumeOpt = True,
    save_every: SaveEveryOpt = 100,
) -> None:
    """Reconstruction + codebook/commitment losses on the training images (one process: not under torchrun)."""
    import os

    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("train vqvae runs in one process (its codebook restarts use whole batches); drop torchrun")

    from mindhier_rt.train.setup import open_training_run, train_config
    from mindhier_rt.train.stages import load_trials, train_vqvae

    ds, models = open_training_run(data, preset_name, init, ())
    train_index = torch.unique(torch.cat([t.image_index_n for t in load_trials(ds)]))
    images = torch.from_numpy(ds.images(train_index.numpy()))
    train_vqvae(models, images, train_config(steps, batch_size, lr, seed, save_every=save_every), out, resume=resume)
    models.save(out / "model.safetensors")
    typer.echo(f"wrote {out / 'model.safetensors'}")


def train_stage1_cmd(
    data: DataOpt,
    out: RunOpt,
    init: InitOpt = None,
    preset_name: PresetOpt = "demo",
    steps: StepsOpt = 600,
    batch_size: StepsOpt = 32,
    lr: float = 1e-3,
    seed: int = 0,
    resume: ResumeOpt = True,
    teacher_seed: Annotated[int, typer.Option(help="seed of the frozen random-ViT teacher")] = 0,
    teacher: Annotated[str, typer.Option(help="random-vit (synthetic data) or clip (CLIP ViT-L/14, real data)")] = (
        "random-vit"
    ),
    clip_weights: Annotated[Path | None, typer.Option(help="local CLIP ViT-L/14 checkpoint for --teacher clip")] = None,
    feature_cache: Annotated[
        Path | None, typer.Option(help="folder of teacher features: computed once for the training images, then reused")
    ] = None,
    amp: AmpOpt = "off",
    save_every: SaveEveryOpt = 100,
) -> None:
    """Align the encoder's levels to a frozen teacher's layer taps (hierarchical MSE + SoftCLIP).

    Teachers: the frozen random ViT of the synthetic benchmark (no download), or CLIP ViT-L/14 through
    open_clip with weights from a local file (needs the `train` extra and a 768-wide, 257-token config).
    With --feature-cache the teacher runs once per training image and the features are read from disk
    afterwards (keyed by teacher, its weights and the data set); without it they are computed in memory.
    """
    from mindhier_rt.train.setup import (
        distributed_for_batch,
        open_training_run,
        stage1_teachers,
        teacher_targets,
        train_config,
    )
    from mindhier_rt.train.stages import load_trials, train_stage1

    ctx = distributed_for_batch(batch_size)
    ds, models = open_training_run(data, preset_name, init, ())
    image_teacher, text_teacher = stage1_teachers(models.cfg, teacher, teacher_seed, clip_weights)
    trials = load_trials(ds)
    targets = teacher_targets(ds, trials, models.cfg, teacher, image_teacher, text_teacher, feature_cache, ctx)
    with targets as t:
        tcfg = train_config(steps, batch_size, lr, seed, amp, save_every)
        train_stage1(models, trials, t.levels, t.text, tcfg, out, resume=resume, dist=ctx)
    if ctx.is_main:
        models.save(out / "model.safetensors")
        typer.echo(f"wrote {out / 'model.safetensors'}")


def train_stage2_cmd(
    data: DataOpt,
    out: RunOpt,
    init: InitOpt = None,
    steps: StepsOpt = 1100,
    batch_size: StepsOpt = 32,
    lr: float = 3e-3,
    seed: int = 0,
    resume: ResumeOpt = True,
    cond_drop: Annotated[float, typer.Option(min=0.0, max=1.0, help="condition dropout for guidance")] = 0.1,
    amp: AmpOpt = "off",
    grad_checkpoint: Annotated[
        bool, typer.Option("--grad-checkpoint", help="recompute each generator block in backward (less memory)")
    ] = False,
    fsdp: Annotated[bool, typer.Option(help="under torchrun: shard the generator (FSDP), else DDP replicas")] = True,
    save_every: SaveEveryOpt = 100,
) -> None:
    """Train the generator on the token pyramids with the encoder and VQ-VAE frozen (needs --init).

    Prints the estimated GPU memory per process before training starts. Under torchrun the generator is sharded
    over the processes (FSDP, one unit per block; --no-fsdp: DDP replicas) and --batch-size is the global batch.
    """
    import torch

    from mindhier_rt.train.memory import estimate_stage2_memory, memory_table
    from mindhier_rt.train.setup import distributed_for_batch, open_training_run, train_config
    from mindhier_rt.train.stages import load_trials, train_stage2

    ctx = distributed_for_batch(batch_size)
    tcfg = train_config(steps, batch_size, lr, seed, amp, save_every)
    ds, models = open_training_run(data, "demo", init, ("encoder", "vqvae"))
    if ctx.is_main:
        shard = fsdp and ctx.world_size > 1
        per_gpu = batch_size // ctx.world_size
        est = estimate_stage2_memory(models.cfg, per_gpu, ctx.world_size, amp, grad_checkpoint, shard)
        typer.echo(memory_table(models.cfg, est, per_gpu, ctx.world_size, amp, grad_checkpoint, shard))
    images = torch.from_numpy(ds.images())
    train_stage2(
        models, load_trials(ds), images, tcfg, out, cond_drop, resume=resume, dist=ctx, fsdp=fsdp,
        grad_checkpoint=grad_checkpoint,
    )  # fmt: skip
    if ctx.is_main:
        models.save(out / "model.safetensors")
        typer.echo(f"wrote {out / 'model.safetensors'}")


def train_memory_cmd(
    preset_name: Annotated[str, typer.Option("--preset", help="model preset whose generator is trained")] = (
        "mindhier-512"
    ),
    batch_per_gpu: Annotated[int, typer.Option(min=1, help="samples per GPU and step")] = 4,
    gpus: Annotated[int, typer.Option(min=1, help="processes (GPUs) of the torchrun launch")] = 8,
    amp: AmpOpt = "bf16",
    grad_checkpoint: Annotated[bool, typer.Option("--grad-checkpoint/--no-grad-checkpoint")] = True,
    fsdp: Annotated[bool, typer.Option(help="shard over the GPUs (else DDP replicas)")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output (bytes)")] = False,
) -> None:
    """Estimated GPU memory per process of stage 2 for a preset, without building or training anything."""
    from mindhier_rt.config import preset
    from mindhier_rt.train.memory import estimate_stage2_memory, memory_table

    cfg = preset(preset_name)
    shard = fsdp and gpus > 1
    est = estimate_stage2_memory(cfg, batch_per_gpu, gpus, amp, grad_checkpoint, shard)
    if as_json:
        echo_json(est)
        return
    typer.echo(memory_table(cfg, est, batch_per_gpu, gpus, amp, grad_checkpoint, shard))
