"""The training state file: everything that influences later steps, written atomically and checked on reading.

``<run_dir>/<stage>.state.safetensors`` (no pickle) holds, as tensors:

* ``model.<module>.<key>``: the trained modules' state dicts,
* ``aux.<name>.<key>``: other state a stage's steps depend on (the VQ-VAE's codebook-restart usage statistics),
* ``opt.<param index>.<key>``: the optimizer's moment tensors,
* ``rng.torch_cpu`` (and ``rng.torch_cuda`` on a GPU): torch's generators, for any torch randomness in a step;

and as JSON metadata the step, the train config, the optimizer's param groups and scalar states, the LR scheduler
and the fp16 gradient scaler. Batches come from ``batch_rng(seed, step)``, so the data order needs no state.

Reading checks, before a tensor is loaded: the header's size and byte ranges, the metadata entries, the step
(0..steps), the run's settings against the current ones, every tensor's name and shape against the modules and
the optimizer; while loading: no NaN or inf anywhere. Anything wrong raises CheckpointError naming what was
expected and what was found.
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from mindhier_rt.checkpoint import require_finite
from mindhier_rt.errors import CheckpointError
from mindhier_rt.io import atomic_path
from mindhier_rt.safetensors_header import read_safetensors_header
from mindhier_rt.train.distributed import DistContext, full_tensor, is_sharded, shard_like

if TYPE_CHECKING:
    from mindhier_rt.train.config import TrainConfig

log = logging.getLogger(__name__)

META_KEYS = ("step", "train_config", "param_groups", "opt_scalars", "scheduler")
# settings that change what a step computes: a resumed run must use the saved values (steps may change)
RUN_SETTINGS = ("batch_size", "lr", "weight_decay", "warmup_frac", "grad_clip", "seed", "amp")
OPT_TENSOR_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
NO_RESUME = "delete it or pass --no-resume to start over"


class Stateful(Protocol):
    """State a stage's steps depend on besides the modules (tensors only)."""

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> Any: ...


def state_path(run_dir: Path, stage: str) -> Path:
    return run_dir / f"{stage}.state.safetensors"


def _rng_tensors(device: torch.device) -> dict[str, Tensor]:
    rng = {"rng.torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["rng.torch_cuda"] = torch.cuda.get_rng_state(device)
    return rng


def save_state(
    path: Path,
    modules: Mapping[str, nn.Module],
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    tcfg: TrainConfig,
    ctx: DistContext | None = None,
    scaler=None,
    aux: Mapping[str, Stateful] | None = None,
) -> None:
    """Write the state file (rank 0), atomically. Sharded tensors are gathered whole first (every rank helps)."""
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
    for name, obj in (aux or {}).items():
        for key, value in obj.state_dict().items():
            tensors[f"aux.{name}.{key}"] = value.detach().cpu().contiguous().clone()
    tensors.update(_rng_tensors(ctx.device))
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


def _json(path: Path, meta: Mapping[str, str], key: str, kind: type) -> Any:
    try:
        value = json.loads(meta[key])
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: expected JSON in the state's {key!r} entry, found invalid JSON ({e})") from None
    if not isinstance(value, kind):
        raise CheckpointError(f"{path}: expected a JSON {kind.__name__} as {key!r}, found {type(value).__name__}")
    return value


def _check_meta(path: Path, meta: Mapping[str, str], tcfg: TrainConfig) -> int:
    """The saved step, after checking the metadata entries and the run's settings."""
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: expected state entries {', '.join(META_KEYS)}, missing {', '.join(missing)}")
    raw = meta["step"]
    if not re.fullmatch(r"[0-9]{1,12}", raw):
        raise CheckpointError(f"{path}: expected a non-negative integer step, found {raw!r:.40}; {NO_RESUME}")
    step = int(raw)
    if step > tcfg.steps:
        raise CheckpointError(
            f"{path}: the state is at step {step}, beyond the end of training (--steps {tcfg.steps}): pass "
            f"--steps above {step} to continue it, or --no-resume to start over"
        )
    saved = _json(path, meta, "train_config", dict)
    changed = [
        f"{k}: saved {saved.get(k)!r}, now {getattr(tcfg, k)!r}"
        for k in RUN_SETTINGS
        if saved.get(k) != getattr(tcfg, k)
    ]
    if changed:
        raise CheckpointError(
            f"{path}: expected the saved run's settings on resume, found changes ({'; '.join(changed)}); pass the "
            f"saved values, or --no-resume to start over"
        )
    return step


def _expected_shapes(modules: Mapping[str, nn.Module], aux: Mapping[str, Stateful]) -> dict[str, tuple[int, ...]]:
    """Every tensor name a state file must hold, with its shape (optimizer moments and the CUDA generator, which a
    run on the CPU does not save, are checked separately)."""
    shapes = {f"model.{n}.{k}": tuple(v.shape) for n, m in modules.items() for k, v in m.state_dict().items()}
    shapes.update({f"aux.{n}.{k}": tuple(v.shape) for n, a in aux.items() for k, v in a.state_dict().items()})
    shapes["rng.torch_cpu"] = tuple(torch.get_rng_state().shape)
    return shapes


def _check_names_and_shapes(
    path: Path, listed: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], params: list[Tensor]
) -> None:
    problems = []
    missing = [k for k in expected if k not in listed]
    misshaped = [
        f"{k}: expected {expected[k]}, found {listed[k]}" for k in expected if k in listed and listed[k] != expected[k]
    ]
    unexpected = []
    for key, shape in listed.items():
        if key in expected or key == "rng.torch_cuda":
            continue
        parts = key.split(".", 2)
        if parts[0] != "opt" or len(parts) != 3 or not parts[1].isdigit() or parts[2] not in OPT_TENSOR_KEYS:
            unexpected.append(key)
        elif int(parts[1]) >= len(params):
            unexpected.append(f"{key} (the optimizer has {len(params)} parameters)")
        elif shape != tuple(params[int(parts[1])].shape):
            misshaped.append(f"{key}: expected {tuple(params[int(parts[1])].shape)}, found {shape}")
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            more = f", ... and {len(items) - 5} more" if len(items) > 5 else ""
            problems.append(f"{label} tensors ({len(items)}): {', '.join(items[:5])}{more}")
    if problems:
        raise CheckpointError(f"{path}: the training state does not fit this run: {' | '.join(problems)}; {NO_RESUME}")


def _load_optimizer(
    path: Path, opt: torch.optim.Optimizer, meta: Mapping[str, str], tensors: dict[str, Tensor]
) -> None:
    groups = _json(path, meta, "param_groups", list)
    sizes = [len(g["params"]) if isinstance(g, dict) and isinstance(g.get("params"), list) else None for g in groups]
    want = [len(g["params"]) for g in opt.param_groups]
    if sizes != want:
        raise CheckpointError(f"{path}: expected optimizer param groups of sizes {want}, found {sizes}; {NO_RESUME}")
    state: dict[int, dict[str, Tensor]] = {}
    for idx, entry in _json(path, meta, "opt_scalars", dict).items():
        if not (idx.isdigit() and int(idx) < sum(want) and isinstance(entry, dict)):
            raise CheckpointError(
                f"{path}: expected optimizer scalars per parameter index, found {idx!r}: {entry!r:.60}"
            )
        for k, v in entry.items():
            if not isinstance(v, int | float) or not math.isfinite(v):
                raise CheckpointError(f"{path}: expected a finite optimizer scalar {idx}.{k}, found {v!r:.40}")
            state.setdefault(int(idx), {})[k] = torch.tensor(float(v))
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: expected a matching optimizer state, found one that does not load ({e})") from e


def _load_scheduler(path: Path, sched, meta: Mapping[str, str], step: int) -> None:
    saved_steps = _json(path, meta, "train_config", dict).get("steps")
    state = _json(path, meta, "scheduler", dict)
    if state.get("last_epoch") != step:
        raise CheckpointError(
            f"{path}: expected the LR schedule at step {step}, found it at {state.get('last_epoch')!r}; {NO_RESUME}"
        )
    if saved_steps == sched.total_steps or (isinstance(saved_steps, int) and max(saved_steps, 2) == sched.total_steps):
        try:
            sched.load_state_dict(state)
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: expected a one-cycle LR scheduler state, found ({e})") from e
    elif step < sched.total_steps:
        # a run extended (or shortened) on resume: follow the new schedule from the saved step
        log.warning("%s: schedule length changed from %s to %d steps", path, saved_steps, sched.total_steps)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()" is intended here
            sched.last_epoch = step - 1
            sched.step()


def load_state(
    path: Path,
    modules: Mapping[str, nn.Module],
    opt: torch.optim.Optimizer,
    sched,
    tcfg: TrainConfig,
    scaler=None,
    aux: Mapping[str, Stateful] | None = None,
    device: torch.device | None = None,
    restore_rng: bool = True,
) -> int:
    """Restore modules, optimizer, scheduler, scaler, auxiliary state and torch's generators; return the step.

    Everything is checked against the run before a tensor is read; tensors are read one at a time, and a rank of
    a sharded (FSDP) run keeps only its shard of each. The generators saved are rank 0's: under torchrun only rank 0
    restores them (``restore_rng``); the stages draw no torch randomness inside a step, their batches and draws
    come from ``batch_rng(seed, step)``.
    """
    aux = aux or {}
    device = device or torch.device("cpu")
    header = read_safetensors_header(path)
    step = _check_meta(path, header.metadata, tcfg)
    params = [p for group in opt.param_groups for p in group["params"]]
    listed = {k: spec.shape for k, spec in header.tensors.items()}
    _check_names_and_shapes(path, listed, _expected_shapes(modules, aux), params)

    current = {name: module.state_dict() for name, module in modules.items()}
    states: dict[str, dict[str, Tensor]] = {name: {} for name in modules}
    aux_states: dict[str, dict[str, Tensor]] = {name: {} for name in aux}
    opt_tensors: dict[str, Tensor] = {}
    rng: dict[str, Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                value = f.get_tensor(key)
                require_finite(path, key, value)
                kind, rest = key.split(".", 1)
                if kind == "opt":
                    opt_tensors[key] = shard_like(value, params[int(rest.split(".", 1)[0])])
                elif kind == "rng":
                    rng[key] = value
                else:
                    name, k = rest.split(".", 1)
                    if kind == "aux":
                        aux_states[name][k] = value
                    else:
                        states[name][k] = shard_like(value, current[name][k])
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read the training state ({e}); {NO_RESUME}") from e
    for name, module in modules.items():
        module.load_state_dict(states[name])
    for name, obj in aux.items():
        obj.load_state_dict(aux_states[name])
    _load_optimizer(path, opt, header.metadata, opt_tensors)
    if scaler is not None and "grad_scaler" in header.metadata:
        scaler.load_state_dict(_json(path, header.metadata, "grad_scaler", dict))
    _load_scheduler(path, sched, header.metadata, step)
    if not restore_rng:
        return step
    try:
        torch.set_rng_state(rng["rng.torch_cpu"])
        if "rng.torch_cuda" in rng and device.type == "cuda":  # none to set after a move between CPU and GPU
            torch.cuda.set_rng_state(rng["rng.torch_cuda"], device)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: expected torch generator states, found invalid ones ({e})") from e
    return step
