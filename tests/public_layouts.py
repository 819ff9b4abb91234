"""Random-weight state dicts in the public checkpoints' own tensor naming, written from the facts of REFERENCE §6.

Names and shapes only (no code of the public projects): VAR generator, Switti / MindHier generator and the
VAR-style VQ-VAE, including the buffers those files store (level indices, training mask, zero k bias,
code-usage statistics). Used by tests/test_importers.py and benchmarks/var_d16_export.py.

AdaLN gates: the reference projects initialise the gate rows of every block's ``ada_lin`` (gamma1, gamma2: the
first 2C outputs) scaled by 1e-5, so at initialisation a block's residual branches barely reach the logits and a
parity test against such weights passes with a wrong block. ``gates="open"`` (default) sets those rows to gains
of about 1 (bias 1 + noise, noisy weights) so that every projection of every block matters; ``gates="reference"``
keeps the reference's scaling, for showing the difference; ``gates="drawn"`` leaves them as drawn with the other
AdaLN rows (what these files held before; benchmarks/var_d16_export.py's recorded run).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from torch import Tensor

Gates = Literal["open", "reference", "drawn"]


def _rand(g: torch.Generator, *shape: int, std: float = 0.02) -> Tensor:
    return torch.randn(*shape, generator=g) * std


def _gate_rows(g: torch.Generator, weight: Tensor, bias: Tensor, width: int, gates: Gates) -> None:
    """Set the gate rows (first 2C outputs) of an AdaLN projection in place (module docstring)."""
    if gates == "reference":
        weight[: 2 * width] *= 1e-5
        bias[: 2 * width] *= 1e-5
    elif gates == "drawn":
        return
    elif gates == "open":
        weight[: 2 * width] = _rand(g, 2 * width, width, std=0.05)
        bias[: 2 * width] = 1 + _rand(g, 2 * width, std=0.2)
    else:
        raise ValueError(f"gates must be 'open', 'reference' or 'drawn', got {gates!r}")


def level_index(patch_nums: tuple[int, ...]) -> Tensor:
    """lvl_1L [1, L]: the scale index of every token of the pyramid."""
    return torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(patch_nums)]).view(1, -1)


def training_mask(patch_nums: tuple[int, ...], block_causal: bool) -> Tensor:
    """attn_bias_for_masking [1, 1, L, L]: 0 where a token may attend, -inf elsewhere."""
    lvl = level_index(patch_nums)[0]
    allowed = lvl[:, None] >= lvl[None, :] if block_causal else lvl[:, None] == lvl[None, :]
    return torch.where(allowed, 0.0, -torch.inf).view(1, 1, len(lvl), len(lvl))


def var_state_dict(
    depth: int,
    width: int,
    heads: int,
    patch_nums: tuple[int, ...],
    vocab: int,
    latent: int,
    classes: int,
    hidden: int | None = None,
    seed: int = 0,
    std: float = 0.02,
    gates: Gates = "open",
) -> dict[str, Tensor]:
    """A VAR generator (``var_d{depth}.pth``): class embedding, absolute positions, VAR blocks."""
    g = torch.Generator().manual_seed(seed)
    C, L, K, hidden = width, sum(p * p for p in patch_nums), len(patch_nums), hidden or 4 * width
    sd: dict[str, Tensor] = {
        "pos_start": _rand(g, 1, 1, C, std=std),
        "pos_1LC": _rand(g, 1, L, C, std=std),
        "lvl_1L": level_index(patch_nums),
        "attn_bias_for_masking": training_mask(patch_nums, block_causal=True),
        "word_embed.weight": _rand(g, C, latent, std=std),
        "word_embed.bias": _rand(g, C, std=std),
        "class_emb.weight": _rand(g, classes + 1, C, std=std),
        "lvl_embed.weight": _rand(g, K, C, std=std),
        "head_nm.ada_lin.1.weight": _rand(g, 2 * C, C, std=std),
        "head_nm.ada_lin.1.bias": _rand(g, 2 * C, std=std),
        "head.weight": _rand(g, vocab, C, std=std),
        "head.bias": _rand(g, vocab, std=std),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        sd |= {
            b + "attn.scale_mul_1H11": math.log(4.0) + _rand(g, 1, heads, 1, 1, std=0.3),
            b + "attn.q_bias": _rand(g, C, std=std),
            b + "attn.v_bias": _rand(g, C, std=std),
            b + "attn.zero_k_bias": torch.zeros(C),
            b + "attn.mat_qkv.weight": _rand(g, 3 * C, C, std=std),
            b + "attn.proj.weight": _rand(g, C, C, std=std),
            b + "attn.proj.bias": _rand(g, C, std=std),
            b + "ffn.fc1.weight": _rand(g, hidden, C, std=std),
            b + "ffn.fc1.bias": _rand(g, hidden, std=std),
            b + "ffn.fc2.weight": _rand(g, C, hidden, std=std),
            b + "ffn.fc2.bias": _rand(g, C, std=std),
            b + "ada_lin.1.weight": _rand(g, 6 * C, C, std=std),
            b + "ada_lin.1.bias": _rand(g, 6 * C, std=0.5),
        }
        _gate_rows(g, sd[b + "ada_lin.1.weight"], sd[b + "ada_lin.1.bias"], C, gates)
    return sd


def switti_state_dict(
    pooler: str,
    depth: int,
    width: int,
    patch_nums: tuple[int, ...],
    vocab: int,
    latent: int,
    context_dim: int,
    pooled_dim: int,
    use_ar: bool = False,
    crop: bool = True,
    seed: int = 0,
    gates: Gates = "open",
) -> dict[str, Tensor]:
    """A Switti (``pooler="text_pooler"``) or MindHier (``"fmri_pooler"``) generator's ``model.safetensors``."""
    g = torch.Generator().manual_seed(seed)
    C, K, hidden = width, len(patch_nums), int(width * 8 / 3)
    sd: dict[str, Tensor] = {
        "pos_start": _rand(g, 1, 1, C),
        "lvl_1L": level_index(patch_nums),
        "attn_bias_for_masking": training_mask(patch_nums, block_causal=use_ar),
        "word_embed.weight": _rand(g, C, latent),
        "word_embed.bias": _rand(g, C),
        "lvl_embed.weight": _rand(g, K, C),
        f"{pooler}.weight": _rand(g, C, pooled_dim),
        f"{pooler}.bias": _rand(g, C),
        "head_nm.ada_lin.1.weight": _rand(g, 2 * C, C),
        "head_nm.ada_lin.1.bias": _rand(g, 2 * C),
        "head.weight": _rand(g, vocab, C),
        "head.bias": _rand(g, vocab),
    }
    if crop:  # 4 crop scalars, C / 8 Gaussian frequencies each, sin and cos -> C features
        sd |= {"crop_embed.weight": torch.randn(C // 8, generator=g), "crop_proj.weight": _rand(g, C, C)}
        sd["crop_proj.bias"] = _rand(g, C)
    for i in range(depth):
        b = f"blocks.{i}."
        sd |= {
            b + "attn.to_qkv.weight": _rand(g, 3 * C, C),
            b + "attn.to_qkv.bias": _rand(g, 3 * C),
            b + "attn.proj.weight": _rand(g, C, C),
            b + "attn.proj.bias": _rand(g, C),
            b + "cross_attn.to_q.weight": _rand(g, C, C),
            b + "cross_attn.to_q.bias": _rand(g, C),
            b + "cross_attn.to_kv.weight": _rand(g, 2 * C, context_dim),
            b + "cross_attn.to_kv.bias": _rand(g, 2 * C),
            b + "cross_attn.proj.weight": _rand(g, C, C),
            b + "cross_attn.proj.bias": _rand(g, C),
            b + "ffn.up_proj.weight": _rand(g, hidden, C),
            b + "ffn.gate_proj.weight": _rand(g, hidden, C),
            b + "ffn.down_proj.weight": _rand(g, C, hidden),
            b + "attention_y_norm.weight": 1 + _rand(g, context_dim, std=0.1),
            b + "ada_lin.1.weight": _rand(g, 6 * C, C),
            b + "ada_lin.1.bias": _rand(g, 6 * C, std=0.5),
        }
        _gate_rows(g, sd[b + "ada_lin.1.weight"], sd[b + "ada_lin.1.bias"], C, gates)
        for norm in ("self_attention", "cross_attention", "ffn"):
            for j in (1, 2):
                sd[b + f"{norm}_norm{j}.weight"] = 1 + _rand(g, C, std=0.1)
        if crop:
            sd[b + "crop_cond_scales"] = _rand(g, 1, C, std=0.1)
    return sd


def vqvae_state_dict(
    ch: int,
    ch_mult: tuple[int, ...],
    num_res_blocks: int,
    latent: int,
    vocab: int,
    scales: int,
    phis: int = 4,
    seed: int = 0,
) -> dict[str, Tensor]:
    """A VAR-style multi-scale VQ-VAE (``vae_ch160v4096z32.pth`` at ch=160, (1,1,2,2,4), 2 blocks, z=32, 4096)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, Tensor] = {}

    def conv(name: str, cout: int, cin: int, k: int) -> None:
        sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) / math.sqrt(cin * k * k)
        sd[f"{name}.bias"] = _rand(g, cout)

    def norm(name: str, c: int) -> None:
        sd[f"{name}.weight"] = 1 + _rand(g, c, std=0.1)
        sd[f"{name}.bias"] = _rand(g, c)

    def resnet(name: str, cin: int, cout: int) -> None:
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cout, cin, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cout, cin, 1)

    def attn(name: str, c: int) -> None:
        norm(f"{name}.norm", c)
        conv(f"{name}.qkv", 3 * c, c, 1)
        conv(f"{name}.proj_out", c, c, 1)

    def mid(name: str, c: int) -> None:
        resnet(f"{name}.block_1", c, c)
        attn(f"{name}.attn_1", c)
        resnet(f"{name}.block_2", c, c)

    last = len(ch_mult) - 1
    conv("encoder.conv_in", ch, 3, 3)
    block_in = ch
    for i, m in enumerate(ch_mult):
        for j in range(num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", block_in, ch * m)
            block_in = ch * m
            if i == last:
                attn(f"encoder.down.{i}.attn.{j}", block_in)
        if i != last:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
    mid("encoder.mid", block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", latent, block_in, 3)

    block_in = ch * ch_mult[-1]
    conv("decoder.conv_in", block_in, latent, 3)
    mid("decoder.mid", block_in)
    for i in reversed(range(len(ch_mult))):
        for j in range(num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", block_in, ch * ch_mult[i])
            block_in = ch * ch_mult[i]
            if i == last:
                attn(f"decoder.up.{i}.attn.{j}", block_in)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", 3, block_in, 3)

    conv("quant_conv", latent, latent, 3)
    conv("post_quant_conv", latent, latent, 3)
    sd["quantize.embedding.weight"] = torch.randn(vocab, latent, generator=g)
    for j in range(phis):
        conv(f"quantize.quant_resi.qresi_ls.{j}", latent, latent, 3)
    sd["quantize.ema_vocab_hit_SV"] = torch.rand(scales, vocab, generator=g)
    return sd


def save_hf_folder(folder: Path, tensors: dict[str, Tensor], config: dict) -> Path:
    """The Hugging Face mixin layout: ``config.json`` (constructor kwargs) + ``model.safetensors``."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    return folder
