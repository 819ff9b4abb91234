"""VAR-compatible multi-scale residual VQ-VAE.

Axis letters: B batch, E latent channels (Cvae), h/w latent grid sides (n = schedule.last_side at the
finest scale), H/W image sides, l tokens of one scale (pn_i ** 2), L all tokens of the pyramid, V vocab.

Layout follows VAR's ``vae_ch160v4096z32`` (module names match VAR's so its checkpoints map 1:1):
``encoder`` -> ``quant_conv`` -> ``quantize`` (``embedding`` + ``quant_resi.qresi_ls``) ->
``post_quant_conv`` -> ``decoder``.

Quantisation recipe. The encoder turns an image (mapped from [0, 1] to [-1, 1]) into a latent ``f`` of
side n. Scales i = 0..K-1 with grid sides pn_i (``cfg.schedule.patch_nums``) are quantised coarse to
fine on the residual: start with ``f_rest = f`` and ``f_hat = 0``; at scale i, area-downsample
``f_rest`` to pn_i x pn_i (not at the last scale, where pn = n), pick each position's nearest codebook
entry by L2 distance, look the codes up, bicubic-upsample them back to n x n (not at the last scale),
pass them through the shared convolution ``Phi_{phi_index[i]}`` (``Phi(h) = (1 - r) h + r conv(h)``),
then ``f_hat += h`` and ``f_rest -= h``. The decoder turns ``f_hat`` back into an image. Every area
downsample and bicubic upsample goes through the fixed matrices of ``resample.py``, the same mechanism
the exported graphs use.

Generator interface: decoding adds one scale at a time with ``update_fhat``, which also returns the
generator's input for the next scale (``f_hat`` area-downsampled to pn_{i+1}, flattened row-major);
``teacher_inputs`` returns all of those inputs at once for teacher forcing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mindhier_rt.config import ModelConfig
from mindhier_rt.errors import ConfigError, InputError
from mindhier_rt.models.resample import area_matrix, bicubic_matrix, resize_area, resize_bicubic

__all__ = ["AttnBlock", "Decoder", "Encoder", "MultiScaleVQVAE", "Phi", "ResnetBlock", "VQOutput"]

_NORM_EPS = 1e-6


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=_NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3-GroupNorm-SiLU-conv3x3 plus a 1x1 ``nin_shortcut`` when widths differ."""

    def __init__(self, in_ch: int, out_ch: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut: nn.Module = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x_BChw: Tensor) -> Tensor:
        h_BChw = self.conv1(F.silu(self.norm1(x_BChw)))
        h_BChw = self.conv2(F.silu(self.norm2(h_BChw)))
        return self.nin_shortcut(x_BChw) + h_BChw


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions (1x1 ``qkv`` and ``proj_out``), residual."""

    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(ch, groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)
        self.scale = ch**-0.5

    def forward(self, x_BChw: Tensor) -> Tensor:
        b, c, h, w = x_BChw.shape
        qkv_B3CN = self.qkv(self.norm(x_BChw)).reshape(b, 3, c, h * w)
        q_BCN, k_BCN, v_BCN = qkv_B3CN.unbind(1)
        attn_BNN = torch.softmax(torch.bmm(q_BCN.transpose(1, 2), k_BCN) * self.scale, dim=-1)
        out_BCN = torch.bmm(v_BCN, attn_BNN.transpose(1, 2))
        return x_BChw + self.proj_out(out_BCN.reshape(b, c, h, w))


class Downsample(nn.Module):
    """Pad right/bottom by one, then a 3x3 stride-2 conv: halves the side."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x_BChw: Tensor) -> Tensor:
        return self.conv(F.pad(x_BChw, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x_BChw: Tensor) -> Tensor:
        return self.conv(F.interpolate(x_BChw, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: res blocks, optional attention after each, optional resampler."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], resampler: nn.Module | None, name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        if resampler is not None:
            self.add_module(name, resampler)
        self._resampler_name = name if resampler is not None else None

    def forward(self, h_BChw: Tensor) -> Tensor:
        for j, block in enumerate(self.block):
            h_BChw = block(h_BChw)
            if len(self.attn):
                h_BChw = self.attn[j](h_BChw)
        if self._resampler_name is not None:
            h_BChw = getattr(self, self._resampler_name)(h_BChw)
        return h_BChw


class _Mid(nn.Module):
    """ResnetBlock, AttnBlock, ResnetBlock at the lowest resolution."""

    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups)
        self.attn_1 = AttnBlock(ch, groups)
        self.block_2 = ResnetBlock(ch, ch, groups)

    def forward(self, h_BChw: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h_BChw)))


class Encoder(nn.Module):
    """Image in [-1, 1] ``[B, 3, H, W]`` -> latent ``[B, E, H/2^(levels-1), W/2^(levels-1)]``."""

    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int, groups: int) -> None:
        super().__init__()
        n_levels = len(ch_mult)
        in_ch_mult = (1, *ch_mult)
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i in range(n_levels):
            block_in, block_out = ch * in_ch_mult[i], ch * ch_mult[i]
            blocks: list[nn.Module] = []
            attns: list[nn.Module] = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, groups))
                block_in = block_out
                if i == n_levels - 1:
                    attns.append(AttnBlock(block_in, groups))
            down = Downsample(block_in) if i != n_levels - 1 else None
            self.down.append(_Level(blocks, attns, down, "downsample"))
        self.mid = _Mid(block_in, groups)
        self.norm_out = _norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, padding=1)

    def forward(self, x_B3HW: Tensor) -> Tensor:
        h_BChw = self.conv_in(x_B3HW)
        for level in self.down:
            h_BChw = level(h_BChw)
        h_BChw = self.mid(h_BChw)
        return self.conv_out(F.silu(self.norm_out(h_BChw)))


class Decoder(nn.Module):
    """Latent ``[B, E, h, w]`` -> image in (roughly) [-1, 1] ``[B, 3, h*2^(levels-1), w*2^(levels-1)]``."""

    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int, groups: int) -> None:
        super().__init__()
        n_levels = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, groups)
        levels: list[nn.Module] = []
        for i in reversed(range(n_levels)):
            block_out = ch * ch_mult[i]
            blocks: list[nn.Module] = []
            attns: list[nn.Module] = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, groups))
                block_in = block_out
                if i == n_levels - 1:
                    attns.append(AttnBlock(block_in, groups))
            up = Upsample(block_in) if i != 0 else None
            levels.insert(0, _Level(blocks, attns, up, "upsample"))
        self.up = nn.ModuleList(levels)  # up[i] is level i; run from the last (lowest resolution) to 0
        self.norm_out = _norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z_BEhw: Tensor) -> Tensor:
        h_BChw = self.mid(self.conv_in(z_BEhw))
        for level in reversed(self.up):
            h_BChw = level(h_BChw)
        return self.conv_out(F.silu(self.norm_out(h_BChw)))


class Phi(nn.Conv2d):
    """Shared residual conv ``Phi(h) = (1 - r) h + r conv3x3(h)``.

    A ``Conv2d`` subclass (its own ``weight``/``bias``), so parameter names match VAR's
    ``quantize.quant_resi.qresi_ls.{j}.weight``.
    """

    def __init__(self, e: int, ratio: float) -> None:
        super().__init__(e, e, kernel_size=3, padding=1, bias=True)
        self.ratio = float(ratio)

    def forward(self, h_BEhw: Tensor) -> Tensor:
        return h_BEhw * (1.0 - self.ratio) + super().forward(h_BEhw) * self.ratio


class PhiShared(nn.Module):
    """The ``phi_count`` shared Phi convs; scale i uses ``qresi_ls[schedule.phi_index[i]]``."""

    def __init__(self, e: int, count: int, ratio: float) -> None:
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(e, ratio) for _ in range(count))


class VectorQuantizer(nn.Module):
    """Codebook ``embedding [V, E]`` plus the shared Phi convs (``quant_resi``)."""

    def __init__(self, vocab: int, e: int, phi_count: int, phi_ratio: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, e)
        self.quant_resi = PhiShared(e, phi_count, phi_ratio)


@dataclass
class VQOutput:
    """Training output of ``MultiScaleVQVAE.forward``.

    recon: ``[B, 3, H, W]`` on the [0, 1] scale, NOT clamped (so its gradient survives; ``fhat_to_img``
    clamps). vq_loss = codebook_loss + beta * commit_loss. idx: per-scale tokens ``[B, pn_i ** 2]``.
    rests: per-scale quantiser inputs ``[B * pn_i ** 2, E]`` (detached), for codebook restarts in training.
    """

    recon: Tensor
    vq_loss: Tensor
    codebook_loss: Tensor
    commit_loss: Tensor
    idx: list[Tensor]
    rests: list[Tensor]


class MultiScaleVQVAE(nn.Module):
    """VAR-style multi-scale residual VQ-VAE; images are float ``[B, 3, H, W]`` in [0, 1] at every method."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        vq = cfg.vqvae
        self.cfg = cfg
        self.schedule = cfg.schedule
        self.latent_dim = cfg.latent_dim
        self.vocab_size = cfg.vocab_size
        self.image_size = cfg.image_size
        self.beta = float(vq.beta)
        widths = {vq.ch * m for m in (1, *vq.ch_mult)}
        bad = sorted(c for c in widths if c % vq.norm_groups)
        if bad:
            raise ConfigError(f"VQ-VAE widths {bad} are not divisible by norm_groups {vq.norm_groups}")
        if cfg.latent_dim < 1 or cfg.vocab_size < 1:
            raise ConfigError(f"latent_dim and vocab_size must be >= 1, got {cfg.latent_dim}, {cfg.vocab_size}")

        e = cfg.latent_dim
        self.encoder = Encoder(vq.ch, vq.ch_mult, vq.num_res_blocks, e, vq.norm_groups)
        self.quant_conv = nn.Conv2d(e, e, 3, padding=1)
        self.quantize = VectorQuantizer(cfg.vocab_size, e, self.schedule.phi_count, vq.phi_ratio)
        self.post_quant_conv = nn.Conv2d(e, e, 3, padding=1)
        self.decoder = Decoder(vq.ch, vq.ch_mult, vq.num_res_blocks, e, vq.norm_groups)

        # Build the resampling matrices now (explicitly on the CPU, so also under a meta-device
        # context), never for the first time inside a tracer.
        n = self.schedule.last_side
        for pn in self.schedule.patch_nums[:-1]:
            for dt in (torch.float32, torch.float64):
                area_matrix(n, pn, dt)
                bicubic_matrix(pn, n, dt)

    # ---- helpers --------------------------------------------------------------------------------
    def _check_img(self, img_B3HW: Tensor) -> None:
        s = self.image_size
        if img_B3HW.ndim != 4 or img_B3HW.shape[1] != 3 or tuple(img_B3HW.shape[2:]) != (s, s):
            raise InputError(f"expected images [B, 3, {s}, {s}] in [0, 1], got shape {tuple(img_B3HW.shape)}")
        if not img_B3HW.is_floating_point():
            raise InputError(f"expected float images in [0, 1], got dtype {img_B3HW.dtype}")

    def _check_scale(self, i: int, idx_Bl: Tensor) -> None:
        k = self.schedule.n_scales
        if not 0 <= i < k:
            raise InputError(f"scale index must be in 0..{k - 1}, got {i}")
        want = self.schedule.token_counts[i]
        if idx_Bl.ndim != 2 or idx_Bl.shape[1] != want:
            raise InputError(f"scale {i} expects tokens [B, {want}], got shape {tuple(idx_Bl.shape)}")

    def _check_idx_list(self, idx_list: list[Tensor]) -> None:
        k = self.schedule.n_scales
        if len(idx_list) != k:
            raise InputError(f"expected {k} token tensors (one per scale), got {len(idx_list)}")
        for i, idx_Bl in enumerate(idx_list):
            self._check_scale(i, idx_Bl)

    def _nearest(self, rest_BEhw: Tensor) -> Tensor:
        """Index of the nearest codebook entry (L2) at every position, ``[B, h*w]`` row-major."""
        b, e, h, w = rest_BEhw.shape
        rest_NE = rest_BEhw.detach().permute(0, 2, 3, 1).reshape(-1, e).float()
        book_VE = self.quantize.embedding.weight.detach().float()
        dev = rest_NE.device.type
        no_autocast = (
            torch.autocast(device_type=dev, enabled=False)
            if torch.is_autocast_enabled(dev)
            else contextlib.nullcontext()
        )
        with no_autocast:
            dist_NV = (
                rest_NE.square().sum(1, keepdim=True) + book_VE.square().sum(1)[None, :] - 2.0 * rest_NE @ book_VE.t()
            )
        return dist_NV.argmin(dim=1).reshape(b, h * w)

    def _scale_contribution(self, i: int, idx_Bl: Tensor) -> Tensor:
        """Phi(upsample(codes)) of scale i: ``[B, E, n, n]``."""
        pn, n = self.schedule.patch_nums[i], self.schedule.last_side
        b = idx_Bl.shape[0]
        h_BEhw = self.quantize.embedding(idx_Bl).transpose(1, 2).reshape(b, self.latent_dim, pn, pn)
        if i != self.schedule.n_scales - 1:
            h_BEhw = resize_bicubic(h_BEhw, n)
        return self.quantize.quant_resi.qresi_ls[self.schedule.phi_index[i]](h_BEhw)

    def _quantize(self, f_BEhw: Tensor, rests: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        """Residual quantisation of ``f``: returns ``f_hat`` (grad flows to codebook and Phi) and tokens.

        If ``rests`` is a list, each scale's quantiser input ``[B * pn^2, E]`` is appended to it.
        """
        sched = self.schedule
        f_rest_BEhw = f_BEhw.detach()
        f_hat_BEhw = torch.zeros_like(f_rest_BEhw)
        idx_list: list[Tensor] = []
        for i, pn in enumerate(sched.patch_nums):
            rest_BEhw = resize_area(f_rest_BEhw, pn) if i != sched.n_scales - 1 else f_rest_BEhw
            idx_Bl = self._nearest(rest_BEhw)
            if rests is not None:
                rests.append(rest_BEhw.detach().permute(0, 2, 3, 1).reshape(-1, self.latent_dim))
            h_BEhw = self._scale_contribution(i, idx_Bl)
            f_hat_BEhw = f_hat_BEhw + h_BEhw
            f_rest_BEhw = f_rest_BEhw - h_BEhw.detach()
            idx_list.append(idx_Bl)
        return f_hat_BEhw, idx_list

    # ---- public API -------------------------------------------------------------------------------
    def empty_fhat(
        self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Tensor:
        """Zeros ``[B, E, n, n]``: the starting ``f_hat`` of ``update_fhat`` (defaults: the weights' device/dtype)."""
        w = self.quantize.embedding.weight
        n = self.schedule.last_side
        return torch.zeros(batch, self.latent_dim, n, n, device=device or w.device, dtype=dtype or w.dtype)

    def encode_latent(self, img_B3HW: Tensor) -> Tensor:
        """``quant_conv(encoder(2 img - 1))``: the continuous latent ``f [B, E, n, n]``."""
        self._check_img(img_B3HW)
        return self.quant_conv(self.encoder(img_B3HW * 2.0 - 1.0))

    @torch.no_grad()
    def img_to_idx(self, img_B3HW: Tensor) -> list[Tensor]:
        """Tokens of every scale: ``[B, pn_i ** 2]`` int64, row-major over the pn_i x pn_i grid."""
        _, idx_list = self._quantize(self.encode_latent(img_B3HW))
        return idx_list

    def idx_to_fhat(self, idx_list: list[Tensor]) -> Tensor:
        """``f_hat [B, E, n, n]`` from the tokens of all scales (the sum of every scale's contribution)."""
        self._check_idx_list(idx_list)
        f_hat_BEhw = self._scale_contribution(0, idx_list[0])
        for i in range(1, len(idx_list)):
            f_hat_BEhw = f_hat_BEhw + self._scale_contribution(i, idx_list[i])
        return f_hat_BEhw

    def update_fhat(self, i: int, f_hat_BEhw: Tensor, idx_Bl: Tensor) -> tuple[Tensor, Tensor | None]:
        """Add scale i's tokens to ``f_hat``; also return the generator input of scale i + 1.

        Returns ``(f_hat [B, E, n, n], next_x [B, pn_{i+1} ** 2, E])``, with ``next_x`` = ``f_hat``
        area-downsampled to pn_{i+1} and flattened row-major; ``None`` after the last scale.
        """
        self._check_scale(i, idx_Bl)
        f_hat_BEhw = f_hat_BEhw + self._scale_contribution(i, idx_Bl)
        if i == self.schedule.n_scales - 1:
            return f_hat_BEhw, None
        next_BEhw = resize_area(f_hat_BEhw, self.schedule.patch_nums[i + 1])
        return f_hat_BEhw, next_BEhw.flatten(2).transpose(1, 2)

    def teacher_inputs(self, idx_list: list[Tensor]) -> Tensor:
        """Generator inputs of scales 1..K-1 concatenated: ``[B, L - 1, E]`` (what ``update_fhat`` returns)."""
        self._check_idx_list(idx_list)
        w = self.quantize.embedding.weight
        f_hat_BEhw = self.empty_fhat(idx_list[0].shape[0], device=w.device, dtype=w.dtype)
        xs: list[Tensor] = []
        for i, idx_Bl in enumerate(idx_list):
            f_hat_BEhw, next_BlE = self.update_fhat(i, f_hat_BEhw, idx_Bl)
            if next_BlE is not None:
                xs.append(next_BlE)
        return torch.cat(xs, dim=1)

    def fhat_to_img(self, f_hat_BEhw: Tensor) -> Tensor:
        """Decoded image ``[B, 3, H, W]`` in [0, 1]: ``(decoder(post_quant_conv(f_hat)).clamp(-1, 1) + 1) / 2``."""
        n = self.schedule.last_side
        if f_hat_BEhw.ndim != 4 or tuple(f_hat_BEhw.shape[1:]) != (self.latent_dim, n, n):
            raise InputError(f"expected f_hat [B, {self.latent_dim}, {n}, {n}], got shape {tuple(f_hat_BEhw.shape)}")
        img_B3HW = self.decoder(self.post_quant_conv(f_hat_BEhw))
        return (img_B3HW.clamp(-1.0, 1.0) + 1.0) * 0.5

    def forward(self, img_B3HW: Tensor) -> VQOutput:
        """Training pass with the straight-through estimator.

        ``f = encode_latent(img)``; ``f_hat`` = residual quantisation of ``f``;
        ``codebook_loss = mse(f_hat, f.detach())`` (trains codebook and Phi);
        ``commit_loss = mse(f_hat.detach(), f)`` (trains the encoder);
        ``vq_loss = codebook_loss + beta * commit_loss`` with ``beta = cfg.vqvae.beta``;
        the decoder sees ``f + (f_hat - f).detach()`` and ``recon = (decoder(...) + 1) / 2`` (unclamped).
        """
        f_BEhw = self.encode_latent(img_B3HW)
        rests: list[Tensor] = []
        f_hat_BEhw, idx_list = self._quantize(f_BEhw, rests)
        codebook_loss = F.mse_loss(f_hat_BEhw, f_BEhw.detach())
        commit_loss = F.mse_loss(f_hat_BEhw.detach(), f_BEhw)
        f_st_BEhw = f_BEhw + (f_hat_BEhw - f_BEhw).detach()
        recon_B3HW = (self.decoder(self.post_quant_conv(f_st_BEhw)) + 1.0) * 0.5
        return VQOutput(
            recon=recon_B3HW,
            vq_loss=codebook_loss + self.beta * commit_loss,
            codebook_loss=codebook_loss,
            commit_loss=commit_loss,
            idx=idx_list,
            rests=rests,
        )
