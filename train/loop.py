"""The one training loop every stage uses: AdamW + one-cycle LR, gradient clipping, a progress bar,
a JSON-lines loss log and resumable state.

A stage supplies ``loss_fn(step) -> {"loss": total, other terms...}``; batches are drawn from
``batch_rng(seed, step)``, so a resumed run sees exactly the batches an uninterrupted one would.
State lives in ``<run_dir>/<stage>.state.safetensors``: the trained modules, the optimizer tensors and,
as JSON metadata, the step, the optimizer's param groups, the LR scheduler and the fp16 gradient scaler (no pickle).

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
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from mindhier_rt.errors import CheckpointError, ConfigError
from mindhier_rt.io import atomic_path
from mindhier_rt.train.distributed import DistContext, full_tensor, is_sharded, shard_like

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
    amp: str = "off"  # autocast dtype of the loss computation: off, bf16 or fp16 (with gradient scaling)


AMP_DTYPES: dict[str, torch.dtype | None] = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of an ``--amp`` value (None for "off"); ConfigError for anything else."""
    if amp not in AMP_DTYPES:
        raise ConfigError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    return AMP_DTYPES[amp]


def batch_rng(seed: int, step: int) -> np.random.Generator:
    """The random stream of one step: independent of how the run was split across restarts."""
    return np.random.default_rng([seed, step])


def _state_path(run_dir: Path, stage: str) -> Path:
    return run_dir / f"{stage}.state.safetensors"


def _save_state(
    path: Path,
    modules: Mapping[str, nn.Module],
    opt,
    sched,
    step: int,
    tcfg: TrainConfig,
    ctx: DistContext | None = None,
    scaler=None,
) -> None:
    """Write the state file (rank 0). Sharded tensors are gathered whole first, which every rank takes part in."""
    ctx = ctx or DistContext()
    sharded = any(is_sharded(p) for m in modules.values() for p in m.parameters())
    if not ctx.is_main and not sharded:
        return
    keep = ctx.is_main  # other ranks only help gather
    tensors: dict[str, Tensor] = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            full = full_tensor(value)
            if keep:
                tensors[f"model.{name}.{key}"] = full.contiguous().clone()
    opt_state = opt.state_dict()
    scalars: dict[str, dict[str, float]] = {}
    for idx, entry in opt_state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value) and value.ndim > 0:
                full = full_tensor(value)
                if keep:
                    tensors[f"opt.{idx}.{key}"] = full.contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = float(value)
    if not keep:
        return
    meta = {
        "step": str(step),
        "train_config": json.dumps(asdict(tcfg)),
        "param_groups": json.dumps(opt_state["param_groups"]),
        "opt_scalars": json.dumps(scalars),
        "scheduler": json.dumps(sched.state_dict()),
    }
    if scaler is not None:
        meta["grad_scaler"] = json.dumps(scaler.state_dict())
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _load_state(path: Path, modules: Mapping[str, nn.Module], opt, sched, scaler=None) -> int:
    """Restore modules, optimizer, scheduler (and scaler) from a state file; return the saved step.

    Tensors are read one at a time; a rank of a sharded (FSDP) run keeps only its shard of each.
    """
    current = {name: module.state_dict() for name, module in modules.items()}
    params = [p for group in opt.param_groups for p in group["params"]]
    states: dict[str, dict[str, Tensor]] = {name: {} for name in modules}
    opt_tensors: dict[str, Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            for key in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                if key.startswith("opt."):
                    idx = int(key.split(".", 2)[1])
                    like = params[idx] if idx < len(params) else None
                    value = f.get_tensor(key)
                    opt_tensors[key] = value if like is None else shard_like(value, like)
                    continue
                for name in modules:
                    prefix = f"model.{name}."
                    if key.startswith(prefix):
                        k = key[len(prefix) :]
                        value = f.get_tensor(key)
                        states[name][k] = shard_like(value, current[name][k]) if k in current[name] else value
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read the training state ({e}); delete it or run without --resume") from e
    for name, module in modules.items():
        state = states[name]
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: training state does not fit {name}: missing {missing}, unexpected {unexpected}"
            )
    opt_state: dict = {"state": {}, "param_groups": json.loads(meta["param_groups"])}
    for idx, entry in json.loads(meta["opt_scalars"]).items():
        opt_state["state"].setdefault(int(idx), {}).update({k: torch.tensor(v) for k, v in entry.items()})
    for key, value in opt_tensors.items():
        _, idx, name = key.split(".", 2)
        opt_state["state"].setdefault(int(idx), {})[name] = value
    opt.load_state_dict(opt_state)
    if scaler is not None and "grad_scaler" in meta:
        scaler.load_state_dict(json.loads(meta["grad_scaler"]))
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
    dist: DistContext | None = None,
) -> list[dict]:
    """Train the parameters of ``modules`` for ``tcfg.steps`` steps; return the logged records.

    ``modules`` are the unwrapped modules (their state dicts name the saved tensors); under torchrun the stage
    has already wrapped them for ``dist`` and calls the wrappers in ``loss_fn``. Every rank returns the same
    records (losses averaged over ranks).
    """
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
    state_path, log_path = _state_path(run_dir, stage), run_dir / f"{stage}.log.jsonl"
    start = 0
    if ctx.agree(resume and state_path.exists()):
        start = _load_state(state_path, modules, opt, sched, precision.scaler)
        log.info("%s: resumed at step %d from %s", stage, start, state_path)
    elif ctx.is_main and log_path.exists():
        log_path.unlink()
    for m in modules.values():
        m.train()
    records: list[dict] = []
    t0 = time.perf_counter()
    bar = _Progress(stage, tcfg.steps, start, enabled=progress and ctx.is_main)
    with bar, contextlib.ExitStack() as files:
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
            if (step + 1) % tcfg.save_every == 0 and step + 1 < tcfg.steps:
                _save_state(state_path, modules, opt, sched, step + 1, tcfg, ctx, precision.scaler)
    _save_state(state_path, modules, opt, sched, tcfg.steps, tcfg, ctx, precision.scaler)
    for m in modules.values():
        m.eval()
    return records


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
