"""The eager PyTorch backend: the reference every other backend is compared against.

``dtype`` (optional) casts the encoder and generator, for an eager half-precision baseline on a GPU; the
VQ-VAE stays in float32 and the logits are returned in float32, as in the fast backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mindhier_rt.errors import InputError
from mindhier_rt.models.generator import ScanState
from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.runtime.base import DecodeBackend, ScaleUpdate


class TorchBackend(DecodeBackend):
    name = "torch"

    def __init__(
        self, models: MindHier, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        self.models = models.eval()
        self.cfg = models.cfg
        self.device = torch.device(device) if device is not None else next(models.generator.parameters()).device
        for m in models.modules().values():
            m.to(self.device)
        if dtype is not None:
            if models.encoder is not None:
                models.encoder.to(dtype=dtype)
            models.generator.to(dtype=dtype)
        self.dtype = next(models.generator.parameters()).dtype

    @torch.inference_mode()
    def encode(self, voxels_BV: Tensor, subject: str) -> tuple[Tensor, Tensor]:
        if self.models.encoder is None:
            raise InputError(f"model {self.cfg.name} has no fMRI encoder: it cannot decode voxels")
        out = self.models.encoder(voxels_BV.to(self.device, self.dtype), subject)
        return out.pooled_BD, out.context_BSD()

    @torch.inference_mode()
    def prepare(self, pooled_BD: Tensor, context_BSD: Tensor | None) -> ScanState:
        return self.models.generator.prepare(*cast_condition(pooled_BD, context_BSD, self.device, self.dtype))

    def select(self, state: ScanState, rows: slice) -> ScanState:
        state.select(rows)
        return state

    @torch.inference_mode()
    def step(self, i: int, state: ScanState, h_BlC: Tensor | None) -> Tensor:
        gen = self.models.generator
        return gen.step_embedded(i, state, gen.embed_scale(0, None, state.start_B1C) if i == 0 else h_BlC)

    def empty_fhat(self, batch: int) -> Tensor:
        return self.models.vqvae.empty_fhat(batch, self.device, torch.float32)

    @torch.inference_mode()
    def update(self, i: int, f_hat_BEhw: Tensor, idx_Bl: Tensor) -> ScaleUpdate:
        return ScaleUpdate(*update_and_embed(self.models, i, f_hat_BEhw, idx_Bl, self.dtype))

    @torch.inference_mode()
    def decode_image(self, f_hat_BEhw: Tensor) -> Tensor:
        return self.models.vqvae.fhat_to_img(f_hat_BEhw)


def cast_condition(
    cond: Tensor, context_BSD: Tensor | None, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor | None]:
    """The condition on the backend's device: float features in the model dtype, class labels kept int64."""
    cond = cond.to(device) if not cond.is_floating_point() else cond.to(device, dtype)
    return cond, None if context_BSD is None else context_BSD.to(device, dtype)


def update_and_embed(
    models: MindHier, i: int, f_hat_BEhw: Tensor, idx_Bl: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor | None]:
    """The VQ-VAE's update of f_hat by scale i's tokens and, but after the last scale, scale i + 1's input embedded
    by the generator in ``dtype`` (what the exported ``update_<i>`` graphs compute)."""
    f_hat_BEhw, x_next_BlE = models.vqvae.update_fhat(i, f_hat_BEhw, idx_Bl)
    if x_next_BlE is None:
        return f_hat_BEhw, None
    return f_hat_BEhw, models.generator.embed_scale(i + 1, x_next_BlE.to(dtype))
