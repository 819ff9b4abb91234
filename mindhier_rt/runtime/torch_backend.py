"""The eager PyTorch backend: the reference every other backend is compared against.

``dtype`` (optional) casts the encoder and generator, for an eager half-precision baseline on a GPU; the
VQ-VAE stays in float32 and the logits are returned in float32, as in the fast backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mindhier_rt.models.generator import ScanState
from mindhier_rt.models.mindhier import MindHier


class TorchBackend:
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
            models.encoder.to(dtype=dtype)
            models.generator.to(dtype=dtype)
        self.dtype = next(models.generator.parameters()).dtype

    @torch.inference_mode()
    def encode(self, voxels_BV: Tensor, subject: str) -> tuple[Tensor, Tensor]:
        out = self.models.encoder(voxels_BV.to(self.device, self.dtype), subject)
        return out.pooled_BD, out.context_BSD()

    @torch.inference_mode()
    def prepare(self, pooled_BD: Tensor, context_BSD: Tensor) -> ScanState:
        return self.models.generator.prepare(pooled_BD.to(self.dtype), context_BSD.to(self.dtype))

    def select(self, state: ScanState, rows: slice) -> ScanState:
        state.select(rows)
        return state

    @torch.inference_mode()
    def step(self, i: int, state: ScanState, x_BlE: Tensor | None) -> Tensor:
        return self.models.generator.step(i, state, None if x_BlE is None else x_BlE.to(self.dtype))

    def empty_fhat(self, batch: int) -> Tensor:
        return self.models.vqvae.empty_fhat(batch, self.device, torch.float32)

    @torch.inference_mode()
    def update(self, i: int, f_hat_BEhw: Tensor, idx_Bl: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.models.vqvae.update_fhat(i, f_hat_BEhw, idx_Bl)

    @torch.inference_mode()
    def decode_image(self, f_hat_BEhw: Tensor) -> Tensor:
        return self.models.vqvae.fhat_to_img(f_hat_BEhw)
