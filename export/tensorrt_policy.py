"""Build decisions that need no TensorRT: what the builder offers, the options, precision, the cache mode.

Precision
    TensorRT 11 networks are strongly typed: the precision is the one the casts in the ONNX carry, so
    ``--precision`` must match the bundle's export dtype (``mindhier-rt export --dtype float16`` for fp16).
    On TensorRT 10 a float32 bundle can still be built in fp16 / bf16 with the (weakly typed) builder
    flags; the plan's ``typing`` key says which route was taken.

Self-attention cache
    ``in_place`` where TensorRT has ``TensorScatter`` (``export/kv_step_graph.py``), ``ping_pong`` on older
    TensorRT (the exported concat graph; every scale copies the cache inside the engine and needs twice the
    memory), ``none`` for scale-local attention. ``build --kv-cache in-place|ping-pong`` overrides the choice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mindhier_rt.bundle import Manifest
from mindhier_rt.bundle import tensor_names as tn
from mindhier_rt.bundle.tensorrt_plan import SelfCache
from mindhier_rt.errors import ConfigError
from mindhier_rt.runtime.tensorrt_compat import version_tuple

TENSOR_SCATTER_MIN_VERSION = (10, 15)  # ONNX TensorScatter -> IKVCacheUpdateLayer in the TensorRT parser
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

Typing = Literal["strong", "weak"]


@dataclass(frozen=True)
class BuildEnvironment:
    """What the builder offers: versions, device and the features the decisions below depend on."""

    tensorrt_version: str
    gpu: str
    compute_capability: str
    weak_precisions: frozenset[str] = frozenset()  # precisions reachable by TensorRT 10's builder flags

    @property
    def has_tensor_scatter(self) -> bool:
        return version_tuple(self.tensorrt_version)[:2] >= TENSOR_SCATTER_MIN_VERSION


@dataclass(frozen=True)
class BuildOptions:
    precision: str | None = None  # fp32 / fp16 / bf16; None: the bundle's export dtype
    workspace_gib: float | None = None
    timing_cache: Path | None = None  # None: default_timing_cache(environment)
    version_compatible: bool = False
    self_cache: Literal["auto", "in_place", "ping_pong"] = "auto"
    scans: int | None = None  # None: the manifest's batch
    samples: int | None = None
    attention_plugin: bool = False  # the step's attention as the Triton plugin (export/attention_plugin.py)


def precision_of_dtype(dtype: str) -> str:
    return {v: k for k, v in PRECISIONS.items()}[dtype]


def choose_typing(bundle_dtype: str, precision: str, env: BuildEnvironment) -> Typing:
    """``strong`` when the ONNX already carries ``precision``; ``weak`` (TensorRT 10 flags) for a float32 bundle."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if PRECISIONS[precision] == bundle_dtype:
        return "strong"
    if bundle_dtype == "float32" and precision in env.weak_precisions:
        return "weak"
    raise ConfigError(
        f"--precision {precision} on a {bundle_dtype} bundle: TensorRT {env.tensorrt_version} builds strongly "
        f"typed networks, whose precision is the one the ONNX graphs carry; re-export with "
        f"`mindhier-rt export --dtype {PRECISIONS[precision]}` or build with --precision "
        f"{precision_of_dtype(bundle_dtype)}"
    )


def choose_self_cache(manifest: Manifest, env: BuildEnvironment, wanted: str = "auto") -> SelfCache:
    """in_place where TensorRT has TensorScatter, ping_pong otherwise; none for scale-local bundles."""
    has_past = any(s.name.startswith(tn.PAST_PREFIX) for s in manifest.graphs[tn.STEP_GRAPH].inputs)
    if not has_past:
        return "none"
    if wanted == "ping_pong":
        return "ping_pong"
    if env.has_tensor_scatter:
        return "in_place"
    if wanted == "in_place":
        raise ConfigError(
            f"--kv-cache in-place needs TensorRT >= {'.'.join(map(str, TENSOR_SCATTER_MIN_VERSION))} "
            f"(TensorScatter / IKVCacheUpdateLayer), this is {env.tensorrt_version}"
        )
    return "ping_pong"


def default_timing_cache(env: BuildEnvironment) -> Path:
    """Per TensorRT version and GPU architecture, under $XDG_CACHE_HOME (default ~/.cache)/mindhier-rt."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mindhier-rt"
    cc = env.compute_capability.replace(".", "")
    return root / f"timing-trt{env.tensorrt_version}-sm{cc}.cache"
