"""The batch job behind ``mindhier-rt decode``: scans (or class labels) in, PNGs, pooled.npy and decode.json out.

A job decodes in passes of at most ``batch`` (scan, sample) rows (``pipeline.decode_passes``) into a folder
claimed with ``run_folder.claim_run_folder``: decode.json says ``running`` before the first image and
``complete`` after the last. Bad scans (NaN or inf voxels) are reported and skipped; the good ones are decoded.
File names: ``scanNNNNN.png`` (``scanNNNNN_sK.png`` with several samples per scan) and
``classLLLL_NNN[_sK].png`` for class labels.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mindhier_rt.errors import InputError
from mindhier_rt.run_folder import RunFolder
from mindhier_rt.runtime.base import DecodeBackend
from mindhier_rt.sampling import SamplingConfig

Progress = Callable[[int], None]  # called with the number of images just written


def scan_png_name(scan: int, sample: int, samples: int, suffix: str = "") -> str:
    """``scanNNNNN[suffix][_sK].png``: the name decode and the serve client give a scan's image."""
    return f"scan{scan:05d}{suffix}" + ("" if samples == 1 else f"_s{sample}") + ".png"


def skipped_scans(voxels_NV: np.ndarray) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """(indices of the scans to decode, a report entry per scan skipped for NaN or inf voxels)."""
    from mindhier_rt.io import finite_rows

    good = finite_rows(voxels_NV)
    skipped = [{"scan": int(i), "reason": "NaN or inf voxels"} for i in (~good).nonzero()[0]]
    return good.nonzero()[0], skipped


def check_voxels(runner: DecodeBackend, voxels_NV: np.ndarray, subject: str, source: Path) -> None:
    """InputError unless ``runner`` decodes fMRI and ``voxels_NV`` has ``subject``'s voxel count per row."""
    if runner.cfg.generator.condition == "class":
        raise InputError(f"model {runner.cfg.name} is class-conditional: pass --class-label N instead of --fmri")
    if runner.cfg.encoder is None:
        raise InputError(f"model {runner.cfg.name} has no fMRI encoder: it cannot decode voxels")
    expected = runner.voxel_count(subject)  # the backend contract: the checkpoint's or the bundle's count
    if voxels_NV.shape[1] != expected:
        raise InputError(f"{source}: subject {subject} expects {expected} voxels per scan, got {voxels_NV.shape[1]}")


def scan_report(
    runner: DecodeBackend,
    ckpt: Path | None,
    engine: Path | None,
    fmri: Path,
    key: str | None,
    subject: str,
    sampling: SamplingConfig,
    sampling_source: dict[str, str],
    samples: int,
    batch: int,
) -> dict[str, Any]:
    """decode.json's settings of a ``decode --fmri`` run (the job adds images, pooled, skipped and seconds)."""
    return {
        "ckpt": None if ckpt is None else str(ckpt),
        "engine": None if engine is None else str(engine),
        "fmri": str(fmri),
        "fmri_resolved": str(fmri.resolve()),
        "key": key,
        "subject": subject,
        "backend": runner.name,
        "context_map": runner.cfg.context_map,
        "sampling": sampling.to_dict(),
        "sampling_source": sampling_source,
        "samples": samples,
        "batch": batch,
    }


@dataclass
class DecodeResult:
    decoded: int  # scans (or class labels) decoded
    skipped: int
    seconds: float


def decode_scans(
    runner: DecodeBackend,
    voxels_NV: np.ndarray,
    good_ids: np.ndarray,
    subject: str,
    folder: RunFolder,
    sampling: SamplingConfig,
    samples: int,
    batch: int,
    report: dict[str, Any],
    skipped: list[dict[str, Any]],
    on_progress: Progress | None = None,
) -> DecodeResult:
    """Decode the rows ``good_ids`` of ``voxels_NV`` into ``folder``; ``report`` holds the run's settings and
    gains images, pooled and skipped. pooled.npy holds per scan the encoder's pooled output (NaN rows: skipped)."""
    import torch

    from mindhier_rt.io import atomic_write, save_png
    from mindhier_rt.pipeline import decode_passes, reconstruct

    out = folder.path
    folder.report("running", {**report, "images": [], "skipped": skipped})
    written: list[dict[str, Any]] = []
    pooled = None  # [scans, D]: the brain-predicted CLIP embedding
    t0 = time.perf_counter()
    for p in decode_passes(len(good_ids), samples, batch):
        ids = good_ids[p.scans.start : p.scans.stop]
        rec = reconstruct(
            runner, torch.from_numpy(voxels_NV[ids]), subject, sampling, samples=len(p.samples),
            scan_ids=torch.from_numpy(ids), first_sample=p.samples.start,
        )  # fmt: skip
        for row, scan in enumerate(ids):
            for col, s in enumerate(p.samples):
                name = scan_png_name(int(scan), s, samples)
                save_png(out / name, rec.images_NS3HW[row, col])
                written.append({"scan": int(scan), "sample": s, "file": name})
        if rec.pooled_ND is not None:
            if pooled is None:
                pooled = np.full((len(voxels_NV), rec.pooled_ND.shape[1]), np.nan, dtype=np.float32)
            pooled[ids] = rec.pooled_ND.numpy()
        if on_progress is not None:
            on_progress(len(ids) * len(p.samples))
    seconds = time.perf_counter() - t0
    if pooled is not None:
        atomic_write(out / "pooled.npy", lambda tmp: np.save(tmp, pooled))
    written.sort(key=lambda w: (w["scan"], w["sample"]))
    report |= {"images": written, "pooled": None if pooled is None else "pooled.npy", "skipped": skipped}
    folder.report("complete", {**report, "seconds": round(seconds, 3)})
    return DecodeResult(len(good_ids), len(skipped), seconds)


def decode_labels(
    runner: DecodeBackend,
    labels: list[int],
    folder: RunFolder,
    sampling: SamplingConfig,
    samples: int,
    batch: int,
    source: dict[str, Path | None],
    on_progress: Progress | None = None,
) -> DecodeResult:
    """Images of class labels (class-conditional models: VAR) into ``folder``; ``source``: ckpt / engine paths."""
    import torch

    from mindhier_rt.io import save_png
    from mindhier_rt.pipeline import decode_passes, generate

    out = folder.path
    report: dict[str, Any] = {k: None if v is None else str(v) for k, v in source.items()}
    report |= {"class_labels": list(labels), "backend": runner.name, "sampling": sampling.to_dict()}
    report |= {"samples": samples, "batch": batch}
    folder.report("running", {**report, "images": []})
    written: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for p in decode_passes(len(labels), samples, batch):
        ids = torch.arange(p.scans.start, p.scans.stop)
        rec = generate(
            runner, torch.tensor(labels)[ids], sampling, samples=len(p.samples), scan_ids=ids,
            first_sample=p.samples.start,
        )  # fmt: skip
        for row, i in enumerate(ids.tolist()):
            for col, s in enumerate(p.samples):
                name = f"class{labels[i]:04d}_{i:03d}" + (f"_s{s}" if samples > 1 else "") + ".png"
                save_png(out / name, rec.images_NS3HW[row, col])
                written.append({"row": i, "class_label": labels[i], "sample": s, "file": name})
        if on_progress is not None:
            on_progress(len(ids) * len(p.samples))
    seconds = time.perf_counter() - t0
    written.sort(key=lambda w: (w["row"], w["sample"]))
    folder.report("complete", {**report, "images": written, "seconds": round(seconds, 3)})
    return DecodeResult(len(labels), 0, seconds)
