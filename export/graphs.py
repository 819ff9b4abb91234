"""The exported graphs: thin nn.Module wrappers around the reference models, one per bundle graph.

Every wrapper calls the same model code as eager decoding (``ScaleGenerator.blocks_step``,
``MultiScaleVQVAE.update_fhat`` ...), so the graphs cannot drift from the reference. Shapes:
B batch rows (cond + uncond with guidance), l tokens of a scale, C width, H heads, c head dim,
M levels, T tokens per level, D context width, E VQ latent, h = w finest grid side.

- ``encoder_<subject>``: voxels [B, V_s] -> pooled [B, D], context [B, M*T, D] (deep first)
- ``context``: pooled, context -> start [B, 1, C], ada_blocks [depth, B, 6, C], ada_head [B, 2, C],
  cross.{j}.key / cross.{j}.value [M, B, H, T, c] per layer, segment-major so that the segment a
  scale reads is one contiguous block (a host binds a pointer offset, no copy). Under a context map where one
  scale's tokens read several segments (``reference-pipeline``) they are [B, H, M*T, c] instead: every step
  reads the whole context.
  Class-conditional models (VAR blocks): labels [B] int64 -> start, ada_blocks, ada_head (no cross K/V;
  the unconditional rows use the null label ``num_classes``), and no encoder graphs.
- ``generator_step``: one graph for every scale (the weights exist once): h [B, l, C], rope.cos/sin
  [l, c], ada_blocks, ada_head, cross.{j}.key/value [B, H, T, c] of the scale's segment (``reference-pipeline``:
  cross.segment [l] int64, the context segment of each of the scale's tokens = rows offset_i .. offset_i + l of
  the bundle's ``cross_segment.npy``, then cross.{j}.key/value [B, H, M*T, c] of the whole context; the graph
  masks each token's keys to its segment)
  (block-causal: + past_key_values.{j}.key/value [B, H, past, c]) -> logits [B, l, V]
  (block-causal: + present.{j}.key/value [B, H, past + l, c]). l and past are the only axes that
  change with the scale; each is static for a given scale. VAR blocks have no rope.* and no cross.*
  inputs (absolute positions are added in ``context`` / ``update_<i>``; there is no context).
- ``update_<i>``: f_hat [B, E, h, w], idx [B, l_i] -> f_hat_next, and (but for the last scale) the next
  scale's embedded input h [B, l_{i+1}, C] = word_embed(area_down(f_hat')) + lvl_embed[i + 1].
- ``vq_decoder``: f_hat -> image [B, 3, H, W] in [0, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mindhier_rt.models.encoder import HierarchicalEncoder
from mindhier_rt.models.generator import ScaleGenerator
from mindhier_rt.models.vqvae import MultiScaleVQVAE


class EncoderGraph(nn.Module):
    def __init__(self, encoder: HierarchicalEncoder, subject: str) -> None:
        super().__init__()
        self.encoder, self.subject = encoder, subject

    def forward(self, voxels_BV: Tensor) -> tuple[Tensor, Tensor]:
        out = self.encoder(voxels_BV, self.subject)
        return out.pooled_BD, out.context_BSD()


class ContextGraph(nn.Module):
    """Everything that depends only on the scan, computed once (the context K/V cache and AdaLN vectors).

    Inputs: (pooled [B, D_pool], context [B, S, D]), or (labels [B],) for class-conditional models.
    """

    def __init__(self, generator: ScaleGenerator) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, cond: Tensor, context_BSD: Tensor | None = None) -> tuple[Tensor, ...]:
        gen, sched = self.generator, self.generator.schedule
        state = gen.prepare(cond, context_BSD)
        start_B1C = gen.embed_scale(0, None, state.start_B1C)
        outs: list[Tensor] = [start_B1C, torch.stack(state.ada_blocks), state.ada_head_B2C]
        M, T = sched.n_levels, sched.context_tokens
        if not sched.single_segment:  # steps read the whole context under a per-token mask
            return (*outs, *[t.contiguous() for kv in state.ctx_kv or () for t in kv])
        for k_BHSc, v_BHSc in state.ctx_kv or ():
            for t in (k_BHSc, v_BHSc):
                B, H, _, c = t.shape
                outs.append(t.reshape(B, H, M, T, c).permute(2, 0, 1, 3, 4).contiguous())
        return tuple(outs)


class PastPresentKV:
    """Cache-like object for exported graphs: present = concat(past, new); the host keeps the buffers."""

    def __init__(self, past_k: Tensor, past_v: Tensor) -> None:
        self.past_k, self.past_v = past_k, past_v
        self.present: tuple[Tensor, Tensor] | None = None

    def update(self, offset: int, k_BHlc: Tensor, v_BHlc: Tensor) -> tuple[Tensor, Tensor]:
        self.present = (torch.cat([self.past_k, k_BHlc], dim=2), torch.cat([self.past_v, v_BHlc], dim=2))
        return self.present


class StepGraph(nn.Module):
    """One scale of the generator; the same graph serves every scale.

    Inputs: h, [rope.cos, rope.sin,] ada_blocks, ada_head, [cross.segment,] [cross K/V per layer,] [past K/V per
    layer]: the bracketed groups exist for RoPE blocks, a per-token context map, cross-attending blocks and
    block-causal mode respectively.
    """

    def __init__(self, generator: ScaleGenerator) -> None:
        super().__init__()
        self.generator = generator
        self.depth = len(generator.blocks)
        self.block_causal = generator.cfg.generator.attn_mode == "block_causal"
        self.rope = generator.rope_cos_Lc is not None
        self.cross = generator.has_context
        self.per_token = self.cross and not generator.schedule.single_segment

    def forward(self, h_BlC: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
        d, rest = self.depth, list(inputs)
        rope_cos_lc = rope_sin_lc = None
        if self.rope:
            rope_cos_lc, rope_sin_lc, rest = rest[0], rest[1], rest[2:]
        ada_blocks, ada_head, kv = rest[0], rest[1], rest[2:]
        cross = cross_mask = None
        if self.per_token:  # [l, S]: token t may read key s iff s lies in segment_l[t]
            segment_l, kv = kv[0], kv[1:]
            sched = self.generator.schedule
            key_segment_S = torch.arange(sched.context_length, device=segment_l.device) // sched.context_tokens
            cross_mask = segment_l[:, None] == key_segment_S[None, :]
        if self.cross:
            cross, kv = [(kv[2 * j], kv[2 * j + 1]) for j in range(d)], kv[2 * d :]
        caches = None
        if self.block_causal:
            caches = [PastPresentKV(kv[2 * j], kv[2 * j + 1]) for j in range(d)]
        logits = self.generator.blocks_step(
            h_BlC, rope_cos_lc, rope_sin_lc, ada_blocks, ada_head, cross, caches, cross_mask=cross_mask
        )
        if caches is None:
            return (logits,)
        return (logits, *[t for c in caches for t in c.present])


class UpdateGraph(nn.Module):
    """Scale i's VQ update (lookup, upsample, Phi) and the next scale's embedded generator input."""

    def __init__(self, vqvae: MultiScaleVQVAE, generator: ScaleGenerator, scale: int) -> None:
        super().__init__()
        self.vqvae, self.generator, self.scale = vqvae, generator, scale

    def forward(self, f_hat_BEhw: Tensor, idx_Bl: Tensor) -> tuple[Tensor, ...]:
        f_hat_BEhw, next_x_BlE = self.vqvae.update_fhat(self.scale, f_hat_BEhw, idx_Bl)
        if next_x_BlE is None:
            return (f_hat_BEhw,)
        return f_hat_BEhw, self.generator.embed_scale(self.scale + 1, next_x_BlE)


class DecoderGraph(nn.Module):
    def __init__(self, vqvae: MultiScaleVQVAE) -> None:
        super().__init__()
        self.vqvae = vqvae

    def forward(self, f_hat_BEhw: Tensor) -> Tensor:
        return self.vqvae.fhat_to_img(f_hat_BEhw)
