"""`mindhier-rt demo`: the whole method end to end on the built-in synthetic fMRI benchmark.

synthesise stimuli + two simulated subjects -> train the VQ-VAE -> stage 1 (encoder aligned to a frozen
teacher's layer taps) -> stage 2 (generator on the token pyramids, condition dropout) -> save one
checkpoint -> export the engine bundle -> decode the held-out test scans (repeats averaged) with
onnxruntime through that bundle -> reconstructions.png + metrics.json.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mindhier_rt.config import ModelConfig, preset
from mindhier_rt.data.nsd import BrainDataset, write_dataset
from mindhier_rt.data.synthetic import make_synthetic
from mindhier_rt.export.onnx_export import export_bundle
from mindhier_rt.io import save_grid_png, write_json
from mindhier_rt.metrics import pixcorr, ssim, two_way_identification
from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.pipeline import reconstruct
from mindhier_rt.runtime.base import DecodeBackend
from mindhier_rt.runtime.onnxruntime_backend import OnnxRuntimeBackend
from mindhier_rt.sampling import SamplingConfig
from mindhier_rt.train.loop import TrainConfig
from mindhier_rt.train.stages import TrialSet, load_trials, train_stage1, train_stage2, train_vqvae
from mindhier_rt.train.teacher import HashTextTeacher, RandomViTTeacher

log = logging.getLogger(__name__)


@dataclass
class DemoSettings:
    preset: str = "demo"
    seed: int = 0
    n_train: int = 1200
    n_test: int = 100
    repeats: int = 3
    vq_steps: int = 500
    stage1_steps: int = 1500
    stage2_steps: int = 700
    batch_size: int = 32
    vq_lr: float = 2e-3
    stage1_lr: float = 1e-3
    stage2_lr: float = 3e-3
    decode_subject: str = "subj01"
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(cfg_scale=2.0, top_k=20, top_p=0.9))

    def scaled(self, factor: float) -> DemoSettings:
        """A shorter (or longer) run: every step count times ``factor``."""
        s = DemoSettings(**{**asdict(self), "sampling": self.sampling})
        s.vq_steps, s.stage1_steps, s.stage2_steps = (
            max(2, int(n * factor)) for n in (self.vq_steps, self.stage1_steps, self.stage2_steps)
        )
        return s

    def train_config(self, stage: str) -> TrainConfig:
        steps, lr = {
            "vq": (self.vq_steps, self.vq_lr),
            "stage1": (self.stage1_steps, self.stage1_lr),
            "stage2": (self.stage2_steps, self.stage2_lr),
        }[stage]
        return TrainConfig(steps=steps, batch_size=self.batch_size, lr=lr, seed=self.seed)


def synthesise(root: Path, s: DemoSettings) -> tuple[BrainDataset, torch.Tensor, list[TrialSet]]:
    """Write the synthetic set for the demo preset and read it back through the NSD-layout loader."""
    cfg = preset(s.preset)
    synthetic = make_synthetic(
        cfg.encoder.subjects, n_train=s.n_train, n_test=s.n_test, repeats=s.repeats, size=cfg.image_size, seed=s.seed
    )
    data = BrainDataset(write_dataset(synthetic, root))
    return data, torch.from_numpy(data.images()), load_trials(data)


def teacher_targets(
    cfg: ModelConfig, seed: int, images: torch.Tensor, captions: list[str]
) -> tuple[RandomViTTeacher, torch.Tensor, torch.Tensor]:
    """The frozen teacher and its targets for every image: levels [N, M, T, D], text [N, t, D]."""
    teacher = RandomViTTeacher(cfg, seed=seed)
    levels = torch.cat([teacher.image_levels(images[i : i + 256]) for i in range(0, len(images), 256)])
    return teacher, levels, HashTextTeacher(cfg, seed=seed).text_tokens(captions)


def run_demo(
    out: Path, settings: DemoSettings | None = None, progress: bool = True, say: Callable[[str], None] = log.info
) -> dict:
    """Run the demo into ``out``; return the metrics (also written to ``out/metrics.json``)."""
    s = settings or DemoSettings()
    t_start = time.perf_counter()
    torch.manual_seed(s.seed)
    cfg = preset(s.preset)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def phase(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 2)
        say(f"{name}: {timings[name]:.1f} s")

    t0 = time.perf_counter()
    data, images, train_trials = synthesise(out / "data", s)
    train_images = torch.unique(torch.cat([t.image_index_n for t in train_trials]))
    phase("synthesise", t0)

    models = MindHier.from_config(cfg, seed=s.seed)
    run_dir = out / "train"
    t0 = time.perf_counter()
    train_vqvae(
        models, images[train_images], s.train_config("vq"),
        run_dir, resume=False, progress=progress,
    )  # fmt: skip
    phase("train vqvae", t0)

    t0 = time.perf_counter()
    teacher, teacher_levels, text_targets = teacher_targets(cfg, s.seed, images, data.captions())
    train_stage1(
        models, train_trials, teacher_levels, text_targets, s.train_config("stage1"), run_dir,
        resume=False, progress=progress,
    )  # fmt: skip
    phase("train stage 1", t0)

    t0 = time.perf_counter()
    train_stage2(models, train_trials, images, s.train_config("stage2"), run_dir, resume=False, progress=progress)
    phase("train stage 2", t0)
    ckpt = out / "model.safetensors"
    models.save(ckpt, extra={"demo": {k: v for k, v in asdict(s).items() if k != "sampling"}})

    t0 = time.perf_counter()
    bundle = export_bundle(MindHier.load(ckpt), out / "bundle", sampling=s.sampling, source=str(ckpt))
    phase("export bundle", t0)

    t0 = time.perf_counter()
    backend = OnnxRuntimeBackend(bundle)
    scores, recon, gt = evaluate(backend, data, s.decode_subject, s.sampling, teacher)
    phase("decode + evaluate", t0)
    metrics = {
        **scores,
        "subject": s.decode_subject,
        "backend": backend.name,
        "preset": cfg.name,
        "sampling": s.sampling.to_dict(),
        "seed": s.seed,
        "phase_seconds": timings,
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    n_show = min(12, len(gt))
    save_grid_png(out / "reconstructions.png", [list(gt[:n_show]), list(recon[:n_show])])
    write_json(out / "metrics.json", metrics)
    return metrics


def evaluate(
    backend: DecodeBackend, data: BrainDataset, subject: str, sampling: SamplingConfig, teacher: RandomViTTeacher
) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Decode the held-out test scans (repeats averaged) and score them against their stimuli.

    two_way_feature compares the teacher's pooled terminal features (the demo's stand-in for CLIP).
    Returns (scores, reconstructions [N, 3, H, W], ground truth [N, 3, H, W]).
    """
    voxels, image_index = data.split(subject, "test")
    recon = reconstruct(backend, torch.from_numpy(voxels), subject, sampling).images_NS3HW[:, 0]
    gt = torch.from_numpy(data.images(image_index))

    def feats(x: torch.Tensor) -> torch.Tensor:
        return teacher.image_levels(x)[:, -1].mean(1)

    scores = {
        "pixcorr": round(pixcorr(recon, gt), 4),
        "ssim": round(ssim(recon, gt), 4),
        "two_way_pixel": round(two_way_identification(recon.flatten(1), gt.flatten(1)), 4),
        "two_way_feature": round(two_way_identification(feats(recon), feats(gt)), 4),
        "n_test": len(gt),
    }
    return scores, recon, gt
