"""Hierarchical fMRI Encoder (HFE) of MindHier.

Structure:

* Voxel MLP. One subject's z-scored voxels [B, V_s] enter a subject-specific ``Linear(V_s, mlp_dims[0])``
  (``subject_in.<subject>``; subjects have different voxel counts), then LayerNorm -> GELU, then for every
  further hidden width ``Linear -> LayerNorm -> GELU``, then a ``Linear(mlp_dims[-1], voxel_tokens * D)``
  reshaped to ``voxel_tokens`` tokens of width D, plus a learned positional embedding. Everything after the
  subject layer is shared by all subjects.
* Image branch. T learned queries pass through M cascaded pre-norm transformer-decoder layers (self-attention
  over the queries, cross-attention to the voxel tokens, GELU FFN). The output of layer m, after a shared final
  LayerNorm and a shared Linear D -> D image projection, is level e_m [B, T, D]; e_1 is the shallowest level,
  e_M the deepest.
* Text branch. ``text_tokens`` learned queries through their own stack of M decoder layers cross-attending the
  same voxel tokens, then LayerNorm and a Linear D -> D text projection -> [B, text_tokens, D].
* Pooled feature: the mean of the terminal level e_M over its T tokens -> [B, D].

The decoder layer is written with plain Linear, LayerNorm, GELU and ``models.attention.attention`` so that
the graph exports cleanly to ONNX / TensorRT.

Axis letters: B batch, V voxels of one subject, N voxel tokens, M levels, T tokens per level (context_tokens),
Q query tokens of a decoder stack (T or text tokens), D encoder / context width, H heads, K head width,
F FFN width, S context tokens (M * T), Bt text tokens (``text_BtD``).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mindhier_rt.config import ModelConfig
from mindhier_rt.errors import ConfigError
from mindhier_rt.models.attention import attention
from mindhier_rt.voxels import check_voxels


@dataclass
class EncoderOutput:
    """Everything the encoder predicts for one batch of scans."""

    levels_BMTD: Tensor  # [B, M, T, D]; index m-1 holds e_m (shallow first)
    text_BtD: Tensor  # [B, text_tokens, D]
    pooled_BD: Tensor  # mean of e_M over its T tokens
    single_feature: bool = False  # ablation: every context segment holds the terminal level e_M

    @classmethod
    def from_levels(cls, levels_BMTD: Tensor, text_BtD: Tensor, single_feature: bool = False) -> EncoderOutput:
        """The output whose levels are ``levels_BMTD`` (shallow first): pooled is the mean of e_M over its tokens."""
        return cls(levels_BMTD, text_BtD, levels_BMTD[:, -1].mean(dim=1), single_feature)

    def context_BSD(self) -> Tensor:
        """Deep-first concatenation [e_M, ..., e_1] -> [B, M*T, D]: the generator's cross-attention context.

        With ``single_feature`` (``cfg.conditioning == "single"``) it is [e_M, ..., e_M] instead, so every
        scale reads the same terminal feature whatever the guidance map says.
        """
        levels = self.levels_BMTD
        if self.single_feature:
            levels = levels[:, -1:].expand_as(levels)
        return levels.flip(1).flatten(1, 2)


class _Attention(nn.Module):
    """Multi-head attention of a query sequence over a key/value sequence (biased linears)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        assert dim % heads == 0, (dim, heads)
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x_BQD: Tensor, ctx_BND: Tensor) -> Tensor:
        head_dim = x_BQD.shape[-1] // self.heads
        q_BHQK = self.q(x_BQD).unflatten(-1, (self.heads, head_dim)).transpose(1, 2)
        k_BHNK = self.k(ctx_BND).unflatten(-1, (self.heads, head_dim)).transpose(1, 2)
        v_BHNK = self.v(ctx_BND).unflatten(-1, (self.heads, head_dim)).transpose(1, 2)
        o_BHQK = attention(q_BHQK, k_BHNK, v_BHNK)
        return self.out(o_BHQK.transpose(1, 2).flatten(2))


class DecoderLayer(nn.Module):
    """Pre-norm transformer-decoder layer: self-attention, cross-attention to voxel tokens, GELU FFN."""

    def __init__(self, dim: int, heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = _Attention(dim, heads)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attn = _Attention(dim, heads)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn_in = nn.Linear(dim, ffn_dim)
        self.ffn_out = nn.Linear(ffn_dim, dim)

    def forward(self, x_BQD: Tensor, voxel_tokens_BND: Tensor) -> Tensor:
        h_BQD = self.norm_self(x_BQD)
        x_BQD = x_BQD + self.self_attn(h_BQD, h_BQD)
        x_BQD = x_BQD + self.cross_attn(self.norm_cross(x_BQD), voxel_tokens_BND)
        h_BQF = F.gelu(self.ffn_in(self.norm_ffn(x_BQD)))
        return x_BQD + self.ffn_out(h_BQF)


class HierarchicalEncoder(nn.Module):
    """fMRI voxels of one subject -> M hierarchical image levels, text tokens and a pooled feature."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        enc = cfg.encoder
        if not enc.mlp_dims:
            raise ConfigError("encoder mlp_dims needs at least one hidden width")
        for name, count in enc.subjects:
            if not name or "." in name:
                raise ConfigError(f"subject id {name!r} must be non-empty and contain no '.'")
            if count < 1:
                raise ConfigError(f"subject {name} needs a positive voxel count, got {count}")
        if len({name for name, _ in enc.subjects}) != len(enc.subjects):
            raise ConfigError(f"duplicate subject ids in {[name for name, _ in enc.subjects]}")

        self.cfg = cfg
        dim = cfg.context_dim
        self.dim = dim
        self.voxel_tokens = enc.voxel_tokens
        self.n_levels = cfg.n_levels

        # ---- voxel MLP: subject layer, shared hidden blocks, token head --------------------------
        self.subject_in = nn.ModuleDict({name: nn.Linear(count, enc.mlp_dims[0]) for name, count in enc.subjects})
        self.in_norm = nn.LayerNorm(enc.mlp_dims[0])
        self.hidden = nn.ModuleList(
            nn.Sequential(nn.Linear(d_in, d_out), nn.LayerNorm(d_out), nn.GELU())
            for d_in, d_out in pairwise(enc.mlp_dims)
        )
        self.to_tokens = nn.Linear(enc.mlp_dims[-1], enc.voxel_tokens * dim)
        self.voxel_pos_ND = nn.Parameter(torch.empty(enc.voxel_tokens, dim))

        # ---- image branch ------------------------------------------------------------------------
        self.image_queries_TD = nn.Parameter(torch.empty(cfg.context_tokens, dim))
        self.image_layers = nn.ModuleList(DecoderLayer(dim, enc.heads, enc.ffn_dim) for _ in range(cfg.n_levels))
        self.image_norm = nn.LayerNorm(dim)
        self.image_proj = nn.Linear(dim, dim)

        # ---- text branch -------------------------------------------------------------------------
        self.text_queries_TD = nn.Parameter(torch.empty(enc.text_tokens, dim))
        self.text_layers = nn.ModuleList(DecoderLayer(dim, enc.heads, enc.ffn_dim) for _ in range(cfg.n_levels))
        self.text_norm = nn.LayerNorm(dim)
        self.text_proj = nn.Linear(dim, dim)

        for p in (self.voxel_pos_ND, self.image_queries_TD, self.text_queries_TD):
            nn.init.normal_(p, std=0.02)

    # ---- helpers -------------------------------------------------------------------------------
    @property
    def subjects(self) -> tuple[str, ...]:
        """Subject ids this encoder has an input layer for."""
        return tuple(name for name, _ in self.cfg.encoder.subjects)

    def voxel_count(self, subject: str) -> int:
        """V_s of ``subject``; ConfigError naming the known subjects if it is unknown."""
        return self.cfg.encoder.voxel_count(subject)

    def null_voxels(
        self, subject: str, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Tensor:
        """All-zero voxels [batch, V_s]: their encoding is the classifier-free-guidance null condition."""
        count = self.voxel_count(subject)
        weight = self.subject_in[subject].weight
        return torch.zeros(
            batch, count, device=weight.device if device is None else device, dtype=dtype or weight.dtype
        )

    def param_count(self, subject: str | None = None) -> int:
        """Shared parameters plus ``subject``'s input layer (every subject's input layer if None)."""
        if subject is None:
            return sum(p.numel() for p in self.parameters())
        self.voxel_count(subject)  # validates the id
        shared = sum(p.numel() for name, p in self.named_parameters() if not name.startswith("subject_in."))
        return shared + sum(p.numel() for p in self.subject_in[subject].parameters())

    def check_voxels(self, voxels_BV: Tensor, subject: str) -> None:
        """Raise ConfigError / InputError for an unknown subject or malformed voxels (``forward`` calls it)."""
        # The NaN / inf check is data-dependent: skipped while tracing / exporting (it would be baked into the
        # graph), on meta and while a CUDA graph is captured (a host sync; the decode loop checks before encoding).
        tracing = (
            voxels_BV.device.type == "meta"
            or torch.jit.is_tracing()
            or torch.compiler.is_compiling()
            or (voxels_BV.is_cuda and torch.cuda.is_current_stream_capturing())
        )
        check_voxels(voxels_BV, subject, self.voxel_count(subject), finite=not tracing)

    # ---- forward -------------------------------------------------------------------------------
    def encode_voxels(self, voxels_BV: Tensor, subject: str) -> Tensor:
        """Voxel MLP: [B, V_s] -> voxel tokens [B, N, D] (with positional embedding). No input checks."""
        x = F.gelu(self.in_norm(self.subject_in[subject](voxels_BV)))
        for block in self.hidden:
            x = block(x)
        tokens_BND = self.to_tokens(x).unflatten(-1, (self.voxel_tokens, self.dim))
        return tokens_BND + self.voxel_pos_ND

    def forward(self, voxels_BV: Tensor, subject: str) -> EncoderOutput:
        """Encode one subject's voxels [B, V_s] into levels [B, M, T, D], text [B, Bt, D] and pooled [B, D]."""
        self.check_voxels(voxels_BV, subject)
        voxels_BV = voxels_BV.to(self.subject_in[subject].weight.dtype)
        tokens_BND = self.encode_voxels(voxels_BV, subject)
        batch = tokens_BND.shape[0]

        x_BTD = self.image_queries_TD.expand(batch, -1, -1)
        levels = []
        for layer in self.image_layers:
            x_BTD = layer(x_BTD, tokens_BND)
            levels.append(self.image_proj(self.image_norm(x_BTD)))
        levels_BMTD = torch.stack(levels, dim=1)

        t_BtD = self.text_queries_TD.expand(batch, -1, -1)
        for layer in self.text_layers:
            t_BtD = layer(t_BtD, tokens_BND)
        text_BtD = self.text_proj(self.text_norm(t_BtD))

        return EncoderOutput.from_levels(levels_BMTD, text_BtD, single_feature=self.cfg.conditioning == "single")
