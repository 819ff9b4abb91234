"""The decode contract every backend implements, so one loop (``mindhier_rt.pipeline``) drives them all.

``DecodeBackend`` is both the type the loop takes (a protocol: a proxy such as ``profile.TimedBackend`` that has
the members conforms) and the base class every backend subclasses, for the defaults it gives: the token choice
(``sampling.choose_tokens``), the voxel count of a subject (the model config's) and no host thread limit.

Tensors cross the contract as torch tensors on ``backend.device`` (a backend that computes with numpy,
ONNX Runtime or TensorRT wraps its buffers); the per-scan state is the backend's own object.
Shapes: B rows (scan x sample, doubled with guidance), D context width, S context tokens, l tokens of a scale,
C generator width, E VQ latent channels, V vocabulary, h = w = the finest grid side.

Scale i's step takes that scale's input tokens already embedded in the generator's width, h [B, n_i, C] (None
at i = 0: the start token comes from the state), and ``update`` returns the next scale's: word_embed of f_hat
area-downsampled to scale i + 1, plus that scale's level embedding (and its absolute positions for VAR blocks).
That is what the exported ``update_<i>`` graphs compute, so every backend hands the loop the same quantity (in
its own precision), and the loop only slices and stacks its rows.

The condition that ``prepare`` takes depends on ``cfg.generator.condition``: for fMRI models the pooled
feature and the context that ``encode`` returns; for class-conditional models (VAR) the class labels [B]
(int64; the null label ``num_classes`` for the unconditional rows) and no context. Such models have no
encoder: the decode loop (``pipeline.generate``) never calls ``encode`` for them. The loop checks voxels
against ``voxel_count`` once, before ``encode``; backends do not repeat the check.
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from mindhier_rt.config import ModelConfig
from mindhier_rt.errors import InputError
from mindhier_rt.sampling import SamplingConfig, choose_tokens


class ScaleUpdate(NamedTuple):
    """What ``update`` returns after scale i."""

    f_hat_BEhw: Tensor  # the accumulated latent [B, E, h, w]
    h_next_BlC: Tensor | None  # scale i + 1's embedded input [B, n_{i+1}, C]; None after the last scale


class DecodeBackend(Protocol):
    name: str
    cfg: ModelConfig
    device: torch.device
    # PyTorch threads for the loop's host work while this backend runs (None: leave PyTorch's setting alone)
    host_threads: int | None = None

    def voxel_count(self, subject: str) -> int:
        """Voxels per scan that ``encode`` takes for ``subject``; InputError / ConfigError for an unknown one."""
        if self.cfg.encoder is None:
            raise InputError(f"model {self.cfg.name} has no fMRI encoder: it cannot decode voxels")
        return self.cfg.encoder.voxel_count(subject)

    @abstractmethod
    def encode(self, voxels_BV: Tensor, subject: str) -> tuple[Tensor, Tensor]:
        """Voxels (already checked by the loop) -> (pooled_BD, deep-first context_BSD)."""

    @abstractmethod
    def prepare(self, pooled_BD: Tensor, context_BSD: Tensor | None) -> Any:
        """Context step, once per scan: condition, AdaLN vectors, cross-attention K/V, empty self cache.

        ``pooled_BD``: the pooled feature [B, D], or class labels [B] (int64) with ``context_BSD`` None.
        """

    @abstractmethod
    def select(self, state: Any, rows: slice) -> Any:
        """Keep only some rows of the state (guidance switched off: drop the unconditional half)."""

    @abstractmethod
    def step(self, i: int, state: Any, h_BlC: Tensor | None) -> Tensor:
        """Logits [B, n_i, V] (float32) of scale i from its embedded input (``update``'s; None at i = 0)."""

    def choose_tokens(
        self,
        logits_BlV: Tensor,
        scfg: SamplingConfig,
        scale: int,
        guidance: float | None,
        scan_ids: Tensor,
        sample_ids: Tensor,
    ) -> Tensor:
        """Scale ``scale``'s tokens [N, l] (int64): guidance combine + draw, ``sampling.choose_tokens``. A backend
        may run it its own way (the fast backend replays it as a CUDA graph) with the same results."""
        return choose_tokens(logits_BlV, scfg, scale, guidance, scan_ids, sample_ids)

    @abstractmethod
    def empty_fhat(self, batch: int) -> Tensor:
        """Zero accumulated latent [B, E, h, w]."""

    @abstractmethod
    def update(self, i: int, f_hat_BEhw: Tensor, idx_Bl: Tensor) -> ScaleUpdate:
        """Add scale i's tokens to f_hat; return it and scale i + 1's embedded input (None after the last)."""

    @abstractmethod
    def decode_image(self, f_hat_BEhw: Tensor) -> Tensor:
        """VQ-VAE decoder: images [B, 3, H, W] in [0, 1]."""


@contextlib.contextmanager
def host_threads(backend: DecodeBackend) -> Iterator[None]:
    """Run the loop's host work (PyTorch) on the backend's ``host_threads`` threads, where it sets them.

    A backend whose own thread pool runs on the CPU (ONNX Runtime's CPU provider) sets ``host_threads`` so
    that PyTorch's OpenMP workers, which busy-wait after each parallel region, leave the cores to it.
    The previous setting is restored on exit. ``torch.set_num_threads`` is process-wide: PyTorch work on
    other threads of the process runs with the limit too while a decode is in progress.
    """
    n = backend.host_threads
    before = torch.get_num_threads()
    if not n or n >= before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
