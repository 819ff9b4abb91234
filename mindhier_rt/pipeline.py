"""The decode loop: voxels -> token pyramid -> image, the same for every backend.

    encode(voxels) and encode(zeros)        -> pooled, deep-first context (conditional rows, then null rows)
    prepare(...)                            -> per-scan state (context K/V cache, AdaLN vectors, self cache)
    for scale i in 0..K-1:
        [guidance switched off at i: keep only the conditional rows]
        logits = step(i, state, x_i)        -> combine cond/uncond with weight t_i = cfg * i / (K - 1)
        idx_i  = sample_tokens(logits, seed, scan, sample, i)
        f_hat, x_{i+1} = update(i, f_hat, idx_i)
    image = decode_image(f_hat)

Rows are (scan, sample) pairs; their random streams are keyed by the caller's scan ids, so the tokens of
a scan do not depend on which other scans share its batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mindhier_rt.runtime.base import DecodeBackend
from mindhier_rt.sampling import SamplingConfig, cfg_combine, guidance_active, guidance_weight, sample_tokens

log = logging.getLogger(__name__)


@dataclass
class Reconstruction:
    images_NS3HW: Tensor  # [scans, samples, 3, H, W] in [0, 1], on the CPU
    tokens: list[Tensor]  # per scale [scans, samples, n_i] (long, CPU)


def reconstruct(
    backend: DecodeBackend,
    voxels_NV: Tensor,
    subject: str,
    sampling: SamplingConfig,
    samples: int = 1,
    scan_ids: Tensor | None = None,
    on_scale: Callable[[int], None] | None = None,
) -> Reconstruction:
    """Decode a batch of scans (all of one subject) with ``samples`` draws each."""
    sched = backend.cfg.schedule
    N, dev = voxels_NV.shape[0], backend.device
    scan_ids = torch.arange(N) if scan_ids is None else scan_ids.to(torch.long).cpu()
    R = N * samples  # conditional rows, scan-major
    row_scan = scan_ids.repeat_interleave(samples).to(dev)
    row_sample = torch.arange(samples).repeat(N).to(dev)

    pooled_ND, context_NSD = backend.encode(voxels_NV.to(dev, torch.float32), subject)
    pooled_RD = pooled_ND.repeat_interleave(samples, dim=0)
    context_RSD = context_NSD.repeat_interleave(samples, dim=0)
    guided = guidance_active(sampling, 0)
    if guided:
        null_pooled, null_context = backend.encode(
            torch.zeros_like(voxels_NV[:1], device=dev, dtype=torch.float32), subject
        )
        pooled_RD = torch.cat([pooled_RD, null_pooled.expand(R, -1)])
        context_RSD = torch.cat([context_RSD, null_context.expand(R, -1, -1)])
    state = backend.prepare(pooled_RD, context_RSD)

    f_hat = backend.empty_fhat(R)
    x_BlE: Tensor | None = None
    tokens = []
    for i in range(sched.n_scales):
        if guided and not guidance_active(sampling, i):
            state = backend.select(state, slice(0, R))
            x_BlE = None if x_BlE is None else x_BlE[:R]
            guided = False
        logits_BlV = backend.step(i, state, x_BlE)
        if guided:
            logits_BlV = cfg_combine(logits_BlV[:R], logits_BlV[R:], guidance_weight(sampling, i, sched.n_scales))
        idx_Rl = sample_tokens(logits_BlV, sampling, i, row_scan, row_sample)
        f_hat, x_next = backend.update(i, f_hat, idx_Rl)
        if x_next is not None and guided:
            x_next = torch.cat([x_next, x_next])
        x_BlE = x_next
        tokens.append(idx_Rl.view(N, samples, -1).cpu())
        if on_scale is not None:
            on_scale(i)
    images = backend.decode_image(f_hat).float().cpu()
    return Reconstruction(images_NS3HW=images.view(N, samples, *images.shape[1:]), tokens=tokens)
