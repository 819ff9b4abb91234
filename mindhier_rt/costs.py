"""Analytic cost model of decoding: the one place that counts FLOPs and bytes moved.

Every phase of ``pipeline.reconstruct`` gets a :class:`Cost` for one call with a given number of rows:

* ``encoder_cost``   the fMRI encoder (voxel MLP, image branch, text branch) for one subject
* ``context_cost``   the context step, once per scan: pooler, crop embedding, AdaLN linears of every block
                     and of the head, cross-attention K/V projections over all M*T context tokens
* ``step_cost``      one generator step at scale i: per block qkv, self-attention, self proj, cross q,
                     cross-attention over the T tokens of one segment, cross proj, SwiGLU; then the head
* ``update_cost``    the VQ update of scale i: codebook lookup, bicubic upsample (separable matrices),
                     Phi 3x3 conv, area downsample of f_hat to the next scale's grid, and the word embedding
                     of the next scale's tokens
* ``decoder_cost``   post_quant_conv + the VQ-VAE decoder, counted by walking its ``nn.Conv2d`` and
                     ``AttnBlock`` modules with forward hooks on a meta-device model (no memory, no time)

``decode_costs`` adds them up the way ``reconstruct`` calls them (guidance doubles the generator rows).

Conventions and simplifications:

* FLOPs: a multiply-add is 2 FLOPs. A linear layer on ``t`` tokens costs ``2 t d_in d_out``; attention of
  ``q`` queries over ``k`` keys costs ``4 q k C`` per row (scores ``2 q k C`` plus values ``2 q k C``,
  summed over heads). Elementwise work (norms, activations, RoPE, residual adds, softmax, the AdaLN
  modulation, biases) is not counted: it is O(tokens * width), small next to the matmuls.
* Bytes: weights are read once per call (every parameter the call touches, ``dtype`` bytes each,
  4 for float32); caches are read once per call (the segment's cross-attention K/V; in block-causal mode
  the self-attention K/V of all earlier scales); activations are counted once, when written: the output
  of every linear layer, attention, convolution and resample matmul, plus each call's outputs. Reads of
  activations by their consumers, attention score matrices (fused attention) and the outputs of
  elementwise ops are not counted, so ``bytes`` is a lower bound on memory traffic and ``intensity``
  (FLOPs / byte) an upper bound.
* The word embedding of scale i + 1's input tokens is counted in update i, where every backend computes it
  (``runtime.base``: ``update`` returns the embedded tokens). The encoder
  counts the text branch, which the torch reference computes and an exported graph may prune.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from mindhier_rt.config import ModelConfig
from mindhier_rt.errors import ConfigError
from mindhier_rt.sampling import SamplingConfig, guidance_active

__all__ = [
    "DTYPE_BYTES",
    "Cost",
    "DecodeCosts",
    "attention_flops",
    "context_cost",
    "decode_costs",
    "decoder_cost",
    "dtype_bytes",
    "encoder_cost",
    "guided_scales",
    "linear_flops",
    "step_cost",
    "update_cost",
]

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
CROP_FIELDS = 4  # generator crop condition: (orig_h, orig_w, crop_top, crop_left)


def dtype_bytes(dtype: str | int) -> int:
    """Bytes per element of ``dtype`` (a name such as ``"float32"`` or a byte count)."""
    if isinstance(dtype, int):
        if dtype < 1:
            raise ConfigError(f"bytes per element must be >= 1, got {dtype}")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ConfigError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    """FLOPs of a linear layer applied to ``tokens`` vectors (all rows times tokens): ``2 tokens d_in d_out``."""
    return 2 * tokens * d_in * d_out


def attention_flops(rows: int, q_len: int, kv_len: int, width: int) -> int:
    """FLOPs of attention (scores and values, all heads of total ``width``): ``4 rows q_len kv_len width``."""
    return 4 * rows * q_len * kv_len * width


@dataclass
class Cost:
    """FLOPs and bytes moved by one call of one phase (see the module docstring for what is counted)."""

    name: str
    rows: int
    flops: int = 0
    weight_bytes: int = 0
    cache_bytes: int = 0
    activation_bytes: int = 0
    flops_by_part: dict[str, int] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        """Total bytes moved: weights + caches + activations."""
        return self.weight_bytes + self.cache_bytes + self.activation_bytes

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOPs per byte moved (0 when nothing moves)."""
        return self.flops / self.bytes if self.bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rows": self.rows,
            "flops": self.flops,
            "bytes": self.bytes,
            "weight_bytes": self.weight_bytes,
            "cache_bytes": self.cache_bytes,
            "activation_bytes": self.activation_bytes,
            "intensity": self.intensity,
            "flops_by_part": dict(self.flops_by_part),
        }

    @classmethod
    def total(cls, name: str, costs: list[Cost]) -> Cost:
        """The sum of several calls (rows: the largest of them)."""
        out = cls(name, rows=max((c.rows for c in costs), default=0))
        for c in costs:
            out.flops += c.flops
            out.weight_bytes += c.weight_bytes
            out.cache_bytes += c.cache_bytes
            out.activation_bytes += c.activation_bytes
            for part, f in c.flops_by_part.items():
                out.flops_by_part[part] = out.flops_by_part.get(part, 0) + f
        return out

    # ---- builders used by the phase functions below ------------------------------------------
    def _part(self, part: str, flops: int) -> None:
        self.flops += flops
        self.flops_by_part[part] = self.flops_by_part.get(part, 0) + flops

    def linear(self, part: str, tokens: int, d_in: int, d_out: int, eb: int, bias: bool = True) -> None:
        """A linear layer on ``tokens`` vectors: weights read once, output written once."""
        self._part(part, linear_flops(tokens, d_in, d_out))
        self.weight_bytes += (d_in * d_out + (d_out if bias else 0)) * eb
        self.activation_bytes += tokens * d_out * eb

    def attention(self, part: str, rows: int, q_len: int, kv_len: int, width: int, eb: int) -> None:
        """Attention of ``q_len`` queries over ``kv_len`` keys per row; the output is written once."""
        self._part(part, attention_flops(rows, q_len, kv_len, width))
        self.activation_bytes += rows * q_len * width * eb


# ---- encoder -----------------------------------------------------------------------------------
def _decoder_layer(cost: Cost, part: str, rows: int, q: int, n_vox: int, dim: int, ffn: int, eb: int) -> None:
    """One pre-norm transformer-decoder layer of the encoder (q queries, n_vox voxel tokens)."""
    for name in ("q", "k", "v", "out"):
        cost.linear(f"{part}.self_{name}", rows * q, dim, dim, eb)
    cost.attention(f"{part}.self_attn", rows, q, q, dim, eb)
    cost.linear(f"{part}.cross_q", rows * q, dim, dim, eb)
    cost.linear(f"{part}.cross_k", rows * n_vox, dim, dim, eb)
    cost.linear(f"{part}.cross_v", rows * n_vox, dim, dim, eb)
    cost.attention(f"{part}.cross_attn", rows, q, n_vox, dim, eb)
    cost.linear(f"{part}.cross_out", rows * q, dim, dim, eb)
    cost.linear(f"{part}.ffn_in", rows * q, dim, ffn, eb)
    cost.linear(f"{part}.ffn_out", rows * q, ffn, dim, eb)
    cost.weight_bytes += 3 * 2 * dim * eb  # three LayerNorms (gain and bias)


def encoder_cost(cfg: ModelConfig, rows: int, subject: str | None = None, dtype: str | int = "float32") -> Cost:
    """One encoder call on ``rows`` scans of ``subject`` (default: the config's first subject)."""
    eb = dtype_bytes(dtype)
    enc, D, M, T = cfg.encoder, cfg.context_dim, cfg.n_levels, cfg.context_tokens
    subject = subject or enc.subjects[0][0]
    cost = Cost("encode", rows)
    cost.linear("subject_in", rows, enc.voxel_count(subject), enc.mlp_dims[0], eb)
    cost.weight_bytes += 2 * enc.mlp_dims[0] * eb  # in_norm
    for d_in, d_out in itertools.pairwise(enc.mlp_dims):
        cost.linear("mlp", rows, d_in, d_out, eb)
        cost.weight_bytes += 2 * d_out * eb
    cost.linear("to_tokens", rows, enc.mlp_dims[-1], enc.voxel_tokens * D, eb)
    cost.weight_bytes += (enc.voxel_tokens + T + enc.text_tokens) * D * eb  # positions and queries
    for _ in range(M):
        _decoder_layer(cost, "image", rows, T, enc.voxel_tokens, D, enc.ffn_dim, eb)
        cost.linear("image_proj", rows * T, D, D, eb)
    cost.weight_bytes -= (M - 1) * (D * D + D) * eb  # image_proj is shared by the levels: read once
    for _ in range(M):
        _decoder_layer(cost, "text", rows, enc.text_tokens, enc.voxel_tokens, D, enc.ffn_dim, eb)
    cost.linear("text_proj", rows * enc.text_tokens, D, D, eb)
    cost.weight_bytes += 2 * 2 * D * eb  # image_norm, text_norm
    cost.activation_bytes += rows * (D + M * T * D) * eb  # outputs: pooled, context
    return cost


# ---- generator ---------------------------------------------------------------------------------
def context_cost(cfg: ModelConfig, rows: int, dtype: str | int = "float32") -> Cost:
    """The context step on ``rows`` generator rows: everything computed once per scan."""
    eb = dtype_bytes(dtype)
    g, C, D = cfg.generator, cfg.generator.width, cfg.context_dim
    S = cfg.schedule.context_length
    cost = Cost("context", rows)
    cost.linear("pooler", rows, D, C, eb)
    cost.weight_bytes += C * eb  # pos_start
    if g.crop_cond:
        cost.linear("crop_proj", rows, CROP_FIELDS * 2 * g.crop_freqs, C, eb)
        cost.weight_bytes += (g.crop_freqs + g.depth * C) * eb  # Fourier frequencies, per-block crop gains
    for _ in range(g.depth):
        cost.linear("ada_lin", rows, C, 6 * C, eb)
        cost.linear("cross_kv", rows * S, D, 2 * C, eb)
        cost.weight_bytes += D * eb  # attention_y_norm
    cost.linear("ada_head", rows, C, 2 * C, eb)
    return cost


def step_cost(cfg: ModelConfig, rows: int, i: int, dtype: str | int = "float32") -> Cost:
    """Generator step of scale ``i`` on ``rows`` rows (conditional and unconditional rows together)."""
    eb = dtype_bytes(dtype)
    sched, g = cfg.schedule, cfg.generator
    if not 0 <= i < sched.n_scales:
        raise ConfigError(f"scale index must be in 0..{sched.n_scales - 1}, got {i}")
    C, F, T, depth = g.width, g.ffn_dim, sched.context_tokens, g.depth
    l = sched.token_counts[i]
    past = sched.cached_lengths[i] if g.attn_mode == "block_causal" else 0
    t = rows * l
    cost = Cost(f"step {i}", rows)
    if i == 0:
        cost.weight_bytes += C * eb  # lvl_embed row of the start token
    for _ in range(depth):
        cost.linear("qkv", t, C, 3 * C, eb)
        cost.attention("self_attn", rows, l, past + l, C, eb)
        cost.linear("proj", t, C, C, eb)
        cost.linear("cross_q", t, C, C, eb)
        cost.attention("cross_attn", rows, l, T, C, eb)
        cost.linear("cross_proj", t, C, C, eb)
        cost.linear("ffn_gate", t, C, F, eb, bias=False)
        cost.linear("ffn_up", t, C, F, eb, bias=False)
        cost.linear("ffn_down", t, F, C, eb, bias=False)
        cost.weight_bytes += 6 * C * eb  # RMSNorm gains
        cost.cache_bytes += 2 * rows * T * C * eb  # cross K/V of the segment
        cost.cache_bytes += 2 * rows * past * C * eb  # self K/V of earlier scales (block-causal)
    cost.linear("head", t, C, cfg.vocab_size, eb)
    return cost


# ---- VQ-VAE ------------------------------------------------------------------------------------
def update_cost(cfg: ModelConfig, rows: int, i: int, dtype: str | int = "float32") -> Cost:
    """VQ update of scale ``i`` on ``rows`` rows: lookup, bicubic up, Phi, f_hat +=, area down to scale i + 1 and
    its word embedding."""
    eb = dtype_bytes(dtype)
    sched, E = cfg.schedule, cfg.latent_dim
    if not 0 <= i < sched.n_scales:
        raise ConfigError(f"scale index must be in 0..{sched.n_scales - 1}, got {i}")
    n, pn = sched.last_side, sched.patch_nums[i]
    last = i == sched.n_scales - 1
    cost = Cost(f"update {i}", rows)
    cost.weight_bytes += rows * pn * pn * E * eb  # codebook rows gathered by the lookup
    cost.activation_bytes += rows * E * pn * pn * eb
    if not last:  # bicubic pn -> n: M_h @ x, then @ M_w^T
        cost._part("bicubic", 2 * rows * E * n * pn * pn + 2 * rows * E * n * pn * n)
        cost.weight_bytes += 2 * n * pn * eb
        cost.activation_bytes += rows * E * (n * pn + n * n) * eb
    cost._part("phi", 2 * rows * n * n * E * E * 9)
    cost.weight_bytes += (9 * E * E + E) * eb
    cost.activation_bytes += 2 * rows * E * n * n * eb  # conv output, f_hat_next
    if not last:
        p = sched.patch_nums[i + 1]
        if p != n:  # area n -> p (the identity when the next scale is the full grid)
            cost._part("area", 2 * rows * E * p * n * n + 2 * rows * E * p * n * p)
            cost.weight_bytes += 2 * p * n * eb
            cost.activation_bytes += rows * E * p * n * eb
        cost.activation_bytes += rows * E * p * p * eb  # next scale's latent input
        cost.linear("word_embed", rows * p * p, E, cfg.generator.width, eb)  # its embedded tokens
        cost.weight_bytes += cfg.generator.width * eb  # lvl_embed row
    return cost


@dataclass(frozen=True)
class _Layer:
    kind: str  # "conv" or "attn"
    flops: int  # per row
    out_elems: int  # per row, written


@lru_cache(maxsize=32)
def _decoder_layers(cfg: ModelConfig) -> tuple[tuple[_Layer, ...], int]:
    """Per-row convs and attention blocks of post_quant_conv + decoder, and their parameter count."""
    import torch
    from torch import nn

    from mindhier_rt.models.vqvae import AttnBlock, MultiScaleVQVAE

    with torch.device("meta"):
        vq = MultiScaleVQVAE(cfg)
    layers: list[_Layer] = []

    def conv_hook(m: nn.Conv2d, _inp: tuple, out: torch.Tensor) -> None:
        _, c_out, h, w = out.shape
        k = math.prod(m.kernel_size) * (m.in_channels // m.groups)
        layers.append(_Layer("conv", 2 * c_out * h * w * k, c_out * h * w))

    def attn_hook(_m: nn.Module, inp: tuple, _out: torch.Tensor) -> None:
        _, c, h, w = inp[0].shape
        n = h * w
        layers.append(_Layer("attn", 2 * 2 * n * n * c, n * n + c * n))

    modules = [vq.post_quant_conv, vq.decoder]
    handles = []
    for root in modules:
        for m in root.modules():
            if isinstance(m, nn.Conv2d):
                handles.append(m.register_forward_hook(conv_hook))
            elif isinstance(m, AttnBlock):
                handles.append(m.register_forward_hook(attn_hook))
    n = cfg.schedule.last_side
    with torch.no_grad():
        vq.decoder(vq.post_quant_conv(torch.empty(1, cfg.latent_dim, n, n, device="meta")))
    for h in handles:
        h.remove()
    params = sum(p.numel() for root in modules for p in root.parameters())
    return tuple(layers), params


def decoder_cost(cfg: ModelConfig, rows: int, dtype: str | int = "float32") -> Cost:
    """post_quant_conv + VQ-VAE decoder on ``rows`` latents (every Conv2d and AttnBlock, from the modules)."""
    eb = dtype_bytes(dtype)
    layers, params = _decoder_layers(cfg)
    cost = Cost("decode", rows, weight_bytes=params * eb)
    for layer in layers:
        cost._part(layer.kind, rows * layer.flops)
        cost.activation_bytes += rows * layer.out_elems * eb
    return cost


# ---- the whole loop ----------------------------------------------------------------------------
@dataclass
class DecodeCosts:
    """Costs of one ``reconstruct`` call, phase by phase."""

    encode: Cost  # conditional scans plus (with guidance) the one null row
    context: Cost
    steps: list[Cost]
    updates: list[Cost]
    decode: Cost

    @property
    def total(self) -> Cost:
        return Cost.total("total", [self.encode, self.context, *self.steps, *self.updates, self.decode])

    def to_dict(self) -> dict[str, Any]:
        return {
            "encode": self.encode.to_dict(),
            "context": self.context.to_dict(),
            "steps": [c.to_dict() for c in self.steps],
            "updates": [c.to_dict() for c in self.updates],
            "decode": self.decode.to_dict(),
            "total": self.total.to_dict(),
        }


def guided_scales(cfg: ModelConfig, sampling: SamplingConfig | None) -> list[bool]:
    """Whether each scale runs with the unconditional rows (as ``reconstruct`` switches guidance off)."""
    sampling = sampling or SamplingConfig()
    out, on = [], guidance_active(sampling, 0)
    for i in range(cfg.schedule.n_scales):
        on = on and guidance_active(sampling, i)
        out.append(on)
    return out


def decode_costs(
    cfg: ModelConfig,
    scans: int,
    samples: int = 1,
    sampling: SamplingConfig | None = None,
    subject: str | None = None,
    dtype: str | int = "float32",
) -> DecodeCosts:
    """Costs of ``reconstruct`` on ``scans`` scans with ``samples`` draws each under ``sampling``."""
    if scans < 1 or samples < 1:
        raise ConfigError(f"scans and samples must be >= 1, got {scans} and {samples}")
    R = scans * samples
    guided = guided_scales(cfg, sampling)
    encodes = [encoder_cost(cfg, scans, subject, dtype)]
    if guided[0]:
        encodes.append(encoder_cost(cfg, 1, subject, dtype))
    return DecodeCosts(
        encode=Cost.total("encode", encodes),
        context=context_cost(cfg, 2 * R if guided[0] else R, dtype),
        steps=[step_cost(cfg, 2 * R if on else R, i, dtype) for i, on in enumerate(guided)],
        updates=[update_cost(cfg, R, i, dtype) for i in range(cfg.schedule.n_scales)],
        decode=decoder_cost(cfg, R, dtype),
    )
