"""Explicit key maps from public layouts to ours (source name -> our name, with the source shape where the two
differ) and strict loading through them."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mindhier_rt.checkpoint import MAX_LISTED_KEYS
from mindhier_rt.config import ModelConfig
from mindhier_rt.errors import CheckpointError
from mindhier_rt.importers.sources import SourceFile

log = logging.getLogger(__name__)


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
