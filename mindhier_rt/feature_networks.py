"""The feature networks of the NSD evaluation protocol and where their weights are found.

AlexNet, Inception-v3, EfficientNet-B1 and SwAV ResNet-50 (torchvision architectures) and CLIP ViT-L/14 (open_clip)
with weights from local files only, looked up by the names of :data:`NETWORKS` (ours first, then the names the files
have where they are published) in the folders of :func:`weight_search_path`. :class:`TapExtractor` reads a
network's layer outputs; :class:`ClipFeatures` the CLIP image embedding. Inputs are normalised with the ImageNet
mean and std (CLIP's own for CLIP).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mindhier_rt.errors import InputError, MissingDependencyError
from mindhier_rt.io import PathLike
from mindhier_rt.metrics import (
    resize,
)

__all__ = [
    "CLIP_SIZE",
    "NETWORKS",
    "ClipFeatures",
    "Network",
    "TapExtractor",
    "load_network",
    "weight_search_path",
]

CLIP_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _torchvision():
    try:
        import torchvision
    except ImportError as e:
        raise MissingDependencyError(
            "the evaluation networks need torchvision: pip install 'mindhier-rt[train]'"
        ) from e
    return torchvision


def _alexnet() -> nn.Module:
    return _torchvision().models.alexnet(weights=None)


def _inception() -> nn.Module:
    # the published weights expect transform_input=True (torchvision sets it when it loads them itself)
    return _torchvision().models.inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)


def _efficientnet_b1() -> nn.Module:
    return _torchvision().models.efficientnet_b1(weights=None)


def _resnet50() -> nn.Module:
    return _torchvision().models.resnet50(weights=None)


@dataclass(frozen=True)
class Network:
    """A torchvision network of the protocol: its accepted weight files, input side and layers."""

    name: str
    files: tuple[str, ...]  # accepted names in the weights folder; the first is the one asked for
    size: int
    layers: tuple[str, ...]
    build: Callable[[], nn.Module]
    optional_missing: tuple[str, ...] = ()  # key prefixes the weight file may lack
    ignored_unexpected: tuple[str, ...] = ()  # key prefixes of the file that the network does not have


NETWORKS: dict[str, Network] = {
    "alexnet": Network("alexnet", ("alexnet.pth", "alexnet-owt-7be5be79.pth"), 256, ("features.4", "features.11"),
                       _alexnet),
    "inception": Network("inception", ("inception_v3.pth", "inception_v3_google-0cc3c7bd.pth"), 342, ("avgpool",),
                         _inception),
    "effnet": Network("effnet", ("efficientnet_b1.pth", "efficientnet_b1-c27df63c.pth",
                                 "efficientnet_b1_rwightman-bac287d4.pth"), 255, ("avgpool",), _efficientnet_b1),
    "swav": Network("swav", ("swav_resnet50.pth", "swav_800ep_pretrain.pth.tar"), 224, ("avgpool",), _resnet50,
                    optional_missing=("fc.",), ignored_unexpected=("projection_head.", "prototypes.")),
}  # fmt: skip


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no code runs
    except Exception as e:  # torch.load raises many kinds for a bad file
        raise InputError(
            f"{path}: expected a PyTorch state dict (torch.save or safetensors), found an unreadable file ({e})"
        ) from e
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise InputError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_network(net: Network, path: Path) -> nn.Module:
    """The network with the weights of ``path`` (a torchvision-layout state dict), in eval mode, float32.

    The network is built on the meta device and takes the file's tensors as they are (no random init first);
    modules whose weights the file may lack (``optional_missing``, e.g. SwAV's classifier) get a fresh init.
    """
    with torch.device("meta"):
        model = net.build()
    state = _read_state_dict(path)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(net.ignored_unexpected)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches
        raise InputError(f"{path}: expected the weights of torchvision's {net.name}, found other shapes ({e})") from e
    required = [k for k in missing if not k.startswith(net.optional_missing)]
    if required or unexpected:
        raise InputError(
            f"{path}: expected the weights of torchvision's {net.name}, found {len(required)} missing keys "
            f"{required[:4]} and {len(unexpected)} unexpected keys {unexpected[:4]}"
        )
    for name in sorted({k.rsplit(".", 1)[0] for k in missing}):
        module = model.get_submodule(name).to_empty(device="cpu")
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise InputError(f"{path}: expected every tensor of torchvision's {net.name}, found no value for {left[:4]}")
    return model.eval().requires_grad_(False)


def _normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class TapExtractor:
    """Flattened outputs [N, F] of named submodules for images in [0, 1], at the network's input side."""

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        device: str = "cpu",
        batch: int = 16,
    ) -> None:
        self.model = model.to(device).eval()
        self.layers, self.size, self.mean, self.std = tuple(layers), size, tuple(mean), tuple(std)
        self.device, self.batch = device, batch
        for name in self.layers:
            self.model.get_submodule(name)  # AttributeError now rather than mid-run

    @torch.no_grad()
    def __call__(self, images_N3HW: Tensor) -> dict[str, Tensor]:
        captured: dict[str, Tensor] = {}
        hooks = [
            self.model.get_submodule(name).register_forward_hook(
                lambda _m, _i, out, name=name: captured.__setitem__(name, out)
            )
            for name in self.layers
        ]
        outs: dict[str, list[Tensor]] = {name: [] for name in self.layers}
        try:
            for start in range(0, images_N3HW.shape[0], self.batch):
                x = resize(images_N3HW[start : start + self.batch].float(), self.size)
                self.model(_normalize(x, self.mean, self.std).to(self.device))
                for name in self.layers:
                    outs[name].append(captured[name].flatten(1).float().cpu().clone())
        finally:
            for h in hooks:
                h.remove()
        return {name: torch.cat(parts) for name, parts in outs.items()}


class ClipFeatures:
    """CLIP (open_clip, local weights): the protocol's image embedding and the pooled-token embedding.

    ``embedding``: ``encode_image`` of the image resized bilinearly to 224 px (the protocol's CLIP metric).
    ``pooled``: the mean over the final layer's projected tokens, with the stage-1 teacher's preprocessing:
    the space of the encoder's pooled output, used for retrieval and best-of-N selection.
    """

    def __init__(self, weights: Path, model_name: str = "ViT-L-14", device: str = "cpu", batch: int = 16) -> None:
        from mindhier_rt.train.clip_teacher import ClipTeacher, _open_clip

        cfg = _open_clip().get_model_config(model_name)
        layers = (cfg or {}).get("vision_cfg", {}).get("layers")
        if not isinstance(layers, int):
            raise InputError(f"expected an open_clip ViT model name such as ViT-L-14, found {model_name!r}")
        self.teacher = ClipTeacher((layers,), weights, model_name=model_name).to(device)
        self.device, self.batch = device, batch

    @torch.no_grad()
    def embedding(self, images_N3HW: Tensor) -> Tensor:
        t = self.teacher
        out = []
        for start in range(0, images_N3HW.shape[0], self.batch):
            x = resize(images_N3HW[start : start + self.batch].float(), t.image_size).to(self.device)
            out.append(t.model.encode_image((x - t.mean) / t.std).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def pooled(self, images_N3HW: Tensor) -> Tensor:
        out = []
        for start in range(0, images_N3HW.shape[0], self.batch):
            x = images_N3HW[start : start + self.batch].float().to(self.device)
            out.append(self.teacher.image_levels(x)[:, -1].mean(dim=1).float().cpu())
        return torch.cat(out)


DEFAULT_WEIGHTS_DIR = Path("~/.cache/mindhier-rt/weights")
# open_clip model name -> its OpenAI weights on the Hugging Face hub (where open_clip caches them)
HF_CLIP_REPOS = {"ViT-L-14": "timm/vit_large_patch14_clip_224.openai"}
HF_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()


def weight_search_path(weights_dir: PathLike | None = None, clip_model: str = "ViT-L-14") -> list[Path]:
    """Folders searched for weight files, in order: ``weights_dir``, ~/.cache/mindhier-rt/weights, torch.hub's
    checkpoints ($TORCH_HOME/hub/checkpoints: torchvision's and SwAV's downloads), OpenAI CLIP's download folder
    (~/.cache/clip: ViT-L-14.pt) and the Hugging Face hub snapshots of ``clip_model``'s weights ($HF_HUB_CACHE,
    $HUGGINGFACE_HUB_CACHE or $HF_HOME/hub)."""
    folders = [Path(weights_dir).expanduser()] if weights_dir else []
    folders.append(DEFAULT_WEIGHTS_DIR.expanduser())
    torch_home = Path(os.environ.get("TORCH_HOME") or _cache_home() / "torch").expanduser()
    folders += [torch_home / "hub" / "checkpoints", _cache_home() / "clip"]
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    hf_home = Path(os.environ.get("HF_HOME") or _cache_home() / "huggingface")
    hub_dir = Path(hub).expanduser() if hub else hf_home.expanduser() / "hub"
    repo = HF_CLIP_REPOS.get(clip_model)
    if repo is not None:
        snapshots = hub_dir.expanduser() / f"models--{repo.replace('/', '--')}" / "snapshots"
        folders += sorted(snapshots.glob("*")) if snapshots.is_dir() else [snapshots / "<revision>"]
    return folders
