"""The one training loop every stage uses: AdamW + one-cycle LR, gradient clipping, a progress bar,
a JSON-lines loss log and resumable state.

A stage supplies ``loss_fn(step) -> {"loss": total, other terms...}``; batches are drawn from
``batch_rng(seed, step)``, so a resumed run sees exactly the batches an uninterrupted one would.
State lives in ``<run_dir>/<stage>.state.safetensors``: the trained modules, the optimizer tensors and,
as JSON metadata, the step, the optimizer's param groups and the LR scheduler (no pickle).
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mindhier_rt.errors import CheckpointError
from mindhier_rt.io import atomic_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 20
    save_every: int = 500


def batch_rng(seed: int, step: int) -> np.random.Generator:
    """The random stream of one step: independent of how the run was split across restarts."""
    return np.random.default_rng([seed, step])


def _state_path(run_dir: Path, stage: str) -> Path:
    return run_dir / f"{stage}.state.safetensors"


def _save_state(path: Path, modules: Mapping[str, nn.Module], opt, sched, step: int, tcfg: TrainConfig) -> None:
    tensors: dict[str, Tensor] = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"model.{name}.{key}"] = value.detach().cpu().contiguous().clone()
    opt_state = opt.state_dict()
    scalars: dict[str, dict[str, float]] = {}
    for idx, entry in opt_state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value) and value.ndim > 0:
                tensors[f"opt.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = float(value)
    meta = {
        "step": str(step),
        "train_config": json.dumps(asdict(tcfg)),
        "param_groups": json.dumps(opt_state["param_groups"]),
        "opt_scalars": json.dumps(scalars),
        "scheduler": json.dumps(sched.state_dict()),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _load_state(path: Path, modules: Mapping[str, nn.Module], opt, sched) -> int:
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read the training state ({e}); delete it or run without --resume") from e
    for name, module in modules.items():
        prefix = f"model.{name}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: training state does not fit {name}: missing {missing}, unexpected {unexpected}"
            )
    opt_state: dict = {"state": {}, "param_groups": json.loads(meta["param_groups"])}
    for idx, entry in json.loads(meta["opt_scalars"]).items():
        opt_state["state"].setdefault(int(idx), {}).update({k: torch.tensor(v) for k, v in entry.items()})
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            opt_state["state"].setdefault(int(idx), {})[name] = value
    opt.load_state_dict(opt_state)
    step = int(meta["step"])
    saved_steps = json.loads(meta["train_config"])["steps"]
    if saved_steps == sched.total_steps or max(saved_steps, 2) == sched.total_steps:
        sched.load_state_dict(json.loads(meta["scheduler"]))
    elif step < sched.total_steps:
        # a run extended (or shortened) on resume: follow the new schedule from the saved step
        log.warning("%s: schedule length changed from %d to %d steps", path, saved_steps, sched.total_steps)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()" is intended here
            sched.last_epoch = step - 1
            sched.step()
    return step


def train_loop(
    stage: str,
    modules: Mapping[str, nn.Module],
    loss_fn: Callable[[int], dict[str, Tensor]],
    tcfg: TrainConfig,
    run_dir: Path,
    resume: bool = True,
    progress: bool = True,
) -> list[dict]:
    """Train the parameters of ``modules`` for ``tcfg.steps`` steps; return the logged records."""
    run_dir.mkdir(parents=True, exist_ok=True)
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=tcfg.lr, total_steps=max(tcfg.steps, 2), pct_start=tcfg.warmup_frac, anneal_strategy="cos"
    )
    state_path, log_path = _state_path(run_dir, stage), run_dir / f"{stage}.log.jsonl"
    start = 0
    if resume and state_path.exists():
        start = _load_state(state_path, modules, opt, sched)
        log.info("%s: resumed at step %d from %s", stage, start, state_path)
    elif log_path.exists():
        log_path.unlink()
    for m in modules.values():
        m.train()
    records: list[dict] = []
    t0 = time.perf_counter()
    bar = _Progress(stage, tcfg.steps, start, enabled=progress)
    with bar, log_path.open("a") as log_file:
        for step in range(start, tcfg.steps):
            losses = loss_fn(step)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
            opt.step()
            sched.step()
            if not math.isfinite(losses["loss"].item()):
                raise FloatingPointError(f"{stage}: loss became {losses['loss'].item()} at step {step}")
            if (step + 1) % tcfg.log_every == 0 or step + 1 == tcfg.steps:
                record = {"stage": stage, "step": step + 1, "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm)}
                record.update({k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in losses.items()})
                record["seconds"] = round(time.perf_counter() - t0, 2)
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                records.append(record)
                bar.update(step + 1, record["loss"])
            if (step + 1) % tcfg.save_every == 0 and step + 1 < tcfg.steps:
                _save_state(state_path, modules, opt, sched, step + 1, tcfg)
    _save_state(state_path, modules, opt, sched, tcfg.steps, tcfg)
    for m in modules.values():
        m.eval()
    return records


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
