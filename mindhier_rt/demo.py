"""`mindhier-rt demo`: the whole method end to end on the built-in synthetic fMRI benchmark.

synthesise stimuli + two simulated subjects -> train the VQ-VAE -> stage 1 (encoder aligned to a frozen
teacher's layer taps) -> stage 2 (generator on the token pyramids, condition dropout) -> save one
checkpoint -> export the engine bundle -> decode the held-out test scans (repeats averaged) with
onnxruntime through that bundle -> the object read-out (``object_probe``) -> metrics.json and the figures:
reconstructions.png (seen / reconstructed), progression.png (coarse to fine), metrics.png (scores against
chance), losses.png.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mindhier_rt import figures
from mindhier_rt.config import ModelConfig, preset
from mindhier_rt.data.nsd import BrainDataset, write_dataset
from mindhier_rt.data.synthetic import make_synthetic
from mindhier_rt.export.onnx_export import export_bundle
from mindhier_rt.io import write_json
from mindhier_rt.metrics import pixcorr, ssim, two_way_identification
from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.object_probe import AttributeProbe, ProbeSettings, object_scores, train_probe
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
    n_train: int = 6000  # NSD shows each subject about 9,000 training images; 1,200 starved stage 2
    n_test: int = 100
    repeats: int = 3
    vq_steps: int = 1000  # at 600 its round trip kept the object's colour in 0.49 of the test images (docs/demo.md)
    stage1_steps: int = 600
    stage2_steps: int = 1100
    batch_size: int = 32
    vq_lr: float = 2e-3
    stage1_lr: float = 1e-3
    stage2_lr: float = 3e-3
    probe_images: int = 3000
    probe_steps: int = 300
    decode_subject: str = "subj01"
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(cfg_scale=2.0, top_k=20, top_p=0.9))

    def scaled(self, factor: float) -> DemoSettings:
        """A shorter (or longer) run: every step count times ``factor``."""
        s = DemoSettings(**{**asdict(self), "sampling": self.sampling})
        s.vq_steps, s.stage1_steps, s.stage2_steps, s.probe_steps = (
            max(2, int(n * factor)) for n in (self.vq_steps, self.stage1_steps, self.stage2_steps, self.probe_steps)
        )
        return s

    def quick(self) -> DemoSettings:
        """About a minute on 2 cores: 400 stimuli, a tenth of the steps (a first picture, not a result)."""
        s = self.scaled(0.1)
        s.n_train, s.n_test = 400, 40
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
    probe = train_probe(
        cfg.image_size, seed=s.seed, settings=ProbeSettings(n_images=s.probe_images, steps=s.probe_steps)
    )
    phase("train object probe", t0)

    t0 = time.perf_counter()
    backend = OnnxRuntimeBackend(bundle)
    scores, recon, gt = evaluate(backend, data, s.decode_subject, s.sampling, teacher, probe)
    phase("decode + evaluate", t0)
    metrics = {
        **scores,
        "subject": s.decode_subject,
        "backend": backend.name,
        "preset": cfg.name,
        "sampling": s.sampling.to_dict(),
        "seed": s.seed,
        "phase_seconds": timings,
    }
    t0 = time.perf_counter()
    write_figures(out, backend, data, s, metrics, recon, gt)
    phase("figures", t0)
    metrics["seconds"] = round(time.perf_counter() - t_start, 2)
    write_json(out / "metrics.json", metrics)
    return metrics


CHANCE = {"two_way_pixel": 0.5, "two_way_feature": 0.5, "pixcorr": 0.0, "ssim": None}


def write_figures(
    out: Path, backend: DecodeBackend, data: BrainDataset, s: DemoSettings, metrics: dict, recon, gt
) -> None:
    """reconstructions.png (40 test images, seen above reconstructed), progression.png (six decodes after every
    scale), metrics.png (each score against chance) and losses.png (the three stages' training losses)."""
    summary = ", ".join(
        f"{k.replace('_', ' ')} {metrics[k]:.3f}" + (f" (chance {CHANCE[k]:.1f})" if CHANCE[k] is not None else "")
        for k in ("two_way_pixel", "two_way_feature", "pixcorr", "ssim")
    )
    if "object" in metrics:
        category = metrics["object"]["category"]
        summary += f"; object category read right {category['recon']:.2f} (chance {category['chance']:.2f})"
    n = min(40, len(gt))
    grid = figures.pairs_grid(
        list(gt[:n]), list(recon[:n]), columns=10, scale=3,
        title=f"mindhier-rt demo: {n} of {len(gt)} held-out test scans of {s.decode_subject} (seed {s.seed})",
        subtitle=summary, labels=[f"test {i}" for i in range(n)],
    )  # fmt: skip
    figures.save_figure(out / "reconstructions.png", grid)

    k = min(6, len(gt))  # the same scans, rows and seeds as above: the last column is their reconstruction
    voxels, _ = data.split(s.decode_subject, "test")
    K = backend.cfg.schedule.n_scales
    steps: list[list] = [[] for _ in range(k)]

    def keep(_: int, images_NS3HW: torch.Tensor) -> None:
        for row in range(k):
            steps[row].append(images_NS3HW[row, 0])

    final = reconstruct(
        backend, torch.from_numpy(voxels[:k]), s.decode_subject, s.sampling, on_preview=(range(K - 1), keep)
    ).images_NS3HW[:, 0]
    for row in range(k):
        steps[row].append(final[row])
    pn = backend.cfg.schedule.patch_nums
    labels = [f"scale {i + 1} ({p}x{p})" for i, p in enumerate(pn)]
    figures.save_figure(out / "progression.png", figures.progression_grid(steps, list(gt[:k]), labels, scale=3))

    rows = [(name.replace("_", " "), float(metrics[name]), CHANCE[name]) for name in CHANCE]
    figures.save_figure(out / "metrics.png", figures.metrics_panel(rows, f"demo scores, {len(gt)} test scans"))

    series = {}
    for stage in ("vqvae", "stage1", "stage2"):
        path = out / "train" / f"{stage}.log.jsonl"
        if path.is_file():
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            series[stage] = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if series:
        figures.save_figure(out / "losses.png", figures.loss_plot(series))


def evaluate(
    backend: DecodeBackend,
    data: BrainDataset,
    subject: str,
    sampling: SamplingConfig,
    teacher: RandomViTTeacher,
    probe: AttributeProbe | None = None,
) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Decode the held-out test scans (repeats averaged) and score them against their stimuli.

    two_way_feature compares the teacher's pooled terminal features (the demo's stand-in for CLIP). With a
    ``probe`` (and a data set that knows its stimuli's attributes) ``object`` says how often the probe reads
    each reconstruction's object category, colour, position and size right (``object_probe.object_scores``).
    Returns (scores, reconstructions [N, 3, H, W], ground truth [N, 3, H, W]).
    """
    voxels, image_index = data.split(subject, "test")
    recon = reconstruct(backend, torch.from_numpy(voxels), subject, sampling).images_NS3HW[:, 0]
    gt = torch.from_numpy(data.images(image_index))

    def feats(x: torch.Tensor) -> torch.Tensor:
        return teacher.image_levels(x)[:, -1].mean(1)

    scores: dict[str, Any] = {
        "pixcorr": round(pixcorr(recon, gt), 4),
        "ssim": round(ssim(recon, gt), 4),
        "two_way_pixel": round(two_way_identification(recon.flatten(1), gt.flatten(1)), 4),
        "two_way_feature": round(two_way_identification(feats(recon), feats(gt)), 4),
        "n_test": len(gt),
    }
    attrs = data.attributes()
    if probe is not None and attrs is not None:
        scores["object"] = object_scores(probe, recon, gt, attrs.subset(image_index))
    return scores, recon, gt
