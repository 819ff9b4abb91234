"""Importers for public checkpoints: VAR, Switti and MindHier files become mindhier-rt models, loaded strictly.

Layouts (REFERENCE §6), detected from the tensor names of the file:

========== ============================================================ ===========================================
layout     public files                                                 becomes
========== ============================================================ ===========================================
var        ``var_d{16,20,24,30}.pth`` (a ``torch.save`` state dict)     generator, ``block="var"``, class labels
switti     ``config.json`` + ``model.safetensors`` (``text_pooler.*``)  generator, Switti block, context width 2048
mindhier   ``config.json`` + ``model.safetensors`` (``fmri_pooler.*``)  generator, Switti block, context width 768
vqvae      ``vae_ch160v4096z32.pth``; the Switti VQ-VAE folder          VQ-VAE
========== ============================================================ ===========================================

A mindhier-rt checkpoint (``.safetensors`` with our metadata) is read by ``MindHier.load`` as before.

Strict loading. Every tensor of the file is either mapped to exactly one of ours by an explicit table
(``generator_key_map`` / ``vqvae_key_map``: source name -> our name, with the source shape where the two
differ), or is a buffer the reference stores and mindhier-rt derives from the schedule (level indices
``lvl_1L``, the training mask ``attn_bias_for_masking``, VAR's ``zero_k_bias``, the VQ-VAE's code-usage
statistics ``ema_vocab_hit_SV``): those are checked for consistency with the config and dropped. Anything
else, anything missing and every shape that does not fit are listed together in one ``CheckpointError``.

Sizes come from the tensors (depth, width, vocabulary, latent width, classes, context and pooled widths,
VQ-VAE channels) and from the schedule buffers (``lvl_1L`` gives patch_nums exactly); a ``config.json``
beside the weights is cross-checked, and keys of it that this module does not know are refused rather
than ignored. ``.pth`` files are read with ``torch.load(weights_only=True)``: no code in them runs.

Not importable: MindHier's reference fMRI encoder (``fMRI2CLIP``: post-norm ``nn.TransformerDecoder``
branches, an MLP without LayerNorms, unprojected levels) is a different architecture from mindhier-rt's
``HierarchicalEncoder``; such a file is refused with that explanation.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from mindhier_rt.checkpoint import FORMAT as OUR_FORMAT
from mindhier_rt.checkpoint import MAX_LISTED_KEYS
from mindhier_rt.config import GeneratorConfig, ModelConfig, VQVAEConfig
from mindhier_rt.errors import CheckpointError, ConfigError
from mindhier_rt.schedule import PATCH_NUMS_256, PATCH_NUMS_512

if TYPE_CHECKING:
    from mindhier_rt.models.mindhier import MindHier

log = logging.getLogger(__name__)

__all__ = [
    "LAYOUTS",
    "SourceFile",
    "detect_layout",
    "generator_config",
    "generator_key_map",
    "import_models",
    "load_models",
    "read_source",
    "vqvae_config",
    "vqvae_key_map",
]

LAYOUTS: tuple[str, ...] = ("var", "switti", "mindhier", "vqvae")
TENSOR_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth")
# patch_nums by image side, where a file says only its resolution (``reso`` of Switti's / MindHier's
# constructors, VQVAEHF's included; the token count L). 1024: Switti's high-resolution schedule.
PATCH_NUMS_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)
PATCH_NUMS_BY_RESO = {256: PATCH_NUMS_256, 512: PATCH_NUMS_512, 1024: PATCH_NUMS_1024}
PATCH_NUMS_BY_TOKENS = {sum(p * p for p in pn): pn for pn in PATCH_NUMS_BY_RESO.values()}
SWITTI_CROP_UNIT = 512.0  # Switti / MindHier embed the crop condition in pixels at base size 512
SWITTI_CONTEXT_TOKENS = 77  # CLIP text tokens: every scale of a Switti generator reads the whole prompt
MINDHIER_LEVELS, MINDHIER_TOKENS = 4, 257  # CLIP ViT-L/14 levels of the MindHier generator's context

# Keys of the constructor-kwargs config.json files (SwittiHF / HierarchyARHF / VQVAEHF and their base classes).
# VQ-VAE configs come in three shapes: none (VAR's ``vae_ch160v4096z32.pth``, built in code); VQVAEHF's
# ``save_pretrained`` in Switti's first release and in its current code, which MindHier's ``models/vqvae.py``
# shares: vocab_size, z_channels, ch, test_mode, share_quant_resi and then ``v_patch_nums`` (first release) or
# ``reso`` (current, default 1024: the schedule is looked up from the resolution).
_GENERATOR_CONFIG_KEYS = {
    "depth", "embed_dim", "num_heads", "rope", "rope_theta", "rope_size", "use_swiglu_ffn", "use_ar",
    "use_crop_cond", "patch_nums", "reso", "norm_eps", "attn_l2_norm", "Cvae", "V", "mlp_ratio", "drop_rate",
    "attn_drop_rate", "drop_path_rate", "fused_if_available",
}  # fmt: skip
_VQVAE_CONFIG_KEYS = {
    "vocab_size", "z_channels", "ch", "dropout", "beta", "using_znorm", "quant_conv_ks", "quant_resi",
    "share_quant_resi", "default_qresi_counts", "v_patch_nums", "test_mode", "reso",
}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# reading files


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


def _tensor_file(path: Path) -> Path:
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
    p = _tensor_file(Path(path))
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


# --------------------------------------------------------------------------------------------------
# configs from tensors


def _need(src: SourceFile, key: str, layout: str) -> Tensor:
    if key not in src.tensors:
        raise CheckpointError(f"{src.path}: {layout} layout: expected tensor {key!r} (it sizes the model), found none")
    return src.tensors[key]


def _block_count(src: SourceFile) -> int:
    idx = {int(m.group(1)) for k in src.tensors if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not idx:
        raise CheckpointError(f"{src.path}: expected transformer blocks (blocks.0.*), found none")
    return max(idx) + 1


def _check_config_keys(src: SourceFile, known: set[str]) -> dict[str, Any]:
    conf = dict(src.config or {})
    unknown = sorted(k for k in conf if k not in known and not k.startswith("_"))
    if unknown:
        raise CheckpointError(
            f"{src.path.parent / 'config.json'}: unknown constructor arguments {', '.join(unknown)}; they may change "
            "the architecture, so the file is refused rather than loaded with them ignored"
        )
    return conf


def _agree(src: SourceFile, what: str, from_config: Any, from_tensors: Any) -> None:
    if from_config is not None and from_config != from_tensors:
        raise CheckpointError(f"{src.path}: config.json says {what}={from_config!r}, the tensors say {from_tensors!r}")


def _patch_nums(src: SourceFile, conf: dict[str, Any], default: tuple[int, ...] | None) -> tuple[int, ...]:
    """patch_nums from the level-index buffer (exact), else config.json (patch_nums / reso), else ``default``."""
    from_conf = None
    if conf.get("patch_nums") is not None:
        from_conf = tuple(int(p) for p in conf["patch_nums"])
    elif conf.get("reso") is not None:
        reso = int(conf["reso"])
        if reso not in PATCH_NUMS_BY_RESO:
            raise CheckpointError(f"{src.path}: config.json reso={reso}; known: {sorted(PATCH_NUMS_BY_RESO)}")
        from_conf = PATCH_NUMS_BY_RESO[reso]
    lvl = src.tensors.get("lvl_1L")
    if lvl is None:
        pn = from_conf or default
        if pn is None:
            raise CheckpointError(f"{src.path}: cannot tell the scale schedule: no lvl_1L buffer, no patch_nums")
        return pn
    lvl_L = lvl.reshape(-1).to(torch.long)
    if len(lvl_L) == 0 or lvl_L[0] != 0 or bool((lvl_L.diff() < 0).any()) or bool((lvl_L.diff() > 1).any()):
        raise CheckpointError(f"{src.path}: lvl_1L must count scales 0, 0, 1, 1, 1, 1, ... in order")
    counts = torch.bincount(lvl_L).tolist()
    pn = tuple(math.isqrt(n) for n in counts)
    if any(p * p != n for p, n in zip(pn, counts, strict=True)):
        raise CheckpointError(f"{src.path}: lvl_1L has {counts} tokens per scale, not square grids")
    _agree(src, "patch_nums", from_conf, pn)
    return pn


def _attn_mode_of_mask(src: SourceFile, patch_nums: tuple[int, ...]) -> str | None:
    """Which attention mode the stored training mask is (None without one); the mask is dropped afterwards."""
    bias = src.tensors.get("attn_bias_for_masking")
    if bias is None:
        return None
    from mindhier_rt.schedule import Schedule

    sched = Schedule(patch_nums=patch_nums, n_levels=1, context_tokens=1)
    L = sched.total_tokens
    if tuple(bias.shape) != (1, 1, L, L):
        raise CheckpointError(
            f"{src.path}: attn_bias_for_masking: expected (1, 1, {L}, {L}), found {tuple(bias.shape)}"
        )
    allowed = bias.reshape(L, L) == 0
    if not bool(((bias.reshape(L, L) == 0) | (bias.reshape(L, L) == float("-inf"))).all()):
        raise CheckpointError(f"{src.path}: attn_bias_for_masking must hold only 0 and -inf")
    for mode in ("scale_local", "block_causal"):
        if torch.equal(allowed, sched.self_attn_mask(mode)):
            return mode
    raise CheckpointError(f"{src.path}: attn_bias_for_masking is neither the scale-local nor the block-causal mask")


def _ffn_ratio(width: int, hidden: int) -> float:
    """An mlp_ratio with int(width * ratio) == hidden, the published one where it fits."""
    for ratio in (8 / 3, 4.0):
        if int(width * ratio) == hidden:
            return ratio
    return (hidden + 0.5) / width


def vqvae_config(src: SourceFile) -> tuple[VQVAEConfig, int, int, tuple[int, ...] | None]:
    """(VQ-VAE config, vocabulary, latent width, the file's own patch_nums if its config.json says) of a VQ-VAE."""
    conf = _check_config_keys(src, _VQVAE_CONFIG_KEYS)
    t = src.tensors
    vocab, latent = _need(src, "quantize.embedding.weight", "vqvae").shape
    ch = _need(src, "encoder.conv_in.weight", "vqvae").shape[0]
    levels = sorted({int(m.group(1)) for k in t if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if levels != list(range(len(levels))) or not levels:
        raise CheckpointError(f"{src.path}: expected encoder.down.0..N levels, found {levels}")
    mult = []
    for i in levels:
        out_ch = _need(src, f"encoder.down.{i}.block.0.conv1.weight", "vqvae").shape[0]
        if out_ch % ch:
            raise CheckpointError(f"{src.path}: encoder level {i} has {out_ch} channels, not a multiple of {ch}")
        mult.append(out_ch // ch)
    res_blocks = len({int(m.group(1)) for k in t if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    phis = len({int(m.group(1)) for k in t if (m := re.match(r"quantize\.quant_resi\.qresi_ls\.(\d+)\.", k))})
    if phis != 4:
        raise CheckpointError(
            f"{src.path}: expected 4 shared Phi convs (quantize.quant_resi.qresi_ls.0..3), found {phis}"
        )
    _agree(src, "vocab_size", conf.get("vocab_size"), int(vocab))
    _agree(src, "z_channels", conf.get("z_channels"), int(latent))
    _agree(src, "ch", conf.get("ch"), int(ch))
    _agree(src, "share_quant_resi", conf.get("share_quant_resi"), phis)
    for key, supported in (
        ("using_znorm", False),
        ("quant_resi", 0.5),
        ("quant_conv_ks", 3),
        ("default_qresi_counts", 0),
    ):
        if key in conf and conf[key] != supported:
            raise CheckpointError(
                f"{src.path}: config.json {key}={conf[key]!r}; mindhier-rt's VQ-VAE has {supported!r}"
            )
    vq = VQVAEConfig(ch=int(ch), ch_mult=tuple(mult), num_res_blocks=res_blocks, norm_groups=32, phi_ratio=0.5)
    v_pn = _vqvae_patch_nums(src, conf)
    usage = t.get("quantize.ema_vocab_hit_SV")
    if v_pn is not None and usage is not None and usage.ndim == 2:
        _agree(src, "scales (code-usage statistics rows)", len(v_pn), int(usage.shape[0]))
    return vq, int(vocab), int(latent), v_pn


def _vqvae_patch_nums(src: SourceFile, conf: dict[str, Any]) -> tuple[int, ...] | None:
    """The VQ-VAE's own training schedule from its config.json: ``v_patch_nums``, or ``reso`` looked up."""
    v_pn = tuple(int(p) for p in conf["v_patch_nums"]) if conf.get("v_patch_nums") is not None else None
    if conf.get("reso") is not None:
        reso = int(conf["reso"])
        if reso not in PATCH_NUMS_BY_RESO:
            raise CheckpointError(f"{src.path}: config.json reso={reso}; known: {sorted(PATCH_NUMS_BY_RESO)}")
        _agree(src, "v_patch_nums", v_pn, PATCH_NUMS_BY_RESO[reso])
        v_pn = PATCH_NUMS_BY_RESO[reso]
    return v_pn


def generator_config(layout: str, src: SourceFile, vq: VQVAEConfig | None = None) -> ModelConfig:
    """The ModelConfig of a public generator (``layout`` from ``detect_layout``), with ``vq`` as its VQ-VAE.

    There is no encoder (``encoder=None``): VAR is class-conditional, and the Switti / MindHier generators
    arrive without one that mindhier-rt can load.
    """
    vq = vq or VQVAEConfig()
    conf = _check_config_keys(src, _GENERATOR_CONFIG_KEYS) if layout != "var" else {}
    depth = _block_count(src)
    width = int(_need(src, "pos_start", layout).shape[-1])
    vocab = int(_need(src, "head.weight", layout).shape[0])
    latent = int(_need(src, "word_embed.weight", layout).shape[1])
    _agree(src, "depth", conf.get("depth"), depth)
    _agree(src, "embed_dim", conf.get("embed_dim"), width)
    _agree(src, "V", conf.get("V"), vocab)
    _agree(src, "Cvae", conf.get("Cvae"), latent)
    if layout == "var":
        heads = int(_need(src, "blocks.0.attn.scale_mul_1H11", layout).shape[1])
        L = int(_need(src, "pos_1LC", layout).shape[1])
        patch_nums = _patch_nums(src, conf, PATCH_NUMS_BY_TOKENS.get(L))
        mode = _attn_mode_of_mask(src, patch_nums)
        if mode not in (None, "block_causal"):
            raise CheckpointError(f"{src.path}: a VAR model's stored mask must be block-causal, found {mode}")
        hidden = int(_need(src, "blocks.0.ffn.fc1.weight", layout).shape[0])
        gen = GeneratorConfig(
            depth=depth, width=width, heads=heads, attn_mode="block_causal", mlp_ratio=_ffn_ratio(width, hidden),
            block="var", condition="class", num_classes=int(_need(src, "class_emb.weight", layout).shape[0]) - 1,
        )  # fmt: skip
        n_levels, tokens, context_dim = 1, 1, width
    else:
        for key in ("rope", "use_swiglu_ffn", "attn_l2_norm"):
            if conf.get(key, True) is not True:
                raise CheckpointError(
                    f"{src.path}: config.json {key}={conf[key]!r}; mindhier-rt's Switti block has rope, a SwiGLU FFN "
                    "and qk normalisation"
                )
        pooler = "text_pooler" if layout == "switti" else "fmri_pooler"
        context_dim = int(_need(src, "blocks.0.cross_attn.to_kv.weight", layout).shape[1])
        pooled_dim = int(_need(src, f"{pooler}.weight", layout).shape[1])
        hidden = int(_need(src, "blocks.0.ffn.up_proj.weight", layout).shape[0])
        crop = "crop_embed.weight" in src.tensors
        _agree(src, "use_crop_cond", conf.get("use_crop_cond"), crop)
        patch_nums = _patch_nums(src, conf, PATCH_NUMS_512)  # SwittiHF / HierarchyARHF default: 512 px
        mode = _attn_mode_of_mask(src, patch_nums)
        conf_mode = None if conf.get("use_ar") is None else ("block_causal" if conf["use_ar"] else "scale_local")
        _agree(src, "use_ar (attention mode)", conf_mode, mode or conf_mode)
        heads = int(conf.get("num_heads") or width // 64)
        gen = GeneratorConfig(
            depth=depth, width=width, heads=heads, attn_mode=mode or conf_mode or "scale_local",
            mlp_ratio=_ffn_ratio(width, hidden), rope_theta=float(conf.get("rope_theta", 10000.0)),
            rope_grid=float(conf.get("rope_size", 128.0)), crop_cond=crop,
            crop_freqs=int(src.tensors["crop_embed.weight"].shape[0]) if crop else 64,
            norm_eps=float(conf.get("norm_eps", 1e-6)), block="switti", condition="fmri",
            pooled_dim=None if pooled_dim == context_dim else pooled_dim, rope_layout="switti",
            crop_unit=SWITTI_CROP_UNIT,
        )  # fmt: skip
        if layout == "switti":
            n_levels, tokens = 1, SWITTI_CONTEXT_TOKENS
        else:
            n_levels, tokens = MINDHIER_LEVELS, MINDHIER_TOKENS
    # MindHier's published images were made with its reference pipeline's per-token map (schedule.py)
    context_map = "reference-pipeline" if layout == "mindhier" else "training"
    try:
        return ModelConfig(
            name=f"{layout}-d{depth}",
            image_size=patch_nums[-1] * vq.downsample,
            patch_nums=patch_nums,
            encoder=None,
            generator=gen,
            vqvae=vq,
            n_levels=n_levels,
            context_tokens=tokens,
            context_dim=context_dim,
            vocab_size=vocab,
            latent_dim=latent,
            context_map=context_map,
        )
    except ConfigError as e:
        raise CheckpointError(f"{src.path}: the sizes in this {layout} file make no valid model: {e}") from None


# --------------------------------------------------------------------------------------------------
# key maps: source name -> (our name, source shape where it differs from ours)


@dataclass(frozen=True)
class Mapped:
    """Where one source tensor goes; ``source_shape`` is set where the reference stores it in another shape."""

    name: str
    source_shape: tuple[int, ...] | None = None


Check = Callable[[Tensor], str | None]  # returns what is inconsistent, or None


@dataclass
class KeyMap:
    tensors: dict[str, Mapped] = field(default_factory=dict)
    derived: dict[str, Check] = field(default_factory=dict)  # stored by the reference, derived by us: dropped

    def same(self, *names: str) -> None:
        for n in names:
            self.tensors[n] = Mapped(n)


_VAR_TOP = (
    "pos_start", "pos_1LC", "word_embed.weight", "word_embed.bias", "class_emb.weight", "lvl_embed.weight",
    "head_nm.ada_lin.1.weight", "head_nm.ada_lin.1.bias", "head.weight", "head.bias",
)  # fmt: skip
_VAR_BLOCK = (
    "attn.scale_mul_1H11", "attn.q_bias", "attn.v_bias", "attn.mat_qkv.weight", "attn.proj.weight",
    "attn.proj.bias", "ffn.fc1.weight", "ffn.fc1.bias", "ffn.fc2.weight", "ffn.fc2.bias", "ada_lin.1.weight",
    "ada_lin.1.bias",
)  # fmt: skip
_SWITTI_TOP = (
    "pos_start", "word_embed.weight", "word_embed.bias", "lvl_embed.weight", "head_nm.ada_lin.1.weight",
    "head_nm.ada_lin.1.bias", "head.weight", "head.bias",
)  # fmt: skip
_SWITTI_BLOCK = (
    "attn.to_qkv.weight", "attn.to_qkv.bias", "attn.proj.weight", "attn.proj.bias", "cross_attn.to_q.weight",
    "cross_attn.to_q.bias", "cross_attn.to_kv.weight", "cross_attn.to_kv.bias", "cross_attn.proj.weight",
    "cross_attn.proj.bias", "ffn.up_proj.weight", "ffn.gate_proj.weight", "ffn.down_proj.weight",
    "self_attention_norm1.weight", "self_attention_norm2.weight", "cross_attention_norm1.weight",
    "cross_attention_norm2.weight", "ffn_norm1.weight", "ffn_norm2.weight", "attention_y_norm.weight",
    "ada_lin.1.weight", "ada_lin.1.bias",
)  # fmt: skip
_VQVAE_PREFIXES = (  # the VQ-VAE's module names are VAR's: every tensor under these maps to the same name
    ("encoder.", "encoder."), ("decoder.", "decoder."), ("quant_conv.", "quant_conv."),
    ("post_quant_conv.", "post_quant_conv."), ("quantize.embedding.", "quantize.embedding."),
    ("quantize.quant_resi.qresi_ls.", "quantize.quant_resi.qresi_ls."),
)  # fmt: skip


def _check_levels(cfg: ModelConfig) -> Check:
    want = torch.tensor(cfg.schedule.scale_of_token)

    def check(t: Tensor) -> str | None:
        if t.numel() != len(want) or not torch.equal(t.reshape(-1).to(torch.long), want):
            return f"expected the scale index of each of the {len(want)} tokens of patch_nums {cfg.patch_nums}"
        return None

    return check


def _check_mask(cfg: ModelConfig) -> Check:
    mode = cfg.generator.attn_mode
    want = cfg.schedule.self_attn_mask(mode)

    def check(t: Tensor) -> str | None:
        L = len(want)
        if tuple(t.shape) != (1, 1, L, L) or not torch.equal(t.reshape(L, L) == 0, want):
            return f"expected the {mode} mask of {L} tokens (0 where allowed, -inf elsewhere)"
        return None

    return check


def _check_zeros(width: int) -> Check:
    def check(t: Tensor) -> str | None:
        if tuple(t.shape) != (width,) or bool(t.any()):
            return f"expected zeros of shape ({width},)"
        return None

    return check


def generator_key_map(layout: str, cfg: ModelConfig) -> KeyMap:
    """Source tensor names of a ``layout`` generator -> ours, plus the derived buffers it stores."""
    g, m = cfg.generator, KeyMap()
    m.derived["lvl_1L"] = _check_levels(cfg)
    m.derived["attn_bias_for_masking"] = _check_mask(cfg)
    if layout == "var":
        m.same(*_VAR_TOP)
        for i in range(g.depth):
            m.same(*(f"blocks.{i}.{k}" for k in _VAR_BLOCK))
            m.derived[f"blocks.{i}.attn.zero_k_bias"] = _check_zeros(g.width)
        return m
    if layout not in ("switti", "mindhier"):
        raise ValueError(f"not a generator layout: {layout!r}")
    m.same(*_SWITTI_TOP)
    pooler = "text_pooler" if layout == "switti" else "fmri_pooler"
    m.tensors[f"{pooler}.weight"] = Mapped("fmri_pooler.weight")  # our projection of the pooled condition
    m.tensors[f"{pooler}.bias"] = Mapped("fmri_pooler.bias")
    if g.crop_cond:
        m.same("crop_embed.weight", "crop_proj.weight", "crop_proj.bias")
    for i in range(g.depth):
        m.same(*(f"blocks.{i}.{k}" for k in _SWITTI_BLOCK))
        if g.crop_cond:  # the reference keeps it as [1, C]
            m.tensors[f"blocks.{i}.crop_cond_scales"] = Mapped(f"blocks.{i}.crop_cond_scales", (1, g.width))
    return m


def vqvae_key_map(vqvae: nn.Module, vocab: int) -> KeyMap:
    """Source tensor names of a VAR-style VQ-VAE -> ours (same names under fixed prefixes), plus its statistics."""
    m = KeyMap()
    for ours in vqvae.state_dict():
        for theirs_prefix, our_prefix in _VQVAE_PREFIXES:
            if ours.startswith(our_prefix):
                m.tensors[theirs_prefix + ours[len(our_prefix) :]] = Mapped(ours)
                break

    def usage(t: Tensor) -> str | None:  # codebook-usage EMA of training, one row per training scale
        if t.ndim != 2 or t.shape[1] != vocab:
            return f"expected [scales, {vocab}] code-usage statistics"
        return None

    m.derived["quantize.ema_vocab_hit_SV"] = usage
    return m


# --------------------------------------------------------------------------------------------------
# strict loading


def _listing(label: str, items: list[str], sep: str = ", ") -> str:
    shown = sep.join(items[:MAX_LISTED_KEYS])
    more = f"{sep}... and {len(items) - MAX_LISTED_KEYS} more" if len(items) > MAX_LISTED_KEYS else ""
    return f"{label} ({len(items)}): {shown}{more}"


def load_strict(module: nn.Module, src: SourceFile, key_map: KeyMap, what: str) -> nn.Module:
    """Load ``src`` into ``module`` through ``key_map``: every tensor used, every shape checked, derived
    buffers checked and dropped; one CheckpointError lists everything that does not fit."""
    target = module.state_dict()
    mapped_to = {mp.name for mp in key_map.tensors.values()}
    assert mapped_to == set(target), f"key map of {what} does not cover the module: {set(target) ^ mapped_to}"
    unexpected = [k for k in src.tensors if k not in key_map.tensors and k not in key_map.derived]
    missing = [k for k in key_map.tensors if k not in src.tensors]
    misshaped, inconsistent, state = [], [], {}
    for key, mp in key_map.tensors.items():
        if key not in src.tensors:
            continue
        t, want = src.tensors[key], tuple(target[mp.name].shape)
        expected = mp.source_shape or want
        if tuple(t.shape) != expected:
            misshaped.append(f"{key}: expected {expected}, found {tuple(t.shape)}")
            continue
        if target[mp.name].is_floating_point() and not t.is_floating_point():
            misshaped.append(f"{key}: expected a floating-point tensor, found {t.dtype}")
            continue
        state[mp.name] = t.reshape(want).to(target[mp.name].dtype)
    for key, check in key_map.derived.items():
        if key in src.tensors and (msg := check(src.tensors[key])) is not None:
            inconsistent.append(f"{key}: {msg}")
    problems = [
        _listing(label, items, sep)
        for label, items, sep in (
            ("missing tensors", missing, ", "),
            ("unexpected tensors", unexpected, ", "),
            ("mis-shaped tensors", misshaped, "; "),
            ("inconsistent buffers", inconsistent, "; "),
        )
        if items
    ]
    if problems:
        raise CheckpointError(f"{src.path}: {what} does not fit the model: " + " | ".join(problems))
    module.load_state_dict(state, strict=True)
    dropped = [k for k in key_map.derived if k in src.tensors]
    log.info("%s: loaded %d tensors into the %s; checked and dropped %d derived buffers", src.path, len(state), what,
             len(dropped))  # fmt: skip
    return module


# --------------------------------------------------------------------------------------------------
# entry points


@dataclass
class Imported:
    """What ``import_models`` read: the models and, per part, the file and layout it came from."""

    models: MindHier
    sources: dict[str, tuple[str, str]]  # part -> (path, layout)


def import_models(
    ckpt: str | Path,
    vae: str | Path | None = None,
    device: torch.device | str = "cpu",
    context_map: str | None = None,
) -> Imported:
    """Models from a public generator file (+ its VQ-VAE) or a mindhier-rt checkpoint (+ optionally a VQ-VAE).

    ``ckpt``: ``var_d16.pth``, a Switti / MindHier folder (``config.json`` + ``model.safetensors``), or a
    mindhier-rt ``.safetensors`` checkpoint. ``vae``: ``vae_ch160v4096z32.pth`` or the Switti VQ-VAE folder;
    required with a public generator (it holds no VQ-VAE), optional with our checkpoints (it replaces the
    checkpoint's VQ-VAE weights and must have the same shapes).
    ``context_map`` overrides the context map (``schedule.py``): by default MindHier generators get
    ``reference-pipeline`` (the map their published images were made with), every other file its config's
    (``training`` for VAR, Switti and, unless they say otherwise, mindhier-rt checkpoints).
    """
    from mindhier_rt.models.mindhier import MindHier
    from mindhier_rt.schedule import CONTEXT_MAPS

    if context_map is not None and context_map not in CONTEXT_MAPS:
        raise ConfigError(f"context map must be one of {', '.join(CONTEXT_MAPS)}, got {context_map!r}")

    ckpt = Path(ckpt)
    vae_src = vq_info = None
    if vae is not None:
        vae_src = read_source(vae)
        if (vae_layout := detect_layout(vae_src)) != "vqvae":
            raise CheckpointError(f"{vae_src.path}: --vae expects a VQ-VAE, found a {vae_layout} generator")
        vq_info = vqvae_config(vae_src)
    if is_mindhier_rt_checkpoint(_tensor_file(ckpt)):
        models = MindHier.load(_tensor_file(ckpt), device=device)
        sources = {part: (str(ckpt), "mindhier-rt") for part in models.modules()}
    else:
        src = read_source(ckpt)
        layout = detect_layout(src)
        if layout == "vqvae":
            raise CheckpointError(f"{src.path}: this is a VQ-VAE; pass the generator as --ckpt and this as --vae")
        if vae_src is None:
            raise CheckpointError(
                f"{src.path}: a {layout} file holds only the generator; pass its VQ-VAE too "
                "(--vae vae_ch160v4096z32.pth for VAR, the Switti VQ-VAE folder for Switti / MindHier)"
            )
        cfg = generator_config(layout, src, vq_info[0])
        models = MindHier.from_config(cfg, device=device)
        load_strict(models.generator, src, generator_key_map(layout, cfg), f"{layout} generator")
        sources = {"generator": (str(src.path), layout)}
    if vae_src is not None:
        vq, vocab, latent, v_pn = vq_info
        cfg = models.cfg
        if (vocab, latent) != (cfg.vocab_size, cfg.latent_dim):
            raise CheckpointError(
                f"{vae_src.path}: the VQ-VAE has {vocab} codes of width {latent}; the generator expects "
                f"{cfg.vocab_size} codes of width {cfg.latent_dim}"
            )
        if vq != cfg.vqvae:
            raise CheckpointError(f"{vae_src.path}: the VQ-VAE is {vq}; the checkpoint's config has {cfg.vqvae}")
        if v_pn is not None and v_pn != cfg.patch_nums:
            # VQVAEHF's schedule only sizes its training statistics (ema_vocab_hit_SV): decoding quantises and
            # accumulates on the generator's schedule, as the reference pipelines do (Switti's VQ-VAE folder
            # says reso=1024 by default and serves the 512 px generators too)
            log.info(
                "%s: the VQ-VAE was trained on scales %s; it decodes on the generator's %s",
                vae_src.path, v_pn, cfg.patch_nums,
            )  # fmt: skip
        load_strict(models.vqvae, vae_src, vqvae_key_map(models.vqvae, vocab), "VQ-VAE")
        sources["vqvae"] = (str(vae_src.path), "vqvae")
    if context_map is not None:
        models = models.with_context_map(context_map)
    return Imported(models.eval(), sources)


def load_models(
    ckpt: str | Path, vae: str | Path | None = None, device: torch.device | str = "cpu", context_map: str | None = None
) -> MindHier:
    """``import_models(...).models``: what the CLI's ``--ckpt`` (and ``--vae``, ``--context-map``) load."""
    return import_models(ckpt, vae, device, context_map).models
