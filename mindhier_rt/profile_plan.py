"""What ``mindhier-rt profile`` runs: the backends its sources allow, opened through ``runtime.open``, and the report.

Sources: ``--preset`` (random-weight models of a preset, seed 0), ``--ckpt`` (a checkpoint) and ``--engine`` (an
engine bundle). torch and torch-fast run the weights; onnxruntime runs the bundle, or a bundle exported from the
weights first; tensorrt runs a bundle's built plans. Every backend is opened the way ``decode`` and ``serve``
open it (``open_backend``, or ``open_models`` for a preset's models in memory).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mindhier_rt.errors import InputError
from mindhier_rt.runtime.base import DecodeBackend
from mindhier_rt.runtime.open import BACKENDS, TORCH_BACKENDS, open_backend, open_models
from mindhier_rt.sampling import SamplingConfig

PROFILE_BACKENDS = BACKENDS


@dataclass(frozen=True)
class ProfileSources:
    preset: str | None = None
    ckpt: Path | None = None
    engine: Path | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {
            "preset": self.preset,
            "ckpt": None if self.ckpt is None else str(self.ckpt),
            "engine": None if self.engine is None else str(self.engine),
        }


def plan_backends(sources: ProfileSources, backend: str | None, export_dir: Path | None) -> list[str]:
    """Check the source/backend combination; return the backends to run, in order (``backend``: comma-separated,
    None: what the sources can run)."""
    flags = {"--engine": sources.engine, "--preset": sources.preset, "--ckpt": sources.ckpt}
    given = [flag for flag, value in flags.items() if value is not None]
    if not given:
        raise InputError("give --preset P (random weights), --ckpt CKPT or --engine BUNDLE")
    if sources.preset is not None and len(given) > 1:
        raise InputError(f"--preset builds its own random-weight models: do not combine it with {given[1]}")
    weights = sources.preset is not None or sources.ckpt is not None
    if backend is None:
        names = ["torch"] if weights else []
        names += ["onnxruntime"] if sources.engine is not None else []
    else:
        names = [b.strip() for b in backend.split(",") if b.strip()]
    unknown = [b for b in names if b not in PROFILE_BACKENDS]
    if unknown or not names:
        raise InputError(
            f"unknown backend {', '.join(unknown) or backend!r}; choose from {', '.join(PROFILE_BACKENDS)}"
        )
    if len(set(names)) != len(names):
        raise InputError(f"--backend lists a backend twice: {backend}")
    for name in TORCH_BACKENDS:
        if name in names and not weights:
            raise InputError(f"--backend {name} needs PyTorch weights: pass --ckpt CKPT or --preset P")
    if "tensorrt" in names and sources.engine is None:
        raise InputError("--backend tensorrt runs built plans: pass --engine BUNDLE (export, then `mindhier-rt build`)")
    if export_dir is not None and (sources.engine is not None or "onnxruntime" not in names):
        raise InputError("--export-dir is where the onnxruntime bundle is exported; it needs --preset or --ckpt")
    return names


def _models(sources: ProfileSources) -> Any:
    """The weights of a preset (random, seed 0) or a checkpoint, in memory."""
    if sources.preset is not None:
        from mindhier_rt.config import preset
        from mindhier_rt.models.mindhier import MindHier

        return MindHier.from_config(preset(sources.preset), seed=0)
    from mindhier_rt.importers import load_models

    assert sources.ckpt is not None
    return load_models(sources.ckpt)


@contextlib.contextmanager
def open_profile_backends(
    sources: ProfileSources,
    names: list[str],
    device: str,
    batch: int,
    samples: int,
    export_dir: Path | None = None,
    on_export: Callable[[Path], None] | None = None,
) -> Iterator[list[DecodeBackend]]:
    """The backends ``names`` on ``sources``, for the length of the block. onnxruntime without ``--engine`` runs
    a bundle exported from the weights into ``export_dir`` (default: a temporary folder, removed afterwards);
    ``on_export`` is told where before the export starts. InputError if the sources hold different models."""
    with contextlib.ExitStack() as stack:
        bundle = sources.engine
        if "onnxruntime" in names and bundle is None:
            from mindhier_rt.export.onnx_export import export_bundle

            bundle = export_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mindhier-rt-")))
            if on_export is not None:
                on_export(bundle)
            source = str(sources.ckpt or sources.preset)
            export_bundle(_models(sources), bundle, batch=batch, samples=samples, source=source)
        runners = []
        for name in names:
            if name in TORCH_BACKENDS and sources.preset is not None:
                runners.append(open_models(_models(sources), name, device))
            elif name in TORCH_BACKENDS:
                runners.append(open_backend(ckpt=sources.ckpt, backend=name, device=device))
            else:
                runners.append(open_backend(engine=bundle, backend=name, device=device))
        if any(r.cfg != runners[0].cfg for r in runners):
            raise InputError(
                f"the checkpoint and {sources.engine} hold different model configs: profile them separately"
            )
        if runners[0].cfg.encoder is None:
            raise InputError(f"profile times fMRI decoding; model {runners[0].cfg.name} has no fMRI encoder")
        yield runners


def profile_report(
    machine: dict[str, Any],
    sources: ProfileSources,
    names: list[str],
    results: list[dict[str, Any]],
    subject: str,
    batch: int,
    samples: int,
    repeats: int,
    warmup: int,
    seed: int,
    sampling: SamplingConfig,
    device: str,
) -> dict[str, Any]:
    """The JSON that ``profile --json`` writes: machine, settings, per-backend results, end-to-end medians."""
    medians = end_to_end_medians(results)
    return {
        "machine": machine,
        "settings": {
            "source": sources.to_dict(),
            "config": results[0]["config"],
            "backends": names,
            "subject": subject,
            "batch": batch,
            "samples": samples,
            "repeats": repeats,
            "warmup": warmup,
            "seed": seed,
            "sampling": sampling.to_dict(),
            "device": device,
        },
        "results": results,
        "end_to_end_median_ms": medians,
        "ratio_onnxruntime_over_torch": onnxruntime_over_torch(medians),
    }


def end_to_end_medians(results: list[dict[str, Any]]) -> dict[str, float]:
    return {r["backend"]: r["end_to_end"]["median_ms"] for r in results}


def onnxruntime_over_torch(medians: dict[str, float]) -> float | None:
    """onnxruntime's end-to-end median over torch's, when both ran."""
    return medians["onnxruntime"] / medians["torch"] if {"torch", "onnxruntime"} <= medians.keys() else None
