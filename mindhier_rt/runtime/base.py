"""The decode contract every backend implements, so one loop (``mindhier_rt.pipeline``) drives them all.

Tensors cross the contract as torch tensors on ``backend.device`` (a backend that computes with numpy,
ONNX Runtime or TensorRT wraps its buffers); the per-scan state is the backend's own object.
Shapes: B rows (scan x sample, doubled with guidance), D context width, S context tokens,
l tokens of scale i, E VQ latent channels, V vocabulary, h = w = the finest grid side.

The condition that ``prepare`` takes depends on ``cfg.generator.condition``: for fMRI models the pooled
feature and the context that ``encode`` returns; for class-conditional models (VAR) the class labels [B]
(int64; the null label ``num_classes`` for the unconditional rows) and no context. Such models have no
encoder: the decode loop (``pipeline.generate``) never calls ``encode`` for them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import Tensor

from mindhier_rt.config import ModelConfig


class DecodeBackend(Protocol):
    name: str
    cfg: ModelConfig
    device: torch.device

    def encode(self, voxels_BV: Tensor, subject: str) -> tuple[Tensor, Tensor]:
        """Voxels -> (pooled_BD, deep-first context_BSD)."""
        ...

    def prepare(self, pooled_BD: Tensor, context_BSD: Tensor | None) -> Any:
        """Context step, once per scan: condition, AdaLN vectors, cross-attention K/V, empty self cache.

        ``pooled_BD``: the pooled feature [B, D], or class labels [B] (int64) with ``context_BSD`` None.
        """
        ...

    def select(self, state: Any, rows: slice) -> Any:
        """Keep only some rows of the state (guidance switched off: drop the unconditional half)."""
        ...

    def step(self, i: int, state: Any, x_BlE: Tensor | None) -> Tensor:
        """Logits [B, n_i, V] (float32) of scale i."""
        ...

    def empty_fhat(self, batch: int) -> Tensor:
        """Zero accumulated latent [B, E, h, w]."""
        ...

    def update(self, i: int, f_hat_BEhw: Tensor, idx_Bl: Tensor) -> tuple[Tensor, Tensor | None]:
        """Add scale i's tokens to f_hat; return it and the next scale's input [B, n_{i+1}, E] (None at the end)."""
        ...

    def decode_image(self, f_hat_BEhw: Tensor) -> Tensor:
        """VQ-VAE decoder: images [B, 3, H, W] in [0, 1]."""
        ...


@contextlib.contextmanager
def host_threads(backend: object) -> Iterator[None]:
    """Run the loop's host work (PyTorch) on the backend's ``host_threads`` threads, where it sets them.

    A backend whose own thread pool runs on the CPU (ONNX Runtime's CPU provider) sets ``host_threads`` so
    that PyTorch's OpenMP workers, which busy-wait after each parallel region, leave the cores to it.
    The previous setting is restored on exit. ``torch.set_num_threads`` is process-wide: PyTorch work on
    other threads of the process runs with the limit too while a decode is in progress.
    """
    n = getattr(backend, "host_threads", None)
    before = torch.get_num_threads()
    if not n or n >= before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
