"""The three training stages: VQ-VAE, stage 1 (hierarchical encoder), stage 2 (generator).

Each takes in-memory arrays (so the demo, the CLI and tests share them) and runs ``train_loop``.
Stages 1 and 2 also run under torchrun (``dist``: see ``train/distributed.py``): every rank draws the global
batch of a step and trains on its slice; stage 1 wraps the encoder in DDP, stage 2 shards the generator with
FSDP (one unit per block) or replicates it with DDP.
Axis letters: N images, n trials, V voxels, M levels, T tokens per level, D width, L pyramid tokens.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from mindhier_rt.config import ModelConfig
from mindhier_rt.models.generator import ScaleGenerator
from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.train.distributed import DistContext, gathered_copy
from mindhier_rt.train.loop import TrainConfig, amp_dtype, batch_rng, train_loop
from mindhier_rt.train.losses import hierarchical_mse, soft_clip_loss, token_cross_entropy


def _pick(rng, n: int, batch: int) -> Tensor:
    return torch.from_numpy(rng.choice(n, size=min(batch, n), replace=False))


class CodebookRestarts:
    """Re-seed codes that fell out of use with quantiser inputs from the current batch.

    Residual VQ collapses onto a handful of codes when the codebook starts far from the latents; a
    code whose running usage drops below ``threshold`` is replaced by a random recent quantiser input
    (every code counts as unused at the first step, so this is also a data-dependent init).
    The running usage decides later restarts: it is part of the training state (``state_dict``).
    """

    def __init__(self, vocab: int, every: int = 20, decay: float = 0.9, threshold: float = 0.03) -> None:
        self.usage_V = torch.zeros(vocab)
        self.every, self.decay, self.threshold = every, decay, threshold

    def state_dict(self) -> dict[str, Tensor]:
        return {"usage_V": self.usage_V.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        usage = state["usage_V"]
        if usage.shape != self.usage_V.shape:
            raise ValueError(
                f"expected codebook usage of shape {tuple(self.usage_V.shape)}, found {tuple(usage.shape)}"
            )
        self.usage_V = usage.to(self.usage_V.dtype).clone()

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
    models: MindHier,
    images_N3HW: Tensor,
    tcfg: TrainConfig,
    run_dir: Path,
    resume: bool = True,
    progress: bool = True,
    restart_every: int = 20,
) -> list[dict]:
    """Reconstruction (MSE + L1) plus the codebook and commitment terms of ``MultiScaleVQVAE.forward``;
    unused codes are re-seeded every ``restart_every`` steps (``CodebookRestarts``)."""
    vq = models.vqvae
    restarts = CodebookRestarts(vq.quantize.embedding.num_embeddings, every=restart_every)

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

    return train_loop("vqvae", {"vqvae": vq}, loss_fn, tcfg, run_dir, resume, progress, aux={"restarts": restarts})


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
    dist: DistContext | None = None,
) -> list[dict]:
    """Hierarchical MSE to the teacher's layer taps + SoftCLIP on the terminal level and the text branch.

    Subjects take turns step by step; they share everything but their input layers. Under torchrun the
    encoder is wrapped in DDP; the SoftCLIP terms (a softmax over the whole batch) see the gathered global batch.
    """
    ctx = dist or DistContext()
    dev = ctx.device
    enc, w = models.encoder, weights or Stage1Weights()
    run = ctx.data_parallel(enc, find_unused_parameters=True)  # the other subjects' input layers get no gradient
    level_weights = None if w.level_mask is None else torch.tensor(w.level_mask, device=dev)

    def loss_fn(step: int) -> dict[str, Tensor]:
        rng = batch_rng(tcfg.seed, step)
        ts = trials[step % len(trials)]
        b = _pick(rng, len(ts.voxels_nV), tcfg.batch_size)  # the global batch: the same on every rank
        img = ts.image_index_n[b]
        target = teacher_levels_NMTD[img].to(dev)
        mine = ctx.shard(torch.arange(len(b)))
        out = run(ts.voxels_nV[b[mine]].to(dev), ts.subject)
        l_levels = hierarchical_mse(out.levels_BMTD, target[mine], level_weights)  # a mean over rows: local
        l_image = soft_clip_loss(ctx.gather_rows(out.levels_BMTD[:, -1]), target[:, -1], w.tau)
        l_text = soft_clip_loss(ctx.gather_rows(out.text_BtD), text_targets_NtD[img].to(dev), w.tau)
        loss = w.levels * l_levels + w.image_clip * l_image + w.text_clip * l_text
        return {"loss": loss, "levels": l_levels, "image_clip": l_image, "text_clip": l_text}

    return train_loop("stage1", {"encoder": enc}, loss_fn, tcfg, run_dir, resume, progress, ctx)


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def encode_all(models: MindHier, ts: TrialSet, batch: int = 256) -> tuple[Tensor, Tensor]:
    """Frozen encoder outputs of every trial (computed on the encoder's device, returned on the CPU):
    pooled [n, D], deep-first context [n, S, D]."""
    enc = models.encoder.eval()
    dev = _device_of(enc)
    pooled, context = [], []
    for start in range(0, len(ts.voxels_nV), batch):
        out = enc(ts.voxels_nV[start : start + batch].to(dev), ts.subject)
        pooled.append(out.pooled_BD.cpu())
        context.append(out.context_BSD().cpu())
    return torch.cat(pooled), torch.cat(context)


@torch.no_grad()
def tokenize_images(models: MindHier, images_N3HW: Tensor, batch: int = 256) -> tuple[Tensor, Tensor]:
    """VQ token pyramid [N, L] and teacher-forcing inputs [N, L-1, E] of every image (computed on the VQ-VAE's
    device, returned on the CPU)."""
    vq = models.vqvae.eval()
    dev = _device_of(vq)
    idx, inputs = [], []
    for start in range(0, len(images_N3HW), batch):
        idx_list = vq.img_to_idx(images_N3HW[start : start + batch].to(dev))
        idx.append(torch.cat(idx_list, dim=1).cpu())
        inputs.append(vq.teacher_inputs(idx_list).cpu())
    return torch.cat(idx), torch.cat(inputs)


def _check_conditions(conditions: list[tuple[Tensor, Tensor]], trials: list[TrialSet], cfg: ModelConfig) -> None:
    """One (pooled [n, D], context [n, S, D]) per trial set, n its trial count, S and D the generator's context."""
    S, D = cfg.schedule.context_length, cfg.context_dim
    want = [((len(ts.image_index_n), D), (len(ts.image_index_n), S, D)) for ts in trials]
    found = [(tuple(p.shape), tuple(c.shape)) for p, c in conditions]
    if found != want:
        raise ValueError(f"expected one condition (pooled, context) per trial of every trial set, shapes {want}; "
                         f"found {found}")  # fmt: skip


def train_stage2(
    models: MindHier,
    trials: list[TrialSet],
    images_N3HW: Tensor,
    tcfg: TrainConfig,
    run_dir: Path,
    cond_drop: float = 0.1,
    resume: bool = True,
    progress: bool = True,
    dist: DistContext | None = None,
    fsdp: bool = False,
    grad_checkpoint: bool = False,
    conditions: list[tuple[Tensor, Tensor]] | None = None,
) -> list[dict]:
    """Frozen encoder and VQ-VAE; next-scale cross-entropy on the image's token pyramid.

    With probability ``cond_drop`` a row's condition is replaced by the encoder's output for all-zero
    voxels: the null condition that classifier-free guidance uses at decode time.

    ``conditions`` (one (pooled [n, D], deep-first context [n, S, D]) per trial set, on the CPU) replace the
    encoder's outputs for the trials, e.g. the teacher's own features of the images (``demo_diagnosis.py``); the
    null condition stays the encoding of all-zero voxels.

    Under torchrun the generator is sharded with FSDP (``fsdp``; gathered weights in the AMP dtype) or replicated
    with DDP; after training ``models.generator`` is a plain module with the full weights on every rank.
    ``grad_checkpoint`` recomputes each block in the backward pass instead of keeping its activations.
    The frozen models run once, up front, on the training device and go back to where they were.
    """
    if conditions is not None:
        _check_conditions(conditions, trials, models.cfg)  # before any model moves or any image is tokenised
    ctx = dist or DistContext()
    dev = ctx.device
    gen = models.generator
    models.encoder.requires_grad_(False)
    models.vqvae.requires_grad_(False)
    homes = {m: _device_of(m) for m in (models.encoder, models.vqvae)}
    for m in homes:
        m.to(dev)
    idx_NL, x_NLE = tokenize_images(models, images_N3HW)
    encoded = conditions if conditions is not None else [encode_all(models, ts) for ts in trials]
    nulls = [
        encode_all(models, TrialSet(ts.subject, models.encoder.null_voxels(ts.subject, 1), torch.zeros(1)))
        for ts in trials
    ]
    for m, home in homes.items():
        m.to(home)
    if fsdp:
        run = ctx.fully_shard(gen, gen.blocks, unit_methods=("teacher_forward",), param_dtype=amp_dtype(tcfg.amp))
    else:
        run = ctx.data_parallel(gen)

    def loss_fn(step: int) -> dict[str, Tensor]:
        rng = batch_rng(tcfg.seed, step)
        s = step % len(trials)
        ts, (pooled_nD, context_nSD), (null_pooled, null_context) = trials[s], encoded[s], nulls[s]
        b = _pick(rng, len(ts.image_index_n), tcfg.batch_size)  # the global batch and its draws: the same on every rank
        drop = torch.from_numpy(rng.random(len(b)) < cond_drop)
        b, drop = ctx.shard(b), ctx.shard(drop)
        img = ts.image_index_n[b]
        pooled = torch.where(drop[:, None], null_pooled, pooled_nD[b]).to(dev)
        context = torch.where(drop[:, None, None], null_context, context_nSD[b]).to(dev)
        logits_BLV = run(pooled, context, x_NLE[img].to(dev), checkpoint_blocks=grad_checkpoint)
        loss = token_cross_entropy(logits_BLV, idx_NL[img].to(dev))  # a mean over rows: local
        return {"loss": loss}

    with warnings.catch_warnings():
        # FSDP2 warns that the root module returns a view (the logits): harmless, they only feed the loss
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        records = train_loop("stage2", {"generator": gen}, loss_fn, tcfg, run_dir, resume, progress, ctx)
    if fsdp and ctx.initialized:
        models.generator = gathered_copy(gen, lambda: ScaleGenerator(models.cfg)).eval()
    return records
