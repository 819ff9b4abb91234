"""Frozen teachers whose layers the encoder's levels are aligned to in stage 1.

A teacher gives, for images, the hidden states at the layers ``schedule.clip_layers`` (g_m) passed
through its post-LayerNorm and projection ([B, M, T, D]), and for captions a text embedding [B, t, D].
- ``RandomViTTeacher``: the demo's teacher, a frozen randomly initialised ViT with the same token
  layout as CLIP (1 class token + a square patch grid) and deterministic weights: needs no download.
  Deeper layers mix more patches, so its taps run from local to global like CLIP's.
- ``HashTextTeacher``: a frozen bag-of-words text embedding for the synthetic captions.
- The CLIP ViT-L/14 teacher for real data lives in ``clip_teacher`` (needs open_clip and local weights).
"""

from __future__ import annotations

import math
import zlib
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mindhier_rt.config import ModelConfig
from mindhier_rt.errors import ConfigError


class Teacher(Protocol):
    def image_levels(self, images_B3HW: Tensor) -> Tensor:
        """[B, M, T, D] features at the layers g_m, post-LN and projected (images in [0, 1])."""
        ...

    def text_tokens(self, captions: list[str]) -> Tensor:
        """[B, t, D] text embedding."""
        ...


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x_BTD: Tensor) -> Tensor:
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(self.norm1(x_BTD)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x_BTD = x_BTD + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D))
        return x_BTD + self.mlp(self.norm2(x_BTD))


class RandomViTTeacher(nn.Module):
    """Frozen random ViT: T = 1 + g*g tokens of width D, taps at ``cfg.schedule.clip_layers``."""

    def __init__(self, cfg: ModelConfig, seed: int = 0, heads: int = 4) -> None:
        super().__init__()
        grid = math.isqrt(cfg.context_tokens - 1)
        if grid * grid + 1 != cfg.context_tokens or cfg.image_size % grid:
            raise ConfigError(
                f"RandomViTTeacher needs context_tokens = 1 + g^2 with g dividing the image size; "
                f"got {cfg.context_tokens} tokens for {cfg.image_size} px"
            )
        D, self.taps = cfg.context_dim, cfg.schedule.clip_layers
        self.patch = cfg.image_size // grid
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.patch_embed = nn.Conv2d(3, D, self.patch, stride=self.patch)
            self.cls_pos = nn.Parameter(torch.randn(1, 1 + grid * grid, D) * 0.5)
            self.blocks = nn.ModuleList(_Block(D, heads) for _ in range(max(self.taps)))
            self.post_norm = nn.LayerNorm(D)
            self.proj = nn.Linear(D, D, bias=False)
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def image_levels(self, images_B3HW: Tensor) -> Tensor:
        x = self.patch_embed((images_B3HW - 0.5) / 0.25).flatten(2).transpose(1, 2)
        x = torch.cat([torch.zeros_like(x[:, :1]), x], dim=1) + self.cls_pos
        levels = []
        for depth, block in enumerate(self.blocks, start=1):
            x = block(x)
            if depth in self.taps:
                levels.append(self.proj(self.post_norm(x)))
        return torch.stack(levels, dim=1)


class HashTextTeacher(nn.Module):
    """Frozen bag-of-words text features: hashed word embeddings, padded to t tokens, mixed once."""

    def __init__(self, cfg: ModelConfig, seed: int = 0, table: int = 1024) -> None:
        super().__init__()
        self.tokens, self.table = cfg.encoder.text_tokens, table
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.embed = nn.Embedding(table + 1, cfg.context_dim)  # last row: padding
            self.mix = nn.Linear(cfg.context_dim, cfg.context_dim)
        self.requires_grad_(False).eval()

    def _ids(self, caption: str) -> list[int]:
        words = [w for w in caption.lower().split() if w not in {"a", "an", "the", "on", "of", "with"}]
        ids = [zlib.crc32(w.encode()) % self.table for w in words][: self.tokens]
        return ids + [self.table] * (self.tokens - len(ids))

    @torch.no_grad()
    def text_tokens(self, captions: list[str]) -> Tensor:
        ids = torch.tensor([self._ids(c) for c in captions], device=self.embed.weight.device)
        e_BtD = self.embed(ids)
        return F.layer_norm(e_BtD + self.mix(e_BtD.mean(1, keepdim=True)), e_BtD.shape[-1:])
