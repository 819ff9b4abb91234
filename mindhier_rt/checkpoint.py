"""The mindhier-rt checkpoint format: one ``.safetensors`` file holding any subset of the three models.

Tensor names carry the model as a prefix (``encoder.*``, ``generator.*``, ``vqvae.*``). The safetensors
header metadata (str -> str) holds:

* ``format``: ``"mindhier-rt-checkpoint"``
* ``format_version``: ``"1"``
* ``config``: JSON of ``ModelConfig.to_dict()``
* ``parts``: comma-separated list of the models present (a part may hold no tensors)
* ``extra`` (optional): JSON object of caller metadata (training step, data hashes, ...)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from mindhier_rt.config import ModelConfig
from mindhier_rt.errors import CheckpointError, MindhierError
from mindhier_rt.io import atomic_write
from mindhier_rt.safetensors_header import TensorSpec, read_safetensors_header

log = logging.getLogger(__name__)

PathLike: TypeAlias = "str | os.PathLike[str]"
M = TypeVar("M", bound=nn.Module)

FORMAT = "mindhier-rt-checkpoint"
FORMAT_VERSION = 1
PARTS: tuple[str, ...] = ("encoder", "generator", "vqvae")
MAX_LISTED_KEYS = 10

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "PARTS",
    "Checkpoint",
    "CheckpointHeader",
    "check_header_shapes",
    "checkpoint_info",
    "load_part",
    "read_checkpoint",
    "read_checkpoint_header",
    "require_finite",
    "save_checkpoint",
]

# What safetensors, the OS or torch raise on a corrupt or truncated file.
_READ_ERRORS = (SafetensorError, OSError, RuntimeError, ValueError)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read into memory: the config, each part's state dict and the caller's metadata."""

    cfg: ModelConfig
    parts: dict[str, dict[str, torch.Tensor]]
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    format_version: int = FORMAT_VERSION


@dataclass(frozen=True)
class CheckpointHeader:
    """What a checkpoint holds, read from its header alone (no tensor loaded): nothing is allocated for the
    tensors yet, so a caller can check the config against the listed shapes before building anything."""

    cfg: ModelConfig
    parts: tuple[str, ...]
    extra: dict[str, Any]
    format_version: int
    tensors: dict[str, TensorSpec] = field(default_factory=dict)  # "part.name" -> dtype, shape, bytes
    path: Path | None = None

    def shapes(self, part: str) -> dict[str, tuple[int, ...]]:
        """The listed tensors of ``part`` (names without the prefix) and their shapes."""
        prefix = f"{part}."
        return {k[len(prefix) :]: s.shape for k, s in self.tensors.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------------------------------
# writing


def _state_tensors(modules: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Prefixed, contiguous CPU tensors of every module's state dict; tensors sharing memory are cloned."""
    tensors: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for part, module in modules.items():
        if part not in PARTS:
            raise ValueError(f"expected a part name among {', '.join(PARTS)}, found {part!r}")
        for name, value in module.state_dict().items():
            key = f"{part}.{name}"
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"expected tensors in the state dict of {part!r}, found {type(value).__name__} at {key}"
                )
            t = value.detach().to("cpu").contiguous()
            ptr = t.untyped_storage().data_ptr()
            if t.numel() and ptr in seen_storages:  # tied weights: safetensors refuses shared memory
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            if t.numel():
                seen_storages.add(ptr)
            tensors[key] = t
    return tensors


def save_checkpoint(
    path: PathLike, cfg: ModelConfig, modules: Mapping[str, nn.Module], extra: Mapping[str, Any] | None = None
) -> Path:
    """Write ``modules`` (part name -> module, any subset of :data:`PARTS`) and ``cfg`` to one file, atomically.

    ``extra`` must be JSON-serialisable; it comes back as ``Checkpoint.extra``. Returns the path.
    """
    if not modules:
        raise ValueError(f"expected at least one module among {', '.join(PARTS)}, found none")
    tensors = _state_tensors(modules)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(cfg.to_dict(), sort_keys=True),
        "parts": ",".join(modules),
    }
    if extra is not None:
        try:
            metadata["extra"] = json.dumps(dict(extra), sort_keys=True, allow_nan=True)
        except (TypeError, ValueError) as e:
            raise ValueError(f"expected JSON-serialisable checkpoint metadata in extra, found: {e}") from e
    target = atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    log.debug("saved checkpoint %s: parts %s, %d tensors", target, metadata["parts"], len(tensors))
    return target


# --------------------------------------------------------------------------------------------------
# reading


def _require_file(p: Path) -> None:
    if not p.exists():
        raise CheckpointError(f"{p}: expected a checkpoint file, found no such file")
    if not p.is_file():
        raise CheckpointError(f"{p}: expected a checkpoint file, found a folder or special file")


def _parse_metadata(p: Path, meta: Mapping[str, str] | None) -> CheckpointHeader:
    """Validate our header metadata and decode it."""
    meta = dict(meta or {})
    fmt = meta.get("format")
    if fmt is None:
        raise CheckpointError(
            f"{p}: expected metadata format={FORMAT!r}, found none (a plain safetensors file, not a mindhier-rt "
            "checkpoint)"
        )
    if fmt != FORMAT:
        raise CheckpointError(f"{p}: expected metadata format={FORMAT!r}, found format={fmt!r}")
    raw_version = meta.get("format_version")
    try:
        version = int(raw_version)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise CheckpointError(f"{p}: expected an integer format_version, found {raw_version!r}") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{p}: expected format_version <= {FORMAT_VERSION}, found {version} (written by a newer mindhier-rt; "
            "upgrade to read it)"
        )
    if version < 1:
        raise CheckpointError(f"{p}: expected format_version 1..{FORMAT_VERSION}, found {version}")

    raw_cfg = meta.get("config")
    if raw_cfg is None:
        raise CheckpointError(f"{p}: expected a 'config' entry in the metadata, found none")
    try:
        cfg_dict = json.loads(raw_cfg)
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{p}: expected the config as JSON, found invalid JSON ({e})") from None
    if not isinstance(cfg_dict, dict):
        raise CheckpointError(f"{p}: expected the config as a JSON object, found {type(cfg_dict).__name__}")
    try:
        cfg = ModelConfig.from_dict(cfg_dict)
    except (MindhierError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{p}: expected a valid model config, found a malformed one ({e})") from None

    raw_parts = meta.get("parts")
    if raw_parts is None:
        raise CheckpointError(f"{p}: expected a 'parts' entry in the metadata, found none")
    parts = tuple(s.strip() for s in raw_parts.split(",") if s.strip())
    unknown = [s for s in parts if s not in PARTS]
    if unknown or len(set(parts)) != len(parts):
        raise CheckpointError(f"{p}: expected distinct parts among {', '.join(PARTS)}, found {raw_parts!r}")

    extra: Any = {}
    if "extra" in meta:
        try:
            extra = json.loads(meta["extra"])
        except (json.JSONDecodeError, RecursionError) as e:
            raise CheckpointError(f"{p}: expected 'extra' metadata as JSON, found invalid JSON ({e})") from None
        if not isinstance(extra, dict):
            raise CheckpointError(f"{p}: expected 'extra' metadata as a JSON object, found {type(extra).__name__}")
    return CheckpointHeader(cfg=cfg, parts=parts, extra=extra, format_version=version, path=p)


def _split_key(p: Path, key: str, parts: tuple[str, ...]) -> tuple[str, str]:
    part, _, name = key.partition(".")
    if part not in parts or not name:
        raise CheckpointError(
            f"{p}: expected tensor names prefixed by a listed part ({', '.join(parts) or 'none'}), found {key!r}"
        )
    return part, name


def _corrupt(p: Path, e: BaseException) -> CheckpointError:
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return CheckpointError(f"{p}: expected a safetensors checkpoint, found an unreadable or corrupt file ({detail})")


def require_finite(where: object, name: str, t: torch.Tensor) -> None:
    """Refuse a floating-point tensor holding NaN or inf: such weights decode to garbage without any error."""
    if t.is_floating_point() or t.is_complex():
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            nan, bad = int(torch.isnan(t).sum()), int((~finite).sum())
            raise CheckpointError(
                f"{where}: expected finite values in tensor {name!r}, found {nan} NaN and {bad - nan} inf "
                f"of {t.numel()}"
            )


def read_checkpoint_header(path: PathLike) -> CheckpointHeader:
    """Config, parts, metadata and the listed tensors' shapes, without loading a tensor (the JSON header's size
    is capped). Raises CheckpointError."""
    p = Path(path)
    _require_file(p)
    raw = read_safetensors_header(p)
    header = _parse_metadata(p, raw.metadata)
    for key in raw.tensors:
        _split_key(p, key, header.parts)
    return dataclasses.replace(header, tensors=raw.tensors)


def read_checkpoint(path: PathLike, header: CheckpointHeader | None = None) -> Checkpoint:
    """Read and validate a checkpoint; tensors are loaded on the CPU. Raises CheckpointError, also for a
    NaN or inf weight (naming the tensor). ``header``: the file's :func:`read_checkpoint_header`, if read already.
    """
    header = header or read_checkpoint_header(path)
    p = Path(path)
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in header.parts}
    try:
        with safe_open(p, framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                part, name = _split_key(p, key, header.parts)
                if key not in header.tensors:
                    raise CheckpointError(f"{p}: tensor {key!r} is not in the header read before; the file changed")
                parts[part][name] = f.get_tensor(key)
                require_finite(p, key, parts[part][name])
    except _READ_ERRORS as e:
        raise _corrupt(p, e) from e
    log.debug("read checkpoint %s: config %s, parts %s", p, header.cfg.name, ", ".join(parts))
    return Checkpoint(cfg=header.cfg, parts=parts, extra=header.extra, path=p, format_version=header.format_version)


def checkpoint_info(path: PathLike) -> dict[str, Any]:
    """Summary without loading tensors: config name, parts with tensor / parameter / byte counts, extra."""
    p = Path(path)
    header = read_checkpoint_header(p)
    parts: dict[str, dict[str, Any]] = {
        name: {"tensors": 0, "parameters": 0, "bytes": 0, "dtypes": []} for name in header.parts
    }
    for key, spec in header.tensors.items():
        part, _ = _split_key(p, key, header.parts)
        info = parts[part]
        info["tensors"] += 1
        info["parameters"] += math.prod(spec.shape)
        info["bytes"] += spec.nbytes
        if spec.dtype not in info["dtypes"]:
            info["dtypes"].append(spec.dtype)
    for info in parts.values():
        info["dtypes"].sort()
    return {
        "path": str(p),
        "format_version": header.format_version,
        "config_name": header.cfg.name,
        "image_size": header.cfg.image_size,
        "parts": parts,
        "tensors": sum(i["tensors"] for i in parts.values()),
        "tensor_bytes": sum(i["bytes"] for i in parts.values()),
        "file_bytes": p.stat().st_size,
        "extra": header.extra,
    }


# --------------------------------------------------------------------------------------------------
# loading into modules


def _listing(label: str, items: list[str], sep: str = ", ") -> str:
    shown = sep.join(items[:MAX_LISTED_KEYS])
    more = f"{sep}... and {len(items) - MAX_LISTED_KEYS} more" if len(items) > MAX_LISTED_KEYS else ""
    return f"{label} ({len(items)}): {shown}{more}"


def check_header_shapes(header: CheckpointHeader, planned: Mapping[str, Mapping[str, tuple[int, ...]]]) -> None:
    """Refuse a checkpoint whose listed tensors do not match ``planned`` (part -> name -> shape: the state dicts
    its config builds), before any tensor is loaded or model built. Names every missing, unexpected and
    mis-shaped tensor of every listed part."""
    where = header.path if header.path is not None else "checkpoint"
    problems = []
    for part in header.parts:
        listed, target = header.shapes(part), planned.get(part, {})
        missing = [k for k in target if k not in listed]
        unexpected = [k for k in listed if k not in target]
        misshaped = [
            f"{k}: expected {target[k]}, found {listed[k]}" for k in target if k in listed and listed[k] != target[k]
        ]
        found = [
            _listing(label, items, sep)
            for label, items, sep in (
                ("missing keys", missing, ", "),
                ("unexpected keys", unexpected, ", "),
                ("mis-shaped keys", misshaped, "; "),
            )
            if items
        ]
        if found:
            problems.append(f"part {part!r}: " + " | ".join(found))
    if problems:
        builds = f"the tensors do not match the model its config {header.cfg.name!r} builds"
        raise CheckpointError(f"{where}: {builds}: " + " || ".join(problems))


def load_part(module: M, ckpt: Checkpoint, part: str, strict: bool = True) -> M:
    """Load ``ckpt.parts[part]`` into ``module`` (cast to its dtypes); returns the module.

    Mis-shaped tensors always raise CheckpointError; missing and unexpected keys raise when ``strict``
    and are logged as warnings otherwise. The message names the offending keys.
    """
    where = ckpt.path if ckpt.path is not None else "checkpoint"
    if part not in ckpt.parts:
        found = ", ".join(ckpt.parts) or "none"
        raise CheckpointError(f"{where}: expected a part {part!r}, found parts: {found}")
    source = ckpt.parts[part]
    target = module.state_dict()
    missing = [k for k in target if k not in source]
    unexpected = [k for k in source if k not in target]
    misshaped = [
        f"{k}: expected {tuple(target[k].shape)}, found {tuple(source[k].shape)}"
        for k in target
        if k in source and source[k].shape != target[k].shape
    ]
    problems = []
    if strict and missing:
        problems.append(_listing("missing keys", missing))
    if strict and unexpected:
        problems.append(_listing("unexpected keys", unexpected))
    if misshaped:
        problems.append(_listing("mis-shaped keys", misshaped, sep="; "))
    if problems:
        raise CheckpointError(f"{where}: part {part!r} does not match the model: " + " | ".join(problems))
    if missing or unexpected:
        log.warning(
            "%s: part %r loaded non-strictly: %s",
            where,
            part,
            " | ".join(
                s
                for s in (
                    _listing("missing keys", missing) if missing else "",
                    _listing("unexpected keys", unexpected) if unexpected else "",
                )
                if s
            ),
        )
    state = {k: source[k].to(dtype=target[k].dtype) for k in target if k in source}
    module.load_state_dict(state, strict=strict)
    return module
