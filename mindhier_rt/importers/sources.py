"""Reading public checkpoint files and telling their layouts apart: VAR, Switti, MindHier generators and the
VQ-VAE, from ``.pth`` / ``.bin`` state dicts or ``config.json`` + ``model.safetensors`` folders."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from mindhier_rt.checkpoint import FORMAT as OUR_FORMAT
from mindhier_rt.checkpoint import MAX_LISTED_KEYS
from mindhier_rt.errors import CheckpointError

LAYOUTS: tuple[str, ...] = ("var", "switti", "mindhier", "vqvae")
TENSOR_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth")


@dataclass(frozen=True)
class SourceFile:
    """The tensors of one public file, the ``config.json`` beside them (if any) and where they came from."""

    path: Path
    tensors: dict[str, Tensor]
    config: dict[str, Any] | None = None
    container: str = "pth"  # "pth" (torch.save) or "safetensors"


def is_mindhier_rt_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a safetensors file with mindhier-rt checkpoint metadata."""
    if not path.is_file() or path.suffix != ".safetensors":
        return False
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return (f.metadata() or {}).get("format") == OUR_FORMAT
    except (SafetensorError, OSError, RuntimeError, ValueError):
        return False


def tensor_file(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(f"{path}: expected a checkpoint file or folder, found no such path")
    if path.is_dir():
        for name in TENSOR_FILES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: expected one of {', '.join(TENSOR_FILES)} in the folder, found none")
    return path


def _read_config_json(folder: Path) -> dict[str, Any] | None:
    p = folder / "config.json"
    if not p.is_file():
        return None
    try:
        conf = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p}: expected the model's constructor arguments as JSON, found: {e}") from None
    if not isinstance(conf, dict):
        raise CheckpointError(f"{p}: expected a JSON object, found {type(conf).__name__}")
    return conf


def _plain_state_dict(p: Path, obj: Any) -> dict[str, Tensor]:
    """A {name: tensor} dict, unwrapping one level of ``{"state_dict": ...}`` / ``{"model": ...}``."""
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            inner = obj.get(wrapper)
            if isinstance(inner, dict) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                return dict(inner)
        if obj and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
            return dict(obj)
    found = type(obj).__name__ if not isinstance(obj, dict) else f"a dict with keys {list(obj)[:5]}"
    raise CheckpointError(f"{p}: expected a plain state dict (tensor name -> tensor), found {found}")


def read_source(path: str | Path) -> SourceFile:
    """Read a public checkpoint: a ``.pth`` state dict, a ``.safetensors`` file or an HF-style folder.

    With safetensors weights, a ``config.json`` in the same folder is read too (Switti, MindHier and the
    Switti VQ-VAE carry their constructor arguments there; ``.pth`` state dicts have none). Raises
    CheckpointError for unreadable files.
    """
    p = tensor_file(Path(path))
    if p.suffix == ".safetensors":
        config = _read_config_json(p.parent)
        try:
            with safe_open(p, framework="pt", device="cpu") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open is not a mapping)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{p}: expected a safetensors file, found an unreadable one ({e})") from None
        return SourceFile(p, tensors, config, "safetensors")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights-only errors all arrive as different types
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{p}: expected a torch.save state dict readable with weights_only=True, found: {detail}"
        ) from None
    return SourceFile(p, _plain_state_dict(p, obj), None, "pth")


def detect_layout(src: SourceFile) -> str:
    """Which public layout the tensor names say this is (one of ``LAYOUTS``)."""
    t = src.tensors
    if any(k.startswith(("fMRI_encoder.", "image_decoder.decoder.")) for k in t):
        raise CheckpointError(
            f"{src.path}: this is MindHier's reference fMRI encoder (fMRI2CLIP). It cannot be imported: its "
            "post-norm nn.TransformerDecoder branches, LayerNorm-free voxel MLP and unprojected levels are a "
            "different architecture from mindhier-rt's HierarchicalEncoder. Train an encoder with "
            "`mindhier-rt train stage1` instead."
        )
    if "class_emb.weight" in t and any(k.endswith(".attn.mat_qkv.weight") for k in t):
        return "var"
    if "text_pooler.weight" in t:
        return "switti"
    if "fmri_pooler.weight" in t and any(k.endswith(".attn.to_qkv.weight") for k in t):
        return "mindhier"
    if "quantize.embedding.weight" in t and "decoder.conv_in.weight" in t:
        return "vqvae"
    shown = ", ".join(sorted(t)[:MAX_LISTED_KEYS])
    raise CheckpointError(
        f"{src.path}: expected a VAR, Switti or MindHier generator or a VAR-style VQ-VAE (class_emb.*, "
        f"text_pooler.*, fmri_pooler.* or quantize.embedding.weight), found tensors: {shown}"
    )
