"""The CLIP ViT-L/14 teacher for real data, through open_clip, with weights from a local file only.

Image targets: the hidden state after residual block g_m (1-indexed, ``schedule.clip_layers``, e.g. 12,
16, 20, 24), passed through the vision tower's post-LayerNorm and projection: [B, M, 257, 768]. The last
tap of ViT-L/14 (layer 24) is the final projected state whose class token is CLIP's image embedding.
Text target: the text tower's last hidden state after its final LayerNorm: [B, 77, 768].
Nothing is downloaded: ``weights`` must name a local open_clip / OpenAI checkpoint file.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mindhier_rt.errors import BackendError, ConfigError, InputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _open_clip():
    try:
        import open_clip
    except ImportError as e:
        raise BackendError("the CLIP teacher needs open_clip: pip install 'mindhier-rt[train]'") from e
    return open_clip


class ClipTeacher(nn.Module):
    """Frozen CLIP ViT-L/14 with layer taps; see the module docstring for what each output is."""

    def __init__(
        self,
        layers: tuple[int, ...],
        weights: str | Path | None,
        model_name: str = "ViT-L-14",
        allow_random: bool = False,
    ) -> None:
        super().__init__()
        open_clip = _open_clip()
        if weights is None and not allow_random:
            raise ConfigError("the CLIP teacher needs --clip-weights FILE (a local checkpoint; nothing is downloaded)")
        if weights is not None and not Path(weights).is_file():
            raise InputError(f"CLIP weights file {weights} does not exist")
        self.model = open_clip.create_model(model_name, pretrained=None if weights is None else str(weights))
        self.tokenizer = open_clip.get_tokenizer(model_name)
        depth = len(self.model.visual.transformer.resblocks)
        if not layers or max(layers) > depth or min(layers) < 1:
            raise ConfigError(f"CLIP layer taps must be in 1..{depth}, got {tuple(layers)}")
        self.layers = tuple(layers)
        self.image_size = self.model.visual.image_size
        self.image_size = self.image_size[0] if isinstance(self.image_size, tuple) else self.image_size
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def image_levels(self, images_B3HW: Tensor) -> Tensor:
        """[B, M, T, D] taps for images in [0, 1] (resized bicubically to the tower's input size)."""
        v = self.model.visual
        x = F.interpolate(images_B3HW.float(), size=(self.image_size, self.image_size), mode="bicubic")
        x = (x.clamp(0, 1) - self.mean) / self.std
        x = v.conv1(x).flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = v.ln_pre(torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype))
        if not v.transformer.batch_first:
            x = x.transpose(0, 1)
        taps = []
        for depth, block in enumerate(v.transformer.resblocks, start=1):
            x = block(x)
            if depth in self.layers:
                h = x if v.transformer.batch_first else x.transpose(0, 1)
                taps.append(v.ln_post(h) @ v.proj)
            if depth == max(self.layers):
                break
        return torch.stack(taps, dim=1)

    @torch.no_grad()
    def text_tokens(self, captions: list[str]) -> Tensor:
        """[B, 77, D]: the text tower's last hidden state after ln_final."""
        m = self.model
        ids = self.tokenizer(captions).to(m.token_embedding.weight.device)
        x = m.token_embedding(ids) + m.positional_embedding
        if not m.transformer.batch_first:
            x = x.transpose(0, 1)
        x = m.transformer(x, attn_mask=m.attn_mask)
        if not m.transformer.batch_first:
            x = x.transpose(0, 1)
        return m.ln_final(x)
