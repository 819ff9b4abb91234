"""Model configs of public files, inferred from their tensors' shapes and checked against their config.json."""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import Tensor

from mindhier_rt.config import GeneratorConfig, ModelConfig, VQVAEConfig
from mindhier_rt.errors import CheckpointError, ConfigError
from mindhier_rt.importers.sources import SourceFile
from mindhier_rt.schedule import PATCH_NUMS_256, PATCH_NUMS_512

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
