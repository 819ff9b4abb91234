"""Scale-wise autoregressive generator (VAR / Switti family) with scale-masked cross-attention.

Two ways through the same weights, which must agree:
- ``forward``: teacher-forced over the whole token pyramid at once with the schedule's masks (training).
- ``prepare`` + ``step``: decoding one scale at a time. Everything that depends only on the scan
  (the condition, the AdaLN vectors of every block and of the head, the cross-attention K/V of every
  layer) is computed once in ``prepare``; in block-causal mode a preallocated self-attention K/V cache
  is written at each scale's offset.

Attention modes (``cfg.generator.attn_mode``): ``scale_local`` (a token sees its own scale only; what
MindHier uses) and ``block_causal`` (its own and all earlier scales; VAR / Switti-AR).
Guidance: each token cross-attends only to segment ``schedule.segment_of_token[t]`` of the deep-first context
[e_M, ..., e_1]; with the default ``training`` context map that is ``segment_of_scale[i]`` for every token of
scale i, and a step reads the K/V of that one segment. With ``reference-pipeline`` (MindHier's reference
inference, ``schedule.py``) the tokens of one scale can read several segments: the step then reads the whole
context K/V under a per-token mask (dense rows of the cross mask for SDPA, runs of tokens as ranges for the
block-sparse kernel; ``cross_inputs``). The start token and the AdaLN condition come from the pooled feature.

Blocks and conditions (``cfg.generator.block`` / ``.condition``): ``switti`` blocks with an fMRI condition
(the pooled feature through ``fmri_pooler``, plus the cross-attention context; 2D RoPE; with ``abs_pos`` also
learned absolute positions) or ``var`` blocks with a class condition (labels through ``class_emb``, null label =
``num_classes`` for guidance; no context; learned absolute positions ``pos_1LC`` added to every scale's input).
``prepare``'s first argument is the pooled feature [B, D_pool] or the labels [B] (int64) accordingly, and its
context is None for VAR.

Axis legend: B batch, L pyramid tokens, l tokens of one scale, C width, D context width, S context
tokens, E VQ latent channels, V vocabulary, H heads, c head dim, P rotary pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mindhier_rt.config import ModelConfig
from mindhier_rt.models.attention import RangeMask
from mindhier_rt.models.blocks import (
    AdaLNBeforeHead,
    GaussianFourierFeatures,
    SelfKVCache,
    SwittiBlock,
    VARBlock,
    rope_angles,
    rope_tables,
)

CROP_FIELDS = 4  # (orig_h, orig_w, crop_top, crop_left), in units of the image size


@dataclass
class ScanState:
    """Per-scan decode state: computed once by ``prepare``, read by every ``step``."""

    start_B1C: Tensor
    ada_blocks: list[Tensor]  # per block [B, 6, C]
    ada_head_B2C: Tensor
    ctx_kv: list[tuple[Tensor, Tensor]] | None  # per block (k, v) [B, H, S, c]; None without cross-attention
    self_kv: list[SelfKVCache] | None  # block-causal mode only

    def select(self, rows: Tensor | slice) -> None:
        """Keep only some batch rows, e.g. the conditional half once guidance is switched off."""
        self.start_B1C = self.start_B1C[rows]
        self.ada_blocks = [a[rows] for a in self.ada_blocks]
        self.ada_head_B2C = self.ada_head_B2C[rows]
        if self.ctx_kv is not None:
            self.ctx_kv = [(k[rows], v[rows]) for k, v in self.ctx_kv]
        if self.self_kv is not None:
            for cache in self.self_kv:
                cache.select(rows)


class ScaleGenerator(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        g, sched = cfg.generator, cfg.schedule
        self.cfg, self.schedule = cfg, sched
        C = self.width = g.width
        self.has_context = g.cross_attention
        if g.condition == "class":
            self.class_emb = nn.Embedding(g.num_classes + 1, C)  # row num_classes: the null class (guidance)
        else:
            self.fmri_pooler = nn.Linear(g.pooled_dim or cfg.context_dim, C)  # pooled feature -> condition
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        # learned absolute positions of every pyramid token (VAR, or switti blocks with ``abs_pos``)
        self.pos_1LC = nn.Parameter(torch.zeros(1, sched.total_tokens, C)) if g.absolute_positions else None
        self.word_embed = nn.Linear(cfg.latent_dim, C)
        self.lvl_embed = nn.Embedding(sched.n_scales, C)
        if g.crop_cond:
            self.crop_embed = GaussianFourierFeatures(g.crop_freqs)
            self.crop_proj = nn.Linear(CROP_FIELDS * 2 * g.crop_freqs, C)
            # the full, uncropped image (u, u, 0, 0); not saved in checkpoints
            u = g.crop_unit
            self.register_buffer("crop_default_4", torch.tensor([u, u, 0.0, 0.0]), persistent=False)
        if g.block == "var":
            blocks = [VARBlock(C, g.heads, g.ffn_dim, g.norm_eps) for _ in range(g.depth)]
        else:
            blocks = [
                SwittiBlock(C, g.heads, cfg.context_dim, g.ffn_dim, g.norm_eps, g.crop_cond) for _ in range(g.depth)
            ]
        self.blocks = nn.ModuleList(blocks)
        self.head_nm = AdaLNBeforeHead(C, g.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)

        # Derived from the schedule, never stored in checkpoints.
        cos_Lc = sin_Lc = None
        if g.rope:
            angles = rope_angles(sched, g.head_dim, g.rope_theta, g.rope_grid, g.rope_layout)
            cos_Lc, sin_Lc = (t.float() for t in rope_tables(angles))
        self.register_buffer("rope_cos_Lc", cos_Lc, persistent=False)
        self.register_buffer("rope_sin_Lc", sin_Lc, persistent=False)
        self.register_buffer("lvl_L", torch.tensor(sched.scale_of_token), persistent=False)
        self.register_buffer("self_mask_LL", sched.self_attn_mask(g.attn_mode), persistent=False)
        cross_mask = sched.cross_attn_mask() if self.has_context else None
        self.register_buffer("cross_mask_LS", cross_mask, persistent=False)
        self.reset_parameters()

    # ---- init -----------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        depth = len(self.blocks)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.trunc_normal_(self.pos_start, std=0.02)
        if self.pos_1LC is not None:
            nn.init.trunc_normal_(self.pos_1LC, std=0.02)
        C = self.width
        for block in self.blocks:
            # gamma1, gamma2 start at 1/sqrt(2 depth): every residual branch contributes from the first step.
            with torch.no_grad():
                block.ada_lin[1].bias[: 2 * C].fill_(1 / (2 * depth) ** 0.5)

    # ---- condition ------------------------------------------------------------------------------
    def condition(self, cond: Tensor) -> Tensor:
        """The AdaLN condition [B, C]: ``class_emb(labels [B])`` or ``fmri_pooler(pooled [B, D_pool])``."""
        if self.cfg.generator.condition == "class":
            return self.class_emb(cond)
        return self.fmri_pooler(cond)

    def crop_vector(self, crop_B4: Tensor | None, batch: int, device, dtype) -> Tensor | None:
        """Embedded crop condition [B, C]; defaults to the full, uncropped image (u, u, 0, 0), u = crop_unit."""
        g = self.cfg.generator
        if not g.crop_cond:
            return None
        if crop_B4 is None:  # a buffer on the module's device: no host copy, so CUDA graphs can hold it
            crop_B4 = self.crop_default_4.to(device, dtype).expand(batch, -1)
        return self.crop_proj(self.crop_embed(crop_B4.to(dtype)))

    def rope(self, i: int) -> tuple[Tensor | None, Tensor | None]:
        """Rotary tables [n_i, c] of scale i's tokens (None, None for blocks without RoPE)."""
        if self.rope_cos_Lc is None:
            return None, None
        tokens = self.schedule.scale_slice(i)
        return self.rope_cos_Lc[tokens], self.rope_sin_Lc[tokens]

    def _modulations(self, cond_BC: Tensor, crop_BC: Tensor | None) -> tuple[list[Tensor], Tensor]:
        return [b.modulation(cond_BC, crop_BC) for b in self.blocks], self.head_nm.modulation(cond_BC)

    def _logits(self, x_BlC: Tensor, ada_head_B2C: Tensor) -> Tensor:
        return self.head(self.head_nm(x_BlC, ada_head_B2C)).float()

    # ---- teacher-forced pass (training) ---------------------------------------------------------
    def forward(
        self,
        pooled_BD: Tensor,
        context_BSD: Tensor | None,
        x_BLE: Tensor,
        crop_B4: Tensor | None = None,
        checkpoint_blocks: bool = False,
    ) -> Tensor:
        """Logits [B, L, V] of every scale given the teacher inputs of scales 1..K-1 ([B, L-1, E]).

        ``pooled_BD``: the condition (pooled feature, or labels [B] for class models; context None then).
        ``checkpoint_blocks``: keep only each block's input for the backward pass and recompute the block there
        (``torch.utils.checkpoint``, non-reentrant): activation memory of one block instead of all of them.
        Each block runs as one ``teacher_forward`` call (its AdaLN vectors and context K/V included).
        """
        B = pooled_BD.shape[0]
        L = self.schedule.total_tokens
        assert x_BLE.shape[:2] == (B, L - 1), f"teacher inputs {tuple(x_BLE.shape)} != ({B}, {L - 1}, E)"
        cond_BC = self.condition(pooled_BD)
        crop_BC = self.crop_vector(crop_B4, B, pooled_BD.device, cond_BC.dtype)
        start_B1C = cond_BC.unsqueeze(1) + self.pos_start
        x_BLC = torch.cat([start_B1C, self.word_embed(x_BLE)], dim=1) + self.lvl_embed(self.lvl_L)
        if self.pos_1LC is not None:
            x_BLC = x_BLC + self.pos_1LC
        sched, mode = self.schedule, self.cfg.generator.attn_mode
        self_mask = RangeMask(self.self_mask_LL, sched.key_ranges(mode))
        cross_mask = RangeMask(self.cross_mask_LS, sched.key_ranges("cross")) if self.has_context else None
        recompute = checkpoint_blocks and torch.is_grad_enabled()
        for block in self.blocks:
            args = (x_BLC, cond_BC, crop_BC, self.rope_cos_Lc, self.rope_sin_Lc, context_BSD, self_mask, cross_mask)
            if recompute:
                x_BLC = checkpoint(block.teacher_forward, *args, use_reentrant=False)
            else:
                x_BLC = block.teacher_forward(*args)
        return self._logits(x_BLC, self.head_nm.modulation(cond_BC))

    # ---- incremental decoding -------------------------------------------------------------------
    def prepare(
        self, pooled_BD: Tensor, context_BSD: Tensor | None, crop_B4: Tensor | None = None, self_cache: bool = True
    ) -> ScanState:
        """The context step: everything that depends only on the scan, computed once.

        ``pooled_BD`` is the condition: the pooled feature [B, D_pool], or class labels [B] (int64) for
        class-conditional models, whose ``context_BSD`` is None.

        ``self_cache=False`` skips allocating the block-causal self-attention caches (for a caller that keeps
        its own, preallocated once: the fast backend).
        """
        B = pooled_BD.shape[0]
        cond_BC = self.condition(pooled_BD)
        crop_BC = self.crop_vector(crop_B4, B, pooled_BD.device, cond_BC.dtype)
        ada_blocks, ada_head = self._modulations(cond_BC, crop_BC)
        self_kv = None
        if self.cfg.generator.attn_mode == "block_causal" and self_cache:
            g = self.cfg.generator
            self_kv = [
                SelfKVCache(B, g.heads, self.schedule.total_tokens, g.head_dim, cond_BC.device, cond_BC.dtype)
                for _ in self.blocks
            ]
        return ScanState(
            start_B1C=cond_BC.unsqueeze(1) + self.pos_start,
            ada_blocks=ada_blocks,
            ada_head_B2C=ada_head,
            ctx_kv=[block.context_kv(context_BSD) for block in self.blocks] if self.has_context else None,
            self_kv=self_kv,
        )

    def embed_scale(self, i: int, x_BlE: Tensor | None, start_B1C: Tensor | None = None) -> Tensor:
        """Input tokens of scale i in model width: the start token at i = 0, else word_embed(x); plus lvl_embed[i]
        (and, with absolute positions, the scale's rows of pos_1LC)."""
        if i == 0:
            assert start_B1C is not None
            h_BlC = start_B1C
        else:
            assert x_BlE is not None and x_BlE.shape[1] == self.schedule.token_counts[i]
            h_BlC = self.word_embed(x_BlE)
        h_BlC = h_BlC + self.lvl_embed.weight[i]
        if self.pos_1LC is not None:
            h_BlC = h_BlC + self.pos_1LC[0, self.schedule.scale_slice(i)]
        return h_BlC

    def blocks_step(
        self,
        h_BlC: Tensor,
        cos_lc: Tensor | None,
        sin_lc: Tensor | None,
        ada_blocks: list[Tensor] | Tensor,
        ada_head_B2C: Tensor,
        cross_kv: list[tuple[Tensor, Tensor]] | None,
        caches: list | None = None,
        offset: int = 0,
        cross_mask: Tensor | RangeMask | None = None,
    ) -> Tensor:
        """All blocks and the head on one scale's embedded tokens -> logits [B, l, V].

        ``cos_lc`` / ``sin_lc`` are None for blocks without RoPE (VAR); ``cross_kv`` (None without
        cross-attention) holds each layer's K/V of this scale's context segment, or of the whole context with
        ``cross_mask`` saying which keys each token reads (``cross_inputs``); ``caches`` (block-causal)
        are objects with ``update(offset, k, v) -> (k_all, v_all)``: the preallocated ``SelfKVCache`` in
        eager decoding, a past/present concatenation in exported graphs.
        """
        for j, block in enumerate(self.blocks):
            k, v = (None, None) if cross_kv is None else cross_kv[j]
            cache = None if caches is None else caches[j]
            h_BlC = block(h_BlC, ada_blocks[j], cos_lc, sin_lc, k, v, cross_mask=cross_mask, cache=cache, offset=offset)
        return self._logits(h_BlC, ada_head_B2C)

    def cross_inputs(
        self, i: int, ctx_kv: list[tuple[Tensor, Tensor]] | None
    ) -> tuple[list[tuple[Tensor, Tensor]] | None, RangeMask | None]:
        """The cross-attention K/V and mask of decode step i from the scan's context K/V [B, H, S, c] per layer.

        A scale whose tokens all read one segment gets that segment's K/V (views) and no mask; otherwise the
        whole context's K/V and the step's per-token mask (rows of ``cross_mask_LS``, a view on the module's
        device, and ``schedule.step_cross_ranges(i)``).
        """
        if ctx_kv is None:
            return None, None
        sched = self.schedule
        if len(sched.cross_runs[i]) == 1:
            ctx = sched.context_slice(i)
            return [(k[:, :, ctx], v[:, :, ctx]) for k, v in ctx_kv], None
        return ctx_kv, RangeMask(self.cross_mask_LS[sched.scale_slice(i)], sched.step_cross_ranges(i))

    def step(self, i: int, state: ScanState, x_BlE: Tensor | None = None) -> Tensor:
        """Logits [B, n_i, V] of scale i. ``x_BlE`` is the next-scale input from the VQ-VAE (None at i = 0)."""
        return self.step_embedded(i, state, self.embed_scale(i, x_BlE, state.start_B1C))

    def step_embedded(self, i: int, state: ScanState, h_BlC: Tensor) -> Tensor:
        """Logits [B, n_i, V] of scale i from its input tokens in model width (``embed_scale``'s output)."""
        sched = self.schedule
        cross_kv, cross_mask = self.cross_inputs(i, state.ctx_kv)
        cos_lc, sin_lc = self.rope(i)
        return self.blocks_step(
            h_BlC,
            cos_lc,
            sin_lc,
            state.ada_blocks,
            state.ada_head_B2C,
            cross_kv,
            state.self_kv,
            sched.offsets[i],
            cross_mask,
        )
