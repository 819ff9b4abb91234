"""Transformer pieces of the scale-wise generator: the Switti-style block (MindHier) and VAR's block.

Both blocks take the same arguments (``forward(x, ada, cos, sin, ctx_k, ctx_v, self_mask, cross_mask, cache,
offset)``, ``modulation(cond, crop)``), so the generator, its decode step and the exported graphs drive either;
the VAR block ignores the rotary tables and the context (it has neither). ``teacher_forward(x, cond, crop, cos,
sin, context, self_mask, cross_mask)`` is the whole block in one call (AdaLN vectors, context K/V, ``forward``):
the unit that the teacher-forced pass checkpoints and that FSDP gathers once (see ``SwittiBlock.teacher_forward``).

Axis legend: B batch, l tokens of the current scale(s), L tokens of the whole pyramid, C width,
H heads, c head dim, S context tokens, D context width, P rotary pairs per head (c / 2).

Attention goes through ``models.attention.attention`` with boolean masks (True = may attend) so the same
code serves the teacher-forced pass (full pyramid, schedule masks) and the per-scale decode step (one
scale, a context segment and, in block-causal mode, a self-attention K/V cache). The elementwise chains between the
matmuls are the PyTorch functions of ``models.elementwise``, or the fused Triton kernels of
``mindhier_rt.kernels.fused_norm`` where the execution options say so (``mindhier_rt.execution``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mindhier_rt.execution import current
from mindhier_rt.models.attention import RangeMask, attention
from mindhier_rt.models.elementwise import (
    layer_norm_no_affine,
    qk_heads,
    residual_rms_norm_eager,
    rms_norm,
    rms_norm_modulate_eager,
)
from mindhier_rt.schedule import Schedule


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain, computed in float32 (``rms_norm``)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


# ---- the block's elementwise chains, fused under ExecutionOptions.fused_norms --------------------------
def norm_modulate(norm: RMSNorm, x: Tensor, scale: Tensor | None = None, shift: Tensor | None = None) -> Tensor:
    """norm(x), then * (1 + scale) + shift when given (AdaLN); one Triton kernel with fused norms on."""
    fn = rms_norm_modulate_eager
    if current().fused_norms:
        from mindhier_rt.kernels.fused_norm import rms_norm_modulate as fn
    return fn(x, norm.weight, norm.eps, scale, shift)


def residual_norm(
    x: Tensor,
    h: Tensor,
    norm: RMSNorm,
    gate: Tensor | None = None,
    then: RMSNorm | None = None,
    then_scale: Tensor | None = None,
    then_shift: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """x + norm(h) [* gate], and the next sub-layer's input ``norm_modulate(then, x', ...)`` when ``then`` is given;
    one Triton kernel with fused norms on (``mindhier_rt.execution``)."""
    fn = residual_rms_norm_eager
    if current().fused_norms:
        from mindhier_rt.kernels.fused_norm import residual_rms_norm as fn
    then_weight, then_eps = (None, None) if then is None else (then.weight, then.eps)
    return fn(x, h, norm.weight, norm.eps, gate, then_weight, then_eps, then_scale, then_shift)


# ---- 2D axial rotary embedding, real arithmetic ---------------------------------------------------
def rope_angles(schedule: Schedule, head_dim: int, theta: float, grid: float, layout: str = "rows_first") -> Tensor:
    """Rotation angle of every (token, pair) of the pyramid: [L, head_dim // 2].

    Positions of a pn x pn grid are spread over 0..grid (coefficient grid / (pn - 1); a 1 x 1 grid sits at
    0). Pair j of an axis with d = head_dim / 2 dims turns at theta^(-2j/d).

    ``layout="rows_first"`` (mindhier-rt's own models): the first half of the pairs turns with the row
    position, the second half with the column; computed in float64. ``layout="switti"`` (imported Switti /
    MindHier weights): the first half turns with the column (x), the second with the row (y), and the angles
    are computed in float32 in Switti's order of operations (frequency x coefficient, then x position), so
    the tables equal the reference's to the last bit.
    """
    axis_dim = head_dim // 2
    per_scale = []
    if layout == "switti":
        inv_freq_P = 1.0 / (theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim))
        for pn in schedule.patch_nums:
            freq_P = inv_freq_P * (grid / max(pn - 1, 1))
            t = torch.arange(pn * pn, dtype=torch.float32)
            t_x, t_y = t % pn, torch.div(t, pn, rounding_mode="floor")
            per_scale.append(torch.cat([torch.outer(t_x, freq_P), torch.outer(t_y, freq_P)], dim=-1))
        return torch.cat(per_scale, dim=0)
    inv_freq_P = theta ** (-torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)
    for pn in schedule.patch_nums:
        coord = torch.arange(pn, dtype=torch.float64) * (grid / max(pn - 1, 1))
        rows, cols = torch.meshgrid(coord, coord, indexing="ij")
        per_scale.append(torch.cat([rows.reshape(-1, 1) * inv_freq_P, cols.reshape(-1, 1) * inv_freq_P], dim=-1))
    return torch.cat(per_scale, dim=0)


def rope_tables(angles_LP: Tensor) -> tuple[Tensor, Tensor]:
    """Per-dim rotary tables [L, c] from the pair angles: cos repeated per pair, sin signed (-sin, +sin).

    With them a rotation is two multiplies and an add (``apply_rope``), and every consumer (eager
    decoding, the exported step graph, a C++ host) slices the same rows for a scale.
    """
    cos_LP, sin_LP = angles_LP.cos(), angles_LP.sin()
    cos_Lc = torch.stack((cos_LP, cos_LP), dim=-1).flatten(-2)
    sin_Lc = torch.stack((-sin_LP, sin_LP), dim=-1).flatten(-2)
    return cos_Lc, sin_Lc


class SelfKVCache:
    """Preallocated self-attention K/V of one layer for block-causal decoding, written at offsets."""

    def __init__(self, batch: int, heads: int, length: int, head_dim: int, device, dtype) -> None:
        self.k_BHLc = torch.zeros(batch, heads, length, head_dim, device=device, dtype=dtype)
        self.v_BHLc = torch.zeros_like(self.k_BHLc)

    def update(self, offset: int, k_BHlc: Tensor, v_BHlc: Tensor) -> tuple[Tensor, Tensor]:
        """Write this scale's K/V at ``offset``; return everything cached up to and including it."""
        end = offset + k_BHlc.shape[2]
        self.k_BHLc[:, :, offset:end] = k_BHlc
        self.v_BHLc[:, :, offset:end] = v_BHlc
        return self.k_BHLc[:, :, :end], self.v_BHLc[:, :, :end]

    def select(self, rows: Tensor | slice) -> None:
        """Keep only some batch rows (classifier-free guidance switched off)."""
        self.k_BHLc = self.k_BHLc[rows]
        self.v_BHLc = self.v_BHLc[rows]


class SelfAttention(nn.Module):
    """Biased fused qkv, non-affine LayerNorm on q and k over the full width, 2D RoPE, softmax scale 1/sqrt(c)."""

    def __init__(self, width: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads, self.head_dim, self.eps = heads, width // heads, eps
        self.to_qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(
        self,
        x_BlC: Tensor,
        cos_lc: Tensor,
        sin_lc: Tensor,
        mask_ll: Tensor | RangeMask | None = None,
        cache: SelfKVCache | None = None,
        offset: int = 0,
    ) -> Tensor:
        B, l, C = x_BlC.shape
        H, c = self.heads, self.head_dim
        qkv_Bl3C = self.to_qkv(x_BlC).view(B, l, 3, C)
        if current().fused_norms and (cache is None or isinstance(cache, SelfKVCache)):
            from mindhier_rt.kernels.fused_norm import qk_norm_rope

            kv = None if cache is None else (cache.k_BHLc, cache.v_BHLc)
            q, k, v = qk_norm_rope(qkv_Bl3C, cos_lc, sin_lc, H, self.eps, kv, offset)  # k, v into the cache
            return self.proj(attention(q, k, v, mask_ll, 1 / math.sqrt(c)).transpose(1, 2).reshape(B, l, C))
        q, k, v = qk_heads(qkv_Bl3C, cos_lc, sin_lc, H, self.eps)
        if cache is not None:
            k, v = cache.update(offset, k, v)
        o_BHlc = attention(q, k, v, mask_ll, 1 / math.sqrt(c))
        return self.proj(o_BHlc.transpose(1, 2).reshape(B, l, C))


class CrossAttention(nn.Module):
    """Query from the image tokens, K/V from the (normalised) encoder context; qk non-affine LayerNorm, no RoPE."""

    def __init__(self, width: int, context_dim: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads, self.head_dim, self.eps = heads, width // heads, eps
        self.to_q = nn.Linear(width, width)
        self.to_kv = nn.Linear(context_dim, 2 * width)
        self.proj = nn.Linear(width, width)

    def context_kv(self, y_BSD: Tensor) -> tuple[Tensor, Tensor]:
        """K/V of the context, [B, H, S, c] each: computed once per scan, reused at every scale."""
        B, S, _ = y_BSD.shape
        k_BSC, v_BSC = self.to_kv(y_BSD).chunk(2, dim=-1)
        k_BSC = layer_norm_no_affine(k_BSC, self.heads * self.head_dim, self.eps)
        return tuple(t.view(B, S, self.heads, self.head_dim).transpose(1, 2) for t in (k_BSC, v_BSC))

    def forward(
        self, x_BlC: Tensor, k_BHSc: Tensor, v_BHSc: Tensor, mask_lS: Tensor | RangeMask | None = None
    ) -> Tensor:
        B, l, C = x_BlC.shape
        q = (
            layer_norm_no_affine(self.to_q(x_BlC), self.heads * self.head_dim, self.eps)
            .view(B, l, self.heads, self.head_dim)
            .transpose(1, 2)
        )
        o_BHlc = attention(q, k_BHSc, v_BHSc, mask_lS, 1 / math.sqrt(self.head_dim))
        return self.proj(o_BHlc.transpose(1, 2).reshape(B, l, C))


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def pack_gate_up(self) -> None:
        """Keep the gate and up weights in one [2 * hidden, C] tensor whose halves are the two Parameters, so the
        fused path projects both in one GEMM (the eager path and the state dict see two weights as before)."""
        hidden = self.gate_proj.out_features
        packed = torch.cat([self.gate_proj.weight.detach(), self.up_proj.weight.detach()])
        self.gate_proj.weight.data, self.up_proj.weight.data = packed[:hidden], packed[hidden:]

    def _packed_weight(self) -> Tensor | None:
        """The [2 * hidden, C] view over both weights if they are still packed (a later ``.to()`` unpacks them)."""
        g, u = self.gate_proj.weight, self.up_proj.weight
        if g.is_contiguous() and u.is_contiguous() and u.data_ptr() == g.data_ptr() + g.numel() * g.element_size():
            return g.as_strided((2 * g.shape[0], g.shape[1]), (g.shape[1], 1))
        return None

    def forward(self, x: Tensor) -> Tensor:
        if current().fused_norms:
            from mindhier_rt.kernels.fused_norm import silu_mul

            packed = self._packed_weight()
            if packed is None:
                return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))
            gu = F.linear(x, packed)
            hidden = self.gate_proj.out_features
            return self.down_proj(silu_mul(gu[..., :hidden], gu[..., hidden:]))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SwittiBlock(nn.Module):
    """AdaLN self-attention, plain cross-attention and AdaLN SwiGLU, each with sandwich RMSNorms.

    x += RMSNorm2(SelfAttn(RMSNorm1(x) * (1 + scale1) + shift1)) * gamma1
    x += RMSNorm2(CrossAttn(RMSNorm1(x), RMSNorm_y(context)))
    x += RMSNorm2(FFN(RMSNorm1(x) * (1 + scale2) + shift2)) * gamma2
    The six AdaLN vectors depend only on the condition, so decoding computes them once per scan.
    """

    def __init__(self, width: int, heads: int, context_dim: int, ffn_dim: int, eps: float, crop_cond: bool) -> None:
        super().__init__()
        self.width = width
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        self.attn = SelfAttention(width, heads, eps)
        self.cross_attn = CrossAttention(width, context_dim, heads, eps)
        self.ffn = SwiGLU(width, ffn_dim)
        self.self_attention_norm1 = RMSNorm(width, eps)
        self.self_attention_norm2 = RMSNorm(width, eps)
        self.cross_attention_norm1 = RMSNorm(width, eps)
        self.cross_attention_norm2 = RMSNorm(width, eps)
        self.ffn_norm1 = RMSNorm(width, eps)
        self.ffn_norm2 = RMSNorm(width, eps)
        self.attention_y_norm = RMSNorm(context_dim, eps)
        # Per-block gain of the crop embedding added to the AdaLN condition (starts at 0: no effect).
        self.crop_cond_scales = nn.Parameter(torch.zeros(width)) if crop_cond else None

    def modulation(self, cond_BC: Tensor, crop_BC: Tensor | None) -> Tensor:
        """AdaLN vectors [B, 6, C]: gamma1, gamma2, scale1, scale2, shift1, shift2."""
        if self.crop_cond_scales is not None and crop_BC is not None:
            cond_BC = cond_BC + self.crop_cond_scales * crop_BC
        return self.ada_lin(cond_BC).view(-1, 6, self.width)

    def context_kv(self, context_BSD: Tensor) -> tuple[Tensor, Tensor]:
        return self.cross_attn.context_kv(norm_modulate(self.attention_y_norm, context_BSD))

    def forward(
        self,
        x_BlC: Tensor,
        ada_B6C: Tensor,
        cos_lc: Tensor,
        sin_lc: Tensor,
        ctx_k_BHSc: Tensor,
        ctx_v_BHSc: Tensor,
        self_mask: Tensor | RangeMask | None = None,
        cross_mask: Tensor | RangeMask | None = None,
        cache: SelfKVCache | None = None,
        offset: int = 0,
    ) -> Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_B6C.split(1, dim=1)  # each [B, 1, C]
        h = norm_modulate(self.self_attention_norm1, x_BlC, scale1, shift1)
        h = self.attn(h, cos_lc, sin_lc, self_mask, cache, offset)
        x_BlC, h = residual_norm(x_BlC, h, self.self_attention_norm2, gamma1, then=self.cross_attention_norm1)
        h = self.cross_attn(h, ctx_k_BHSc, ctx_v_BHSc, cross_mask)
        x_BlC, h = residual_norm(x_BlC, h, self.cross_attention_norm2, None, self.ffn_norm1, scale2, shift2)
        return residual_norm(x_BlC, self.ffn(h), self.ffn_norm2, gamma2)[0]

    def teacher_forward(
        self,
        x_BlC: Tensor,
        cond_BC: Tensor,
        crop_BC: Tensor | None,
        cos_lc: Tensor,
        sin_lc: Tensor,
        context_BSD: Tensor,
        self_mask: Tensor | RangeMask | None = None,
        cross_mask: Tensor | RangeMask | None = None,
    ) -> Tensor:
        """The block from the condition and the raw context: AdaLN vectors, context K/V, then ``forward``.

        Every use of the block's weights happens inside this one call, so gradient checkpointing can recompute
        the block as a unit and FSDP (which registers it as a forward method) gathers the weights once per pass.
        ``forward`` is called directly, not through the module's hooks.
        """
        k, v = self.context_kv(context_BSD)
        return self.forward(x_BlC, self.modulation(cond_BC, crop_BC), cos_lc, sin_lc, k, v, self_mask, cross_mask)


class AdaLNBeforeHead(nn.Module):
    """Non-affine LayerNorm modulated by the condition: LN(x) * (1 + scale) + shift."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.width, self.eps = width, eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def modulation(self, cond_BC: Tensor) -> Tensor:
        """[B, 2, C]: scale, shift."""
        return self.ada_lin(cond_BC).view(-1, 2, self.width)

    def forward(self, x_BlC: Tensor, ada_B2C: Tensor) -> Tensor:
        scale, shift = ada_B2C.split(1, dim=1)
        return layer_norm_no_affine(x_BlC, self.width, self.eps) * (1 + scale) + shift


class GaussianFourierFeatures(nn.Module):
    """sin/cos of 2*pi*w*x for fixed Gaussian frequencies w (stored so checkpoints carry them)."""

    def __init__(self, n_freqs: int, std: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_freqs) * std, requires_grad=False)

    def forward(self, x_BN: Tensor) -> Tensor:
        # x * w * 2 * pi in this order: Switti's (crop values in pixels reach angles of thousands of radians,
        # where the float32 rounding of another order would show)
        angles = x_BN.unsqueeze(-1) * self.weight * 2 * math.pi  # [B, N, F]
        return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)  # [B, N * 2F]


# ---- VAR's block ------------------------------------------------------------------------------------
class VARSelfAttention(nn.Module):
    """VAR's attention: ``mat_qkv`` without bias plus learned q and v biases (k has none); q and k L2-normalised
    per head, q multiplied by the learned per-head scale exp(min(scale_mul, log 100)); softmax scale 1."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), math.log(4.0)))
        self.max_scale_mul = math.log(100.0)
        self.proj = nn.Linear(width, width)

    def forward(
        self,
        x_BlC: Tensor,
        mask_ll: Tensor | RangeMask | None = None,
        cache: SelfKVCache | None = None,
        offset: int = 0,
    ) -> Tensor:
        B, l, C = x_BlC.shape
        H, c = self.heads, self.head_dim
        bias_3C = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv_3BHlc = F.linear(x_BlC, self.mat_qkv.weight, bias_3C).view(B, l, 3, H, c).permute(2, 0, 3, 1, 4)
        q, k, v = qkv_3BHlc.unbind(0)
        q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
        k = F.normalize(k, dim=-1)
        if cache is not None:
            k, v = cache.update(offset, k, v)
        o_BHlc = attention(q, k, v, mask_ll, 1.0)
        return self.proj(o_BHlc.transpose(1, 2).reshape(B, l, C))


class GeluMLP(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2, both biased."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VARBlock(nn.Module):
    """VAR's block: non-affine LayerNorm + AdaLN before self-attention and MLP, gated residuals, no cross-attention.

    x += SelfAttn(LN(x) * (1 + scale1) + shift1) * gamma1
    x += MLP(LN(x) * (1 + scale2) + shift2) * gamma2
    The AdaLN vectors come from the class embedding (the condition), once per scan.
    """

    def __init__(self, width: int, heads: int, ffn_dim: int, eps: float) -> None:
        super().__init__()
        self.width, self.eps = width, eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        self.attn = VARSelfAttention(width, heads)
        self.ffn = GeluMLP(width, ffn_dim)

    def modulation(self, cond_BC: Tensor, crop_BC: Tensor | None = None) -> Tensor:
        """AdaLN vectors [B, 6, C]: gamma1, gamma2, scale1, scale2, shift1, shift2 (``crop_BC`` is unused)."""
        return self.ada_lin(cond_BC).view(-1, 6, self.width)

    def forward(
        self,
        x_BlC: Tensor,
        ada_B6C: Tensor,
        cos_lc: Tensor | None = None,
        sin_lc: Tensor | None = None,
        ctx_k_BHSc: Tensor | None = None,
        ctx_v_BHSc: Tensor | None = None,
        self_mask: Tensor | RangeMask | None = None,
        cross_mask: Tensor | RangeMask | None = None,
        cache: SelfKVCache | None = None,
        offset: int = 0,
    ) -> Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_B6C.split(1, dim=1)  # each [B, 1, C]
        h = layer_norm_no_affine(x_BlC, self.width, self.eps) * (1 + scale1) + shift1
        x_BlC = x_BlC + self.attn(h, self_mask, cache, offset) * gamma1
        h = layer_norm_no_affine(x_BlC, self.width, self.eps) * (1 + scale2) + shift2
        return x_BlC + self.ffn(h) * gamma2

    def teacher_forward(
        self,
        x_BlC: Tensor,
        cond_BC: Tensor,
        crop_BC: Tensor | None = None,
        cos_lc: Tensor | None = None,
        sin_lc: Tensor | None = None,
        context_BSD: Tensor | None = None,
        self_mask: Tensor | RangeMask | None = None,
        cross_mask: Tensor | RangeMask | None = None,
    ) -> Tensor:
        """As ``SwittiBlock.teacher_forward`` (no context, no rotary tables)."""
        return self.forward(x_BlC, self.modulation(cond_BC, crop_BC), self_mask=self_mask)
