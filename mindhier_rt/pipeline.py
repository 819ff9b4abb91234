"""The decode loop: voxels (or class labels) -> token pyramid -> image, the same for every backend.

    encode(voxels) and encode(zeros)        -> pooled, deep-first context (conditional rows, then null rows)
      [class-conditional models: the labels and the null label num_classes instead, no context]
    prepare(...)                            -> per-scan state (context K/V cache, AdaLN vectors, self cache)
    for scale i in 0..K-1:
        [guidance switched off at i: keep only the conditional rows]
        logits = step(i, state, h_i)        -> combine cond/uncond with weight t_i = cfg * i / (K - 1)
        idx_i  = choose_tokens(logits, ...)  -> the guidance combine and the seeded draw
        f_hat, h_{i+1} = update(i, f_hat, idx_i)   (h: the next scale's embedded input tokens)
    image = decode_image(f_hat)

Rows are (scan, sample) pairs; their random streams are keyed by the caller's scan ids, so the tokens of
a scan do not depend on which other scans share its batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from torch import Tensor

from mindhier_rt.errors import InputError
from mindhier_rt.runtime.base import DecodeBackend, host_threads
from mindhier_rt.sampling import SamplingConfig, guidance_active, guidance_weight
from mindhier_rt.voxels import check_voxels

log = logging.getLogger(__name__)


# (scales after which to decode a preview, callback(scale, images [N, S, 3, H, W] on the CPU))
Preview = tuple[Collection[int], Callable[[int, Tensor], None]]


@dataclass
class Reconstruction:
    images_NS3HW: Tensor  # [scans, samples, 3, H, W] in [0, 1], on the CPU
    tokens: list[Tensor]  # per scale [scans, samples, n_i] (long, CPU)
    pooled_ND: Tensor | None = None  # the encoder's pooled output per scan (the brain-predicted CLIP embedding)


@dataclass(frozen=True)
class Pass:
    """One forward pass of a batch job: ``scans`` (positions in the job's scan list) x ``samples``."""

    scans: range
    samples: range


def decode_passes(n_scans: int, samples: int, batch: int) -> list[Pass]:
    """Split ``n_scans`` x ``samples`` rows into passes of at most ``batch`` rows (a row is a (scan, sample)
    pair): whole scans, ``batch // samples`` at a time, while a scan's samples fit in a pass; otherwise one scan
    per pass with its samples in chunks of ``batch``. Memory then grows with ``batch``, never with the job."""
    if batch < 1 or samples < 1 or n_scans < 0:
        raise InputError(f"expected batch >= 1, samples >= 1 and scans >= 0, got {batch}, {samples}, {n_scans}")
    if samples <= batch:
        per = batch // samples
        return [Pass(range(i, min(i + per, n_scans)), range(samples)) for i in range(0, n_scans, per)]
    chunks = [range(s, min(s + batch, samples)) for s in range(0, samples, batch)]
    return [Pass(range(i, i + 1), chunk) for i in range(n_scans) for chunk in chunks]


def reconstruct(
    backend: DecodeBackend,
    voxels_NV: Tensor,
    subject: str,
    sampling: SamplingConfig,
    samples: int = 1,
    scan_ids: Tensor | None = None,
    on_scale: Callable[[int], None] | None = None,
    first_sample: int = 0,
    on_preview: Preview | None = None,
) -> Reconstruction:
    """Decode a batch of scans (all of one subject) with ``samples`` draws each: samples ``first_sample`` ..
    ``first_sample + samples - 1`` of every scan (a sample's draws depend on its index, not on the pass).

    ``on_scale(i)`` is called once scale i's work is issued; on a GPU it may still be running (the loop does not
    wait for the device until the image is copied back). ``on_preview`` = (scales, callback): after each of those
    scales the image decoded from the prediction so far (f_hat after scale i) is passed to ``callback(i,
    images_NS3HW)`` (on the CPU, like the final images); previews change nothing of the final result."""
    if backend.cfg.generator.condition != "fmri":
        raise InputError(
            f"model {backend.cfg.name} is class-conditional: decode class labels (--class-label), not voxels"
        )
    dev = backend.device
    voxels_NV = voxels_NV.to(dev, torch.float32)
    check_voxels(voxels_NV, subject, backend.voxel_count(subject))  # the one check, whatever the backend
    with host_threads(backend):
        cond = backend.encode(voxels_NV, subject)
        null = None
        if guidance_active(sampling, 0):  # the null condition: the encoding of all-zero voxels
            null = backend.encode(torch.zeros_like(voxels_NV[:1], device=dev, dtype=torch.float32), subject)
        rec = _decode(backend, cond, null, sampling, samples, scan_ids, on_scale, first_sample, on_preview)
    rec.pooled_ND = cond[0].float().cpu()
    return rec


def decode_features(
    backend: DecodeBackend,
    pooled_ND: Tensor,
    context_NSD: Tensor,
    sampling: SamplingConfig,
    null: tuple[Tensor, Tensor] | None = None,
    samples: int = 1,
    scan_ids: Tensor | None = None,
    first_sample: int = 0,
) -> Reconstruction:
    """Decode from encoder features computed elsewhere, e.g. by MindHier's reference encoder for an imported
    generator (which comes without an encoder): ``pooled_ND`` [N, D_pool] and ``context_NSD`` [N, M*T, D] with
    the levels deep first ([e_M, ..., e_1], as ``HierarchicalEncoder`` returns them). ``null`` = (pooled [1, D_pool],
    context [1, M*T, D]) of the unconditional row, needed while guidance is on (the reference: the encoding of
    all-zero voxels)."""
    if backend.cfg.generator.condition != "fmri":
        raise InputError(f"model {backend.cfg.name} is class-conditional: decode class labels, not features")
    S, D = backend.cfg.schedule.context_length, backend.cfg.context_dim
    if context_NSD.ndim != 3 or tuple(context_NSD.shape[1:]) != (S, D) or context_NSD.shape[0] != pooled_ND.shape[0]:
        raise InputError(
            f"expected context [N, {S}, {D}] for {pooled_ND.shape[0]} pooled rows, got {tuple(context_NSD.shape)}"
        )
    if guidance_active(sampling, 0) and null is None:
        raise InputError("guidance (cfg_scale > 0) needs the null condition: pass null=(pooled [1, D], context)")
    dev = backend.device
    cond = (pooled_ND.to(dev, torch.float32), context_NSD.to(dev, torch.float32))
    if null is not None:
        null = (null[0].to(dev, torch.float32), null[1].to(dev, torch.float32))
    with host_threads(backend):
        rec = _decode(backend, cond, null, sampling, samples, scan_ids, None, first_sample)
    rec.pooled_ND = cond[0].float().cpu()
    return rec


def generate(
    backend: DecodeBackend,
    labels_N: Tensor,
    sampling: SamplingConfig,
    samples: int = 1,
    scan_ids: Tensor | None = None,
    on_scale: Callable[[int], None] | None = None,
    first_sample: int = 0,
) -> Reconstruction:
    """Class-conditional models (VAR): ``samples`` images of each class label (from sample index ``first_sample``
    on); rows keyed like scans.

    The unconditional rows of guidance use the null label ``num_classes``; nothing is encoded.
    """
    g = backend.cfg.generator
    if g.condition != "class":
        raise InputError(f"model {backend.cfg.name} is conditioned on fMRI: decode voxels (--fmri), not class labels")
    labels_N = torch.as_tensor(labels_N).to(torch.long).reshape(-1)
    bad = labels_N[(labels_N < 0) | (labels_N >= g.num_classes)]
    if len(bad):
        raise InputError(f"class labels must be in 0..{g.num_classes - 1}, got {bad.tolist()}")
    dev = backend.device
    null = (torch.full((1,), g.num_classes, dtype=torch.long, device=dev), None)
    with host_threads(backend):
        return _decode(backend, (labels_N.to(dev), None), null, sampling, samples, scan_ids, on_scale, first_sample)


def _decode(
    backend: DecodeBackend,
    cond: tuple[Tensor, Tensor | None],
    null: tuple[Tensor, Tensor | None] | None,
    sampling: SamplingConfig,
    samples: int,
    scan_ids: Tensor | None,
    on_scale: Callable[[int], None] | None,
    first_sample: int = 0,
    on_preview: Preview | None = None,
) -> Reconstruction:
    """The loop shared by every condition: ``cond`` = (condition [N, ...], context [N, S, D] or None) of the
    conditional rows, ``null`` = the same for one unconditional row (used while guidance is on)."""
    sched = backend.cfg.schedule
    cond_N, context_NSD = cond
    N, dev = cond_N.shape[0], backend.device
    scan_ids = torch.arange(N) if scan_ids is None else scan_ids.to(torch.long).cpu()
    R = N * samples  # conditional rows, scan-major
    row_scan = scan_ids.repeat_interleave(samples).to(dev)
    row_sample = torch.arange(first_sample, first_sample + samples).repeat(N).to(dev)

    cond_R = cond_N.repeat_interleave(samples, dim=0)
    context_RSD = None if context_NSD is None else context_NSD.repeat_interleave(samples, dim=0)
    guided = guidance_active(sampling, 0)
    if guided:
        assert null is not None, "guidance needs the null condition"
        null_cond, null_context = null
        cond_R = torch.cat([cond_R, null_cond.expand(R, *null_cond.shape[1:])])
        if context_RSD is not None:
            context_RSD = torch.cat([context_RSD, null_context.expand(R, -1, -1)])
    state = backend.prepare(cond_R, context_RSD)

    f_hat = backend.empty_fhat(R)
    h_BlC: Tensor | None = None  # scale i's embedded input tokens (None at scale 0: the state's start token)
    tokens = []
    for i in range(sched.n_scales):
        if guided and not guidance_active(sampling, i):
            state = backend.select(state, slice(0, R))
            h_BlC = None if h_BlC is None else h_BlC[:R]
            guided = False
        logits_BlV = backend.step(i, state, h_BlC)
        weight = guidance_weight(sampling, i, sched.n_scales) if guided else None
        idx_Rl = backend.choose_tokens(logits_BlV, sampling, i, weight, row_scan, row_sample)
        f_hat, h_next = backend.update(i, f_hat, idx_Rl)
        if h_next is not None and guided:
            h_next = torch.cat([h_next, h_next])
        h_BlC = h_next
        tokens.append(idx_Rl.view(N, samples, -1))  # to the host after the loop: no device sync per scale
        if on_scale is not None:
            on_scale(i)
        if on_preview is not None and i in on_preview[0] and i < sched.n_scales - 1:
            preview = backend.decode_image(f_hat).float().cpu()
            on_preview[1](i, preview.view(N, samples, *preview.shape[1:]))
    images = backend.decode_image(f_hat).float().cpu()
    tokens = [t.cpu() for t in tokens]
    return Reconstruction(images_NS3HW=images.view(N, samples, *images.shape[1:]), tokens=tokens)
