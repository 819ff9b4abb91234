"""One way to open a decode backend from what a user names: a checkpoint or an engine bundle, and a backend name."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mindhier_rt.errors import InputError
from mindhier_rt.runtime.base import DecodeBackend

if TYPE_CHECKING:
    from mindhier_rt.models.mindhier import MindHier

BACKENDS = ("torch", "torch-fast", "onnxruntime", "tensorrt")
TORCH_BACKENDS = ("torch", "torch-fast")  # run models in memory (a checkpoint); the others run an engine bundle


def open_backend(
    ckpt: Path | None = None,
    engine: Path | None = None,
    backend: str | None = None,
    device: str = "cpu",
    vae: Path | None = None,
    context_map: str | None = None,
) -> DecodeBackend:
    """The backend that runs a checkpoint (``ckpt``, + ``vae`` for public generators: torch or torch-fast) or an
    engine bundle (``engine``: onnxruntime or tensorrt); ``backend`` None picks torch or onnxruntime. Used by
    ``decode``, ``profile`` and ``serve``. ``context_map`` overrides a checkpoint's context map (a bundle's is
    fixed at export: re-export it with ``--context-map``)."""
    if (ckpt is None) == (engine is None):
        raise InputError("give exactly one of --ckpt CKPT (PyTorch reference) or --engine BUNDLE (exported graphs)")
    if engine is not None and context_map is not None:
        raise InputError("--context-map applies to --ckpt; a bundle's map is fixed at export (export --context-map)")
    backend = backend or ("torch" if ckpt is not None else "onnxruntime")
    if backend in TORCH_BACKENDS:
        if ckpt is None:
            raise InputError(f"--backend {backend} runs a checkpoint: pass --ckpt instead of --engine")
        from mindhier_rt.importers import load_models

        load_device = device if backend == "torch" else "cpu"  # torch-fast casts its copy, then moves it
        return open_models(load_models(ckpt, vae, device=load_device, context_map=context_map), backend, device)
    if backend == "onnxruntime":
        if engine is None:
            raise InputError("--backend onnxruntime runs a bundle: export one and pass --engine BUNDLE")
        from mindhier_rt.runtime.onnxruntime_backend import OnnxRuntimeBackend

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else None
        return OnnxRuntimeBackend(engine, providers=providers)
    if backend == "tensorrt":
        if engine is None:
            raise InputError("--backend tensorrt runs a bundle: export it, `mindhier-rt build` it, pass --engine")
        from mindhier_rt.runtime.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(engine, device=device if device.startswith("cuda") else "cuda")
    raise InputError(f"unknown backend {backend!r}; choose torch, torch-fast, onnxruntime or tensorrt")


def open_models(models: MindHier, backend: str = "torch", device: str = "cpu") -> DecodeBackend:
    """The PyTorch backend (torch or torch-fast) of models already in memory: what ``open_backend`` does after
    loading a checkpoint, and what ``profile --preset`` runs its random-weight models on."""
    if backend == "torch":
        from mindhier_rt.runtime.torch_backend import TorchBackend

        return TorchBackend(models, device=device)
    if backend == "torch-fast":
        from mindhier_rt.runtime.torch_fast import FastTorchBackend

        return FastTorchBackend(models, device=device)
    raise InputError(f"--backend {backend} runs a bundle, not models in memory; choose {' or '.join(TORCH_BACKENDS)}")
