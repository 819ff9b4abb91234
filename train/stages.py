"""The three training stages: VQ-VAE, stage 1 (hierarchical encoder), stage 2 (generator).

Each takes in-memory arrays (so the demo, the CLI and tests share them) and runs ``train_loop``.
Axis letters: N images, n trials, V voxels, M levels, T tokens per level, D width, L pyramid tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.train.loop import TrainConfig, batch_rng, train_loop
from mindhier_rt.train.losses import hierarchical_mse, soft_clip_loss, token_cross_entropy


def _pick(rng, n: int, batch: int) -> Tensor:
    return torch.from_numpy(rng.choice(n, size=min(batch, n), replace=False))


class CodebookRestarts:
    """Re-seed codes that fell out of use with quantiser inputs from the current batch.

    Residual VQ collapses onto a handful of codes when the codebook starts far from the latents; a
    code whose running usage drops below ``threshold`` is replaced by a random recent quantiser input
    (every code counts as unused at the first step, so this is also a data-dependent init).
    """

    def __init__(self, vocab: int, every: int = 20, decay: float = 0.9, threshold: float = 0.03) -> None:
        self.usage_V = torch.zeros(vocab)
        self.every, self.decay, self.threshold = every, decay, threshold

    @torch.no_grad()
    def __call__(self, step: int, embedding: torch.nn.Embedding, idx: list[Tensor], rests: list[Tensor], rng) -> int:
        counts = torch.bincount(torch.cat([i.flatten() for i in idx]).cpu(), minlength=len(self.usage_V)).float()
        self.usage_V.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        if step % self.every:
            return 0
        dead = (self.usage_V < self.threshold).nonzero().flatten()
        if len(dead) == 0:
            return 0
        pool = torch.cat(rests)
        pick = torch.from_numpy(rng.choice(len(pool), size=len(dead), replace=len(pool) < len(dead)))
        embedding.weight[dead.to(embedding.weight.device)] = pool[pick].to(embedding.weight)
        self.usage_V[dead] = self.threshold * 2  # give the new codes time to be picked
        return len(dead)


def train_vqvae(
    models: MindHier, images_N3HW: Tensor, tcfg: TrainConfig, run_dir: Path, resume: bool = True, progress: bool = True
) -> list[dict]:
    """Reconstruction (MSE + L1) plus the codebook and commitment terms of ``MultiScaleVQVAE.forward``."""
    vq = models.vqvae
    restarts = CodebookRestarts(vq.quantize.embedding.num_embeddings)

    def loss_fn(step: int) -> dict[str, Tensor]:
        rng = batch_rng(tcfg.seed, step)
        x = images_N3HW[_pick(rng, len(images_N3HW), tcfg.batch_size)]
        if rng.random() < 0.5:
            x = x.flip(-1)
        out = vq(x)
        recon = F.mse_loss(out.recon, x) + F.l1_loss(out.recon, x)
        restarted = restarts(step, vq.quantize.embedding, out.idx, out.rests, rng)
        used = float((restarts.usage_V >= restarts.threshold).float().mean())
        return {
            "loss": recon + out.vq_loss,
            "recon": recon,
            "vq": out.vq_loss,
            "codes_used": used,
            "restarted": restarted,
        }

    return train_loop("vqvae", {"vqvae": vq}, loss_fn, tcfg, run_dir, resume, progress)


@dataclass
class TrialSet:
    """Single trials of one subject and the image each shows."""

    subject: str
    voxels_nV: Tensor
    image_index_n: Tensor


def load_trials(data, subjects: list[str] | None = None, split: str = "train") -> list[TrialSet]:
    """Single trials of the given subjects (default: all) from a ``BrainDataset``."""
    names = subjects or list(data.subjects)
    return [TrialSet(s, *map(torch.from_numpy, data.split(s, split, average_repeats=False))) for s in names]


@dataclass
class Stage1Weights:
    levels: float = 1.0
    image_clip: float = 1.0
    text_clip: float = 1.0
    tau: float = 0.005
    level_mask: tuple[float, ...] | None = None  # per-level weights (ablation: terminal-only supervision)


def train_stage1(
    models: MindHier,
    trials: list[TrialSet],
    teacher_levels_NMTD: Tensor,
    text_targets_NtD: Tensor,
    tcfg: TrainConfig,
    run_dir: Path,
    weights: Stage1Weights | None = None,
    resume: bool = True,
    progress: bool = True,
) -> list[dict]:
    """Hierarchical MSE to the teacher's layer taps + SoftCLIP on the terminal level and the text branch.

    Subjects take turns step by step; they share everything but their input layers.
    """
    enc, w = models.encoder, weights or Stage1Weights()
    level_weights = None if w.level_mask is None else torch.tensor(w.level_mask)

    def loss_fn(step: int) -> dict[str, Tensor]:
        rng = batch_rng(tcfg.seed, step)
        ts = trials[step % len(trials)]
        b = _pick(rng, len(ts.voxels_nV), tcfg.batch_size)
        img = ts.image_index_n[b]
        out = enc(ts.voxels_nV[b], ts.subject)
        target = teacher_levels_NMTD[img]
        l_levels = hierarchical_mse(out.levels_BMTD, target, level_weights)
        l_image = soft_clip_loss(out.levels_BMTD[:, -1], target[:, -1], w.tau)
        l_text = soft_clip_loss(out.text_BtD, text_targets_NtD[img], w.tau)
        loss = w.levels * l_levels + w.image_clip * l_image + w.text_clip * l_text
        return {"loss": loss, "levels": l_levels, "image_clip": l_image, "text_clip": l_text}

    return train_loop("stage1", {"encoder": enc}, loss_fn, tcfg, run_dir, resume, progress)


@torch.no_grad()
def encode_all(models: MindHier, ts: TrialSet, batch: int = 256) -> tuple[Tensor, Tensor]:
    """Frozen encoder outputs of every trial: pooled [n, D], deep-first context [n, S, D]."""
    enc = models.encoder.eval()
    pooled, context = [], []
    for start in range(0, len(ts.voxels_nV), batch):
        out = enc(ts.voxels_nV[start : start + batch], ts.subject)
        pooled.append(out.pooled_BD)
        context.append(out.context_BSD())
    return torch.cat(pooled), torch.cat(context)


@torch.no_grad()
def tokenize_images(models: MindHier, images_N3HW: Tensor, batch: int = 256) -> tuple[Tensor, Tensor]:
    """VQ token pyramid [N, L] and teacher-forcing inputs [N, L-1, E] of every image."""
    vq = models.vqvae.eval()
    idx, inputs = [], []
    for start in range(0, len(images_N3HW), batch):
        idx_list = vq.img_to_idx(images_N3HW[start : start + batch])
        idx.append(torch.cat(idx_list, dim=1))
        inputs.append(vq.teacher_inputs(idx_list))
    return torch.cat(idx), torch.cat(inputs)


def train_stage2(
    models: MindHier,
    trials: list[TrialSet],
    images_N3HW: Tensor,
    tcfg: TrainConfig,
    run_dir: Path,
    cond_drop: float = 0.1,
    resume: bool = True,
    progress: bool = True,
) -> list[dict]:
    """Frozen encoder and VQ-VAE; next-scale cross-entropy on the image's token pyramid.

    With probability ``cond_drop`` a row's condition is replaced by the encoder's output for all-zero
    voxels: the null condition that classifier-free guidance uses at decode time.
    """
    gen = models.generator
    models.encoder.requires_grad_(False)
    models.vqvae.requires_grad_(False)
    idx_NL, x_NLE = tokenize_images(models, images_N3HW)
    encoded = [encode_all(models, ts) for ts in trials]
    nulls = [
        encode_all(models, TrialSet(ts.subject, models.encoder.null_voxels(ts.subject, 1), torch.zeros(1)))
        for ts in trials
    ]

    def loss_fn(step: int) -> dict[str, Tensor]:
        rng = batch_rng(tcfg.seed, step)
        s = step % len(trials)
        ts, (pooled_nD, context_nSD), (null_pooled, null_context) = trials[s], encoded[s], nulls[s]
        b = _pick(rng, len(ts.voxels_nV), tcfg.batch_size)
        img = ts.image_index_n[b]
        drop = torch.from_numpy(rng.random(len(b)) < cond_drop)
        pooled = torch.where(drop[:, None], null_pooled, pooled_nD[b])
        context = torch.where(drop[:, None, None], null_context, context_nSD[b])
        logits_BLV = gen(pooled, context, x_NLE[img])
        loss = token_cross_entropy(logits_BLV, idx_NL[img])
        return {"loss": loss}

    return train_loop("stage2", {"generator": gen}, loss_fn, tcfg, run_dir, resume, progress)
