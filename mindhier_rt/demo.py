"""`mindhier-rt demo`: the whole method end to end on the built-in synthetic fMRI benchmark.

synthesise stimuli + two simulated subjects -> train the VQ-VAE -> stage 1 (encoder aligned to a frozen
teacher's layer taps) -> stage 2 (generator on the token pyramids, condition dropout) -> save one
checkpoint -> decode the held-out test scans (repeats averaged) -> reconstructions.png + metrics.json.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from mindhier_rt.config import preset
from mindhier_rt.data.nsd import BrainDataset, write_dataset
from mindhier_rt.data.synthetic import make_synthetic
from mindhier_rt.io import save_grid_png, write_json
from mindhier_rt.metrics import pixcorr, ssim, two_way_identification
from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.pipeline import reconstruct
from mindhier_rt.runtime.torch_backend import TorchBackend
from mindhier_rt.sampling import SamplingConfig
from mindhier_rt.train.loop import TrainConfig
from mindhier_rt.train.stages import load_trials, train_stage1, train_stage2, train_vqvae
from mindhier_rt.train.teacher import HashTextTeacher, RandomViTTeacher

log = logging.getLogger(__name__)


@dataclass
class DemoSettings:
    preset: str = "demo"
    seed: int = 0
    n_train: int = 1200
    n_test: int = 100
    repeats: int = 3
    vq_steps: int = 400
    stage1_steps: int = 400
    stage2_steps: int = 600
    batch_size: int = 32
    decode_subject: str = "subj01"
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(cfg_scale=2.0, top_k=20, top_p=0.9))

    def scaled(self, factor: float) -> DemoSettings:
        """A shorter (or longer) run: every step count times ``factor``."""
        s = DemoSettings(**{**asdict(self), "sampling": self.sampling})
        s.vq_steps, s.stage1_steps, s.stage2_steps = (
            max(2, int(n * factor)) for n in (self.vq_steps, self.stage1_steps, self.stage2_steps)
        )
        return s


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
    synthetic = make_synthetic(
        cfg.encoder.subjects, n_train=s.n_train, n_test=s.n_test, repeats=s.repeats, size=cfg.image_size, seed=s.seed
    )
    data = BrainDataset(write_dataset(synthetic, out / "data"))
    images = torch.from_numpy(data.images())
    train_trials = load_trials(data)
    train_images = torch.unique(torch.cat([t.image_index_n for t in train_trials]))
    phase("synthesise", t0)

    models = MindHier.from_config(cfg, seed=s.seed)
    run_dir = out / "train"
    t0 = time.perf_counter()
    train_vqvae(
        models, images[train_images], TrainConfig(steps=s.vq_steps, batch_size=s.batch_size, lr=2e-3, seed=s.seed),
        run_dir, resume=False, progress=progress,
    )  # fmt: skip
    phase("train vqvae", t0)

    t0 = time.perf_counter()
    teacher, text_teacher = RandomViTTeacher(cfg, seed=s.seed), HashTextTeacher(cfg, seed=s.seed)
    teacher_levels = torch.cat([teacher.image_levels(images[i : i + 256]) for i in range(0, len(images), 256)])
    text_targets = text_teacher.text_tokens(data.captions())
    train_stage1(
        models, train_trials, teacher_levels, text_targets,
        TrainConfig(steps=s.stage1_steps, batch_size=s.batch_size, lr=1e-3, seed=s.seed),
        run_dir, resume=False, progress=progress,
    )  # fmt: skip
    phase("train stage 1", t0)

    t0 = time.perf_counter()
    train_stage2(
        models, train_trials, images,
        TrainConfig(steps=s.stage2_steps, batch_size=s.batch_size, lr=3e-3, seed=s.seed),
        run_dir, resume=False, progress=progress,
    )  # fmt: skip
    phase("train stage 2", t0)
    ckpt = out / "model.safetensors"
    models.save(ckpt, extra={"demo": {k: v for k, v in asdict(s).items() if k != "sampling"}})

    t0 = time.perf_counter()
    voxels, image_index = data.split(s.decode_subject, "test")
    backend = TorchBackend(MindHier.load(ckpt))
    rec = reconstruct(backend, torch.from_numpy(voxels), s.decode_subject, s.sampling, samples=1)
    recon = rec.images_NS3HW[:, 0]
    gt = images[torch.from_numpy(image_index)]
    phase("decode", t0)

    feats = lambda x: teacher.image_levels(x)[:, -1].mean(1)  # noqa: E731  (pooled terminal teacher features)
    metrics = {
        "pixcorr": pixcorr(recon, gt),
        "ssim": ssim(recon, gt),
        "two_way_pixel": two_way_identification(recon.flatten(1), gt.flatten(1)),
        "two_way_feature": two_way_identification(feats(recon), feats(gt)),
        "n_test": len(gt),
        "subject": s.decode_subject,
        "backend": backend.name,
        "preset": cfg.name,
        "sampling": s.sampling.to_dict(),
        "seed": s.seed,
        "phase_seconds": timings,
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    metrics = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}
    n_show = min(12, len(gt))
    save_grid_png(out / "reconstructions.png", [list(gt[:n_show]), list(recon[:n_show])])
    write_json(out / "metrics.json", metrics)
    np.save(out / "test_image_index.npy", image_index)
    return metrics
