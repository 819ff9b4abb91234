"""A Triton Inference Server model repository for a bundle or checkpoint: what ``serve`` runs and ``export-triton``
writes for the stock ``tritonserver`` container.

    REPO/
      mindhier/config.pbtxt               Python backend, dynamic batcher, instance groups
      mindhier/1/model.py                 from mindhier_rt.serve.triton_model import TritonPythonModel
      mindhier_progressive/config.pbtxt   the same, decoupled (streams a preview after chosen scales)
      mindhier_progressive/1/model.py
      mindhier/bundle/                    with copy=True: the engine bundle, verified, so the repository is whole

Missing request settings take ``sampling_defaults`` (a model parameter: the bundle's recorded sampling settings).
Both models run the decode loop of ``mindhier_rt.pipeline`` on one backend (``onnxruntime`` or ``tensorrt`` for a
bundle, ``torch`` or ``torch-fast`` for a checkpoint): the graphs execute inside the Python model, in the backend's
own runtime, rather than as separate Triton models. Instances: ``instances`` per GPU listed in ``gpus`` (kind GPU),
or ``instances`` on the CPU when ``gpus`` is empty.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from mindhier_rt.errors import InputError
from mindhier_rt.io import atomic_write_text
from mindhier_rt.sampling import SamplingConfig
from mindhier_rt.serve.service import INPUTS, OUTPUTS, PROGRESSIVE_INPUTS, PROGRESSIVE_OUTPUTS, Limits

MODEL = "mindhier"
PROGRESSIVE_MODEL = "mindhier_progressive"
MODEL_PY = '''"""Triton Python-backend model: mindhier-rt's decode loop (mindhier_rt.serve.triton_model)."""
from mindhier_rt.serve.triton_model import TritonPythonModel  # noqa: F401
'''


@dataclass(frozen=True)
class RepositorySpec:
    """What the repository's models serve and how many of them run where."""

    engine: Path | None = None  # an engine bundle (onnxruntime, tensorrt) ...
    ckpt: Path | None = None  # ... or a checkpoint (torch, torch-fast)
    backend: str | None = None  # None: onnxruntime for a bundle, torch for a checkpoint
    max_batch: int = 8  # scans in one batch (Triton's batch axis): of one request, or of requests joined
    queue_delay_us: int = 2000  # how long the batcher waits to fill a batch
    instances: int = 1  # model instances per GPU (or on the CPU)
    gpus: tuple[int, ...] = ()  # GPU ids; empty: CPU instances
    limits: Limits = field(default_factory=lambda: Limits(max_scans=8))

    def __post_init__(self) -> None:
        if (self.engine is None) == (self.ckpt is None):
            raise InputError("give exactly one of --engine BUNDLE or --ckpt CKPT")
        if self.max_batch < 1 or self.instances < 1 or self.queue_delay_us < 0:
            raise InputError(
                f"max batch and instances must be >= 1 and the queue delay >= 0, got {self.max_batch}, "
                f"{self.instances}, {self.queue_delay_us}"
            )
        if self.limits.max_scans > self.max_batch:
            raise InputError(
                f"a request's scans ride on Triton's batch axis: max scans {self.limits.max_scans} > max batch "
                f"{self.max_batch}"
            )
        if any(g < 0 for g in self.gpus):
            raise InputError(f"GPU ids must be >= 0, got {list(self.gpus)}")


def gpu_ids(gpus: str | None, device: str) -> tuple[int, ...]:
    """The GPUs of the model instances: ``gpus`` ("0,1") if given, else the one of ``device`` (cpu: none)."""
    if gpus:
        try:
            return tuple(int(g) for g in gpus.split(","))
        except ValueError as e:
            raise InputError(f"--gpus takes GPU ids like 0,1; got {gpus!r}") from e
    kind, _, index = device.partition(":")
    if device == "cpu":
        return ()
    if kind != "cuda" or (index and not index.isdigit()):
        raise InputError(f"--device takes cpu, cuda or cuda:N; got {device!r}")
    return (int(index) if index else 0,)


def repository_spec(
    engine: Path | None,
    ckpt: Path | None,
    backend: str | None,
    device: str,
    gpus: str | None,
    max_batch: int,
    instances: int,
    max_samples: int,
) -> RepositorySpec:
    """The spec of ``serve`` / ``export-triton`` options; a request's scans ride on Triton's batch axis, which
    ``max_batch`` bounds."""
    limits = Limits(max_scans=max_batch, max_samples=max_samples, max_rows=max(max_samples, 16))
    return RepositorySpec(
        engine=engine, ckpt=ckpt, backend=backend, max_batch=max_batch, instances=instances,
        gpus=gpu_ids(gpus, device), limits=limits,
    )  # fmt: skip


def _dims(dims: list[int]) -> str:
    return "[ " + ", ".join(map(str, dims)) + " ]"


def _tensor_block(kind: str, specs: dict, optional: bool) -> str:
    entries = []
    for name, spec in specs.items():
        dtype, dims = spec[0], spec[1]
        lines = [f'    name: "{name}"', f"    data_type: {dtype}", f"    dims: {_dims(dims)}"]
        if optional and spec[2]:
            lines.append("    optional: true")
        entries.append("  {\n" + "\n".join(lines) + "\n  }")
    return f"{kind} [\n" + ",\n".join(entries) + "\n]"


def model_config(name: str, spec: RepositorySpec, source: dict[str, str], progressive: bool) -> str:
    """The ``config.pbtxt`` of one model (protobuf text format, as Triton reads it)."""
    inputs, outputs = (PROGRESSIVE_INPUTS, PROGRESSIVE_OUTPUTS) if progressive else (INPUTS, OUTPUTS)
    params = {**source, "max_scans": spec.limits.max_scans, "max_samples": spec.limits.max_samples,
              "max_rows": spec.limits.max_rows}  # fmt: skip
    if spec.gpus:
        group = f"  {{\n    count: {spec.instances}\n    kind: KIND_GPU\n    gpus: {_dims(list(spec.gpus))}\n  }}"
    else:
        group = f"  {{\n    count: {spec.instances}\n    kind: KIND_CPU\n  }}"
    parts = [
        f'name: "{name}"',
        'backend: "python"',
        f"max_batch_size: {spec.max_batch}",
        _tensor_block("input", inputs, optional=True),
        _tensor_block("output", outputs, optional=False),
        "instance_group [\n" + group + "\n]",
    ]
    if progressive:
        parts.append("model_transaction_policy {\n  decoupled: true\n}")
    else:  # progressive requests stream on their own; the others are batched
        parts.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {spec.queue_delay_us}\n}}")
    for key, value in params.items():
        parts.append(f'parameters {{\n  key: "{key}"\n  value: {{ string_value: {json.dumps(str(value))} }}\n}}')
    return "\n".join(parts) + "\n"


def write_repository(spec: RepositorySpec, out: Path, copy: bool) -> Path:
    """Write the repository into ``out`` (a new or empty folder). ``copy`` puts the bundle inside it (verified,
    referenced relatively: the folder can be moved or mounted into a container); otherwise the models reference
    the bundle or checkpoint by absolute path (what ``serve`` does)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} exists and is not an empty folder: choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    if spec.engine is not None:
        from mindhier_rt.bundle import Bundle

        bundle = Bundle.open(spec.engine)  # verified: a broken bundle is refused before anything is written
        sampling_defaults = bundle.spec.sampling
        if copy:  # inside a model's folder: Triton takes every top-level folder of a repository for a model
            bundle.copy_to(out / MODEL / "bundle")  # the listed files only, checked as they are copied
        source = {"engine": f"{MODEL}/bundle" if copy else str(Path(spec.engine).resolve())}
    else:
        sampling_defaults = SamplingConfig()
        if copy:
            (out / MODEL / "checkpoint").mkdir(parents=True)
            shutil.copy2(spec.ckpt, out / MODEL / "checkpoint" / Path(spec.ckpt).name)
        name = Path(spec.ckpt).name
        source = {"ckpt": f"{MODEL}/checkpoint/{name}" if copy else str(Path(spec.ckpt).resolve())}
    if spec.backend:
        source["backend"] = spec.backend
    source["sampling_defaults"] = json.dumps(sampling_defaults.to_dict())
    for name, progressive in ((MODEL, False), (PROGRESSIVE_MODEL, True)):
        (out / name / "1").mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / name / "config.pbtxt", model_config(name, spec, source, progressive))
        atomic_write_text(out / name / "1" / "model.py", MODEL_PY)
    return out
