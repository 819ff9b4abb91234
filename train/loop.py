"""The one training loop every stage uses: AdamW + one-cycle LR, gradient clipping, a progress bar,
a JSON-lines loss log and resumable state.

A stage supplies ``loss_fn(step) -> {"loss": total, other terms...}``; batches are drawn from
``batch_rng(seed, step)``, so a resumed run sees exactly the batches an uninterrupted one would.
State lives in ``<run_dir>/<stage>.state.safetensors`` (``train/state.py``: modules, optimizer, LR schedule,
gradient scaler, torch's generators, the stage's own running state such as codebook usage; no pickle), written
atomically every ``save_every`` steps, at the end and on SIGINT / SIGTERM (``train/signals.py``). A resumed run
ends bit-identical to an uninterrupted one, and the log is cut back to the saved step, so each step is logged once.

Mixed precision (``TrainConfig.amp``): the loss is computed under autocast in bf16 or fp16 (fp16 adds gradient
scaling); weights, gradients and optimizer states stay fp32. Under torchrun the loop takes a ``DistContext``
(``train/distributed.py``): the stage wraps its modules (DDP / FSDP) before calling it, logged losses are averaged
over ranks, rank 0 alone logs, shows progress and writes files, and sharded state is gathered for the state file,
whose layout does not depend on how many processes wrote it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from mindhier_rt.errors import ConfigError, TrainingInterrupted
from mindhier_rt.io import atomic_write_text
from mindhier_rt.train.config import TrainConfig
from mindhier_rt.train.distributed import DistContext, full_tensor, is_sharded
from mindhier_rt.train.signals import StopOnSignal
from mindhier_rt.train.state import Stateful, load_state, save_state, state_path

log = logging.getLogger(__name__)


AMP_DTYPES: dict[str, torch.dtype | None] = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of an ``--amp`` value (None for "off"); ConfigError for anything else."""
    if amp not in AMP_DTYPES:
        raise ConfigError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    return AMP_DTYPES[amp]


def batch_rng(seed: int, step: int) -> np.random.Generator:
    """The random stream of one step: independent of how the run was split across restarts."""
    return np.random.default_rng([seed, step])


def _truncate_log(log_path: Path, step: int) -> None:
    """Keep the log's records up to ``step`` (the saved state's step), atomically: the steps a killed run logged
    after its last save are run again and must be logged once. A half-written last line is dropped too."""
    if not log_path.exists():
        return
    lines = log_path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        dropped = len(lines) - len(kept)
        log.info("%s: dropped %d records after step %d, the saved state's step", log_path, dropped, step)
        atomic_write_text(log_path, "".join(kept))


def train_loop(
    stage: str,
    modules: Mapping[str, nn.Module],
    loss_fn: Callable[[int], dict[str, Tensor]],
    tcfg: TrainConfig,
    run_dir: Path,
    resume: bool = True,
    progress: bool = True,
    dist: DistContext | None = None,
    aux: Mapping[str, Stateful] | None = None,
) -> list[dict]:
    """Train the parameters of ``modules`` for ``tcfg.steps`` steps; return the logged records.

    ``aux``: other state ``loss_fn`` keeps across steps (saved and restored with the modules). A resumed run
    ends bit-identical to an uninterrupted one. On SIGINT / SIGTERM the state is saved after the current step
    and ``TrainingInterrupted`` is raised.

    ``modules`` are the unwrapped modules (their state dicts name the saved tensors); under torchrun the stage
    has already wrapped them for ``dist`` and calls the wrappers in ``loss_fn``. Every rank returns the same
    records (losses averaged over ranks).
    """
    if tcfg.save_every < 1:
        raise ConfigError(f"save_every must be >= 1 step, got {tcfg.save_every}")
    ctx = dist or DistContext()
    run_dir.mkdir(parents=True, exist_ok=True)
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=(0.9, 0.95))
    total = max(tcfg.steps, 2)
    # OneCycleLR needs each phase to span more than one step: clamp the warm-up share for very short runs
    warmup = min(max(tcfg.warmup_frac, 1.5 / total), 1.0 - 0.5 / total)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=tcfg.lr, total_steps=total, pct_start=warmup, anneal_strategy="cos"
    )
    precision = _Precision(tcfg.amp, ctx.device, sharded=any(is_sharded(p) for p in params))
    path, log_path = state_path(run_dir, stage), run_dir / f"{stage}.log.jsonl"
    aux = aux or {}
    start = 0
    if ctx.agree(resume and path.exists()):
        start = load_state(path, modules, opt, sched, tcfg, precision.scaler, aux, ctx.device, ctx.is_main)
        if ctx.is_main:
            _truncate_log(log_path, start)
        log.info("%s: resumed at step %d from %s", stage, start, path)
    elif ctx.is_main and log_path.exists():
        log_path.unlink()

    def save(step: int) -> None:
        save_state(path, modules, opt, sched, step, tcfg, ctx, precision.scaler, aux)

    for m in modules.values():
        m.train()
    records: list[dict] = []
    t0 = time.perf_counter()
    bar = _Progress(stage, tcfg.steps, start, enabled=progress and ctx.is_main)
    with bar, StopOnSignal() as stop, contextlib.ExitStack() as files:
        log_file = files.enter_context(log_path.open("a")) if ctx.is_main else None
        for step in range(start, tcfg.steps):
            opt.zero_grad(set_to_none=True)  # before the forward pass: last step's gradients never meet activations
            with precision.autocast():
                losses = loss_fn(step)
            precision.backward(losses["loss"])
            precision.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
            precision.step(opt)
            sched.step()
            # every term averaged over ranks in one collective: the global batch's values, identical on all ranks
            terms = torch.stack([_scalar(v, ctx.device) for v in losses.values()])
            values = dict(zip(losses, ctx.mean(terms).tolist(), strict=True))
            if not math.isfinite(values["loss"]):
                raise FloatingPointError(f"{stage}: loss became {values['loss']} at step {step}")
            if (step + 1) % tcfg.log_every == 0 or step + 1 == tcfg.steps:
                grad_norm = float(full_tensor(grad_norm))
                record = {"stage": stage, "step": step + 1, "lr": sched.get_last_lr()[0], "grad_norm": grad_norm}
                record.update(values)
                record["seconds"] = round(time.perf_counter() - t0, 2)
                if log_file is not None:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                records.append(record)
                bar.update(step + 1, record["loss"])
            if step + 1 < tcfg.steps and _stop_requested(stop, ctx):
                save(step + 1)
                signum = stop.signum or signal.SIGTERM  # rank 0's signal; other ranks may have none
                raise TrainingInterrupted(
                    f"{stage}: stopped by {signal.Signals(signum).name} after step {step + 1} of {tcfg.steps}; the "
                    f"state is saved in {path}: run the same command again to resume",
                    signum,
                )
            if (step + 1) % tcfg.save_every == 0 and step + 1 < tcfg.steps:
                save(step + 1)
    save(tcfg.steps)
    for m in modules.values():
        m.eval()
    return records


def _stop_requested(stop: StopOnSignal, ctx: DistContext) -> bool:
    """Whether to stop after this step: rank 0's answer on every rank under torchrun (one broadcast a step)."""
    requested = stop.signum is not None
    return ctx.agree(requested) if ctx.initialized else requested


def _scalar(value, device: torch.device) -> Tensor:
    """A loss term (tensor or number) as a float64 scalar on ``device``, without a host sync."""
    if torch.is_tensor(value):
        return value.detach().reshape(()).to(device, torch.float64)
    return torch.tensor(float(value), dtype=torch.float64, device=device)


class _Precision:
    """Autocast around the loss and, for fp16, gradient scaling (shard-aware when the weights are FSDP-sharded:
    a step is skipped on every rank when any rank's gradients overflowed)."""

    def __init__(self, amp: str, device: torch.device, sharded: bool) -> None:
        self.dtype, self.device_type = amp_dtype(amp), device.type
        self.scaler = None
        if amp == "fp16":
            if sharded:
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler as Scaler
            else:
                from torch.amp import GradScaler as Scaler
            self.scaler = Scaler(device.type)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale_(self, opt) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(opt)  # clip the true gradients

    def step(self, opt) -> None:
        if self.scaler is None:
            opt.step()
        else:
            self.scaler.step(opt)  # skipped when gradients overflowed
            self.scaler.update()


class _Progress:
    """A rich progress bar with the latest loss (silent when disabled)."""

    def __init__(self, stage: str, total: int, start: int, enabled: bool) -> None:
        self.enabled = enabled
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), transient=False,
            )  # fmt: skip
            self.task = self.progress.add_task(stage, total=total, completed=start, loss="-")

    def __enter__(self) -> _Progress:
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.progress.stop()

    def update(self, step: int, loss: float) -> None:
        if self.enabled:
            self.progress.update(self.task, completed=step, loss=f"{loss:.4f}")
