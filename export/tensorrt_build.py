"""``mindhier-rt build --engine BUNDLE``: TensorRT plans next to the bundle's ONNX graphs, recorded in its manifest.

The decisions are made elsewhere, without TensorRT: the profiles and the binding plan (``tensorrt_plan.py``),
the in-place cache graph (``kv_step_graph.py``), precision and cache mode (``tensorrt_policy.py``). This module
holds the builder (one lazy TensorRT import; ``HAS_TENSORRT`` is detected once, at import) and ``build_plans``,
which builds every decode graph and rewrites the manifest.

``manifest.json`` after a build (keys beside the ones ``export`` writes)
    ``plans``: ``{graph_name: {...}}`` for every graph the decode loop runs, each with
        ``file``                plan file name, relative to the bundle
        ``profiles``            one dict per optimization profile: ``{input_name: {"min": [...], "opt": [...],
                                "max": [...]}}`` (``generator_step`` / ``generator_step_kv``: index = scale)
        ``onnx``                the graph the plan was built from
        ``attention``           ``onnx`` or ``plugin`` (``--attention-plugin``)
        ``precision``           ``fp32`` / ``fp16`` / ``bf16``
        ``typing``              ``strong`` (precision from the ONNX) or ``weak`` (TensorRT 10 builder flag)
        ``tensorrt_version``    ``tensorrt.__version__`` of the builder
        ``gpu``                 the device name the plan was built (and timed) on
        ``compute_capability``  ``"major.minor"`` of that device; a plan runs only on the same one
        ``flags``               builder options that matter at load time: ``version_compatible``
        ``workspace_bytes``     the workspace limit given, or null (TensorRT's default: the device memory)
        ``build_seconds``       wall time of the build
    ``tensorrt``: the decode plan every host executes (``mindhier_rt/bundle/tensorrt_plan.py``).
    ``graphs.generator_step_kv`` (in-place mode): the derived graph's entry, like ``export``'s entries (``file``,
        ``inputs``, ``outputs``, ``external_data`` = the step's weight file) plus ``derived_from`` and ``opset``.
    ``versions.tensorrt``: the builder's TensorRT version.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mindhier_rt.bundle import Bundle, GraphSpec, write_manifest
from mindhier_rt.bundle import tensor_names as tn
from mindhier_rt.errors import BackendError, ConfigError, MissingDependencyError
from mindhier_rt.export.attention_plugin import PLUGIN_SUFFIX, derive_plugin_graph, register_plugin
from mindhier_rt.export.kv_step_graph import derive_kv_step_graph
from mindhier_rt.export.tensorrt_plan import Profile, binding_plan, plan_profiles, row_counts, with_graph
from mindhier_rt.export.tensorrt_policy import (
    BuildEnvironment,
    BuildOptions,
    SelfCache,
    Typing,
    choose_self_cache,
    choose_typing,
    precision_of_dtype,
)
from mindhier_rt.io import atomic_write_bytes
from mindhier_rt.runtime.tensorrt_compat import INSTALL_TENSORRT

if TYPE_CHECKING:  # the published type stubs (tests/test_tensorrt_types.py checks this module against them)
    import tensorrt as trt_api

log = logging.getLogger(__name__)

__all__ = [
    "HAS_TENSORRT",
    "BuildOptions",
    "BuildReport",
    "PlanBuilder",
    "TensorRTPlanBuilder",
    "build_plans",
    "default_timing_cache",
    "require_tensorrt",
]

PLAN_SUFFIX = ".plan"


def _detect_tensorrt() -> tuple[Any, str | None]:
    """The ``tensorrt`` module and None, or None and why it is missing (checked once, at import)."""
    try:
        import tensorrt
    except ImportError as e:
        return None, str(e)
    except OSError as e:  # the bindings are there but libnvinfer or the CUDA runtime is not
        return None, f"the TensorRT libraries failed to load: {e}"
    return tensorrt, None


_TENSORRT, _TENSORRT_MISSING = _detect_tensorrt()
HAS_TENSORRT = _TENSORRT is not None


def require_tensorrt() -> Any:
    """The ``tensorrt`` module, or MissingDependencyError saying how to install it."""
    if _TENSORRT is None:
        raise MissingDependencyError(f"TensorRT is not installed ({_TENSORRT_MISSING}): {INSTALL_TENSORRT}")
    return _TENSORRT


def default_timing_cache(env: BuildEnvironment) -> Path:
    """Per TensorRT version and GPU architecture, under $XDG_CACHE_HOME (default ~/.cache)/mindhier-rt."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mindhier-rt"
    cc = env.compute_capability.replace(".", "")
    return root / f"timing-trt{env.tensorrt_version}-sm{cc}.cache"


class PlanBuilder(Protocol):
    """What ``build_plans`` needs from a builder; tests pass a double that writes fake plans."""

    def environment(self) -> BuildEnvironment: ...

    def build(
        self,
        graph: str,
        onnx_path: Path,
        profiles: list[Profile],
        typing: Typing,
        precision: str,
        options: BuildOptions,
    ) -> bytes: ...

    def finish(self) -> None:
        """Called once after the last graph (persist the timing cache)."""
        ...


def gpu_properties() -> tuple[str, str] | None:
    """(device name, "major.minor") of CUDA device 0 via torch or cuda-python; None without a GPU."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return torch.cuda.get_device_name(0), f"{major}.{minor}"
    except ImportError:
        pass
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            return None
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or not count:
        return None
    err, prop = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        return None
    name = prop.name
    name = name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)
    return name, f"{prop.major}.{prop.minor}"


def require_gpu(what: str) -> tuple[str, str]:
    props = gpu_properties()
    if props is None:
        raise MissingDependencyError(
            f"{what} needs a CUDA GPU and none is visible here (no device, no driver, or a CPU-only torch "
            f"without cuda-python): run on a machine with an NVIDIA GPU and its driver"
        )
    return props


def _parser_error(error: Any) -> str:
    """One IParserError as text: its node, operator and description where the binding offers them."""
    parts = []
    for attr in ("node_name", "node_operator", "desc"):
        fn = getattr(error, attr, None)
        if callable(fn):
            with contextlib.suppress(Exception):
                parts.append(str(fn()))
    return ": ".join(p for p in parts if p) or str(error)


class TensorRTPlanBuilder:
    """``PlanBuilder`` on TensorRT 10 / 11: ONNX parser, strongly typed networks, a shared timing cache."""

    def __init__(self, timing_cache: Path | None = None, log_level: str = "WARNING") -> None:
        trt = require_tensorrt()
        self.trt = trt
        name, cc = require_gpu("building TensorRT plans")
        weak = frozenset(p for p, flag in (("fp16", "FP16"), ("bf16", "BF16")) if hasattr(trt.BuilderFlag, flag))
        self.env = BuildEnvironment(trt.__version__, name, cc, weak)
        self.logger: trt_api.Logger = trt.Logger(getattr(trt.Logger, log_level))
        self.builder: trt_api.Builder = trt.Builder(self.logger)
        self.timing_cache_path = timing_cache or default_timing_cache(self.env)
        blob = self.timing_cache_path.read_bytes() if self.timing_cache_path.is_file() else b""
        self._cache_config: trt_api.IBuilderConfig = self.builder.create_builder_config()
        self.timing_cache: trt_api.ITimingCache = self._cache_config.create_timing_cache(blob)
        log.info("timing cache %s (%d bytes)", self.timing_cache_path, len(blob))

    def environment(self) -> BuildEnvironment:
        return self.env

    def build(
        self,
        graph: str,
        onnx_path: Path,
        profiles: list[Profile],
        typing: Typing,
        precision: str,
        options: BuildOptions,
    ) -> bytes:
        trt = self.trt
        flags = 0
        strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if typing == "strong" and strongly_typed is not None:
            flags |= 1 << int(strongly_typed)  # TensorRT 10; on 11 every network is strongly typed
        network: trt_api.INetworkDefinition = self.builder.create_network(flags)
        if options.attention_plugin and onnx_path.name.endswith(f"{PLUGIN_SUFFIX}.onnx"):
            major, minor = (int(x) for x in self.env.compute_capability.split("."))
            register_plugin((major, minor))  # before parsing: the parser looks the plugin up by name
        parser: trt_api.OnnxParser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(_parser_error(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors}")
        config: trt_api.IBuilderConfig = self.builder.create_builder_config()
        if options.workspace_gib is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 2**30))
        config.set_timing_cache(self.timing_cache, False)
        if typing == "weak" and precision != "fp32":
            config.set_flag(getattr(trt.BuilderFlag, precision.upper()))
        if options.version_compatible:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        for shapes in profiles:
            profile: trt_api.IOptimizationProfile = self.builder.create_optimization_profile()
            for name, s in shapes.items():
                low, opt, high = (trt.Dims(s[k]) for k in ("min", "opt", "max"))  # the stubs type these as Dims
                profile.set_shape(name, low, opt, high)
            config.add_optimization_profile(profile)
        serialized = self.builder.build_serialized_network(network, config)
        if serialized is None:
            raise BackendError(f"TensorRT failed to build {graph} (its log above says why)")
        self._save_cache()  # after every graph: an interrupted build keeps what it timed
        return bytes(memoryview(serialized))

    def _save_cache(self) -> None:
        blob = bytes(memoryview(self.timing_cache.serialize()))
        self.timing_cache_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.timing_cache_path, blob)

    def finish(self) -> None:
        self._save_cache()


# ---- build_plans -----------------------------------------------------------------------------------------
def _build_input(bundle: Bundle, entry: GraphSpec, onnx_file: str) -> Path:
    """The ONNX path handed to TensorRT's parser (it reads paths, with external data beside them): a listed file
    and its weight file are hashed just before; a graph this build derived (not listed yet) is used as written."""
    if onnx_file not in bundle.spec.files:
        return bundle.path(onnx_file)
    if entry.external_data is not None:
        bundle.checked_path(entry.external_data)
    return bundle.checked_path(onnx_file)


@dataclass
class BuildReport:
    bundle: Bundle
    plans: dict[str, dict[str, Any]] = field(default_factory=dict)
    self_cache: SelfCache = "none"
    seconds: float = 0.0


def build_plans(
    bundle: Bundle | str | Path,
    options: BuildOptions | None = None,
    builder: PlanBuilder | None = None,
    on_graph: Callable[[str, int, int], None] | None = None,
) -> BuildReport:
    """Build a plan per decode graph next to the ONNX graphs and rewrite the manifest (see the docstring).

    Plans are written into a temporary folder first and moved in only when every graph has been built,
    so a failed build leaves the bundle as it was. ``on_graph(name, index, count)`` reports progress.
    """
    options = options or BuildOptions()
    builder = builder or TensorRTPlanBuilder(options.timing_cache)
    env = builder.environment()
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    spec = bundle.spec
    precision = options.precision or precision_of_dtype(spec.dtype)
    typing = choose_typing(spec.dtype, precision, env)
    if options.workspace_gib is not None and options.workspace_gib <= 0:
        raise ConfigError(f"--workspace-gib must be > 0, got {options.workspace_gib}")
    rows = row_counts(spec, options.scans, options.samples)
    self_cache = choose_self_cache(spec, env, options.self_cache)
    had_kv_graph = tn.KV_STEP_GRAPH in spec.graphs
    graphs = {name: g for name, g in spec.graphs.items() if name != tn.KV_STEP_GRAPH}
    kv_file = bundle.path(f"{tn.KV_STEP_GRAPH}.onnx")
    if self_cache == "in_place":
        graphs[tn.KV_STEP_GRAPH] = derive_kv_step_graph(bundle)  # deterministic: rewriting a listed one changes nothing
    spec = with_graph(spec, graphs[tn.KV_STEP_GRAPH]) if self_cache == "in_place" else spec
    step_graph = tn.KV_STEP_GRAPH if self_cache == "in_place" else tn.STEP_GRAPH
    plan = binding_plan(spec, rows, step_graph, options.version_compatible)

    staging = bundle.root / ".plans-building"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    report = BuildReport(bundle, self_cache=self_cache)
    plugin_files: list[str] = []
    t_all = time.perf_counter()
    done = False
    try:
        for k, graph in enumerate(plan.graphs):
            if on_graph is not None:
                on_graph(graph, k, len(plan.graphs))
            profiles = plan_profiles(spec, graph, rows)
            log.info("building %s (%d profile(s), %s, %s typing)", graph, len(profiles), precision, typing)
            onnx_file = graphs[graph].file
            if options.attention_plugin and graph == step_graph:
                onnx_file = derive_plugin_graph(bundle, graphs[graph], bundle.cfg.generator.head_dim).name
                plugin_files.append(onnx_file)
            t0 = time.perf_counter()
            blob = builder.build(
                graph, _build_input(bundle, graphs[graph], onnx_file), profiles, typing, precision, options
            )
            seconds = time.perf_counter() - t0
            file = f"{graph}{PLAN_SUFFIX}"
            atomic_write_bytes(staging / file, blob)
            report.plans[graph] = {
                "file": file,
                "profiles": profiles,
                "onnx": onnx_file,
                "attention": "plugin" if onnx_file in plugin_files else "onnx",
                "precision": precision,
                "typing": typing,
                "tensorrt_version": env.tensorrt_version,
                "gpu": env.gpu,
                "compute_capability": env.compute_capability,
                "flags": ["version_compatible"] if options.version_compatible else [],
                "workspace_bytes": None if options.workspace_gib is None else int(options.workspace_gib * 2**30),
                "build_seconds": round(seconds, 3),
            }
            log.info("built %s in %.1f s (%.1f MB)", graph, seconds, len(blob) / 1e6)
        builder.finish()
        for stale in bundle.root.glob(f"*{PLAN_SUFFIX}"):
            stale.unlink()
        for path in staging.iterdir():
            path.replace(bundle.root / path.name)
        if self_cache != "in_place" and kv_file.exists():
            kv_file.unlink()
        done = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not done and self_cache == "in_place" and not had_kv_graph:
            kv_file.unlink(missing_ok=True)  # a failed build leaves the bundle as it was
        for stale in bundle.root.glob(f"*{PLUGIN_SUFFIX}.onnx"):
            if not done or stale.name not in plugin_files:
                stale.unlink()
    report.seconds = time.perf_counter() - t_all
    doc = {k: v for k, v in bundle.manifest.items() if k not in ("format", "format_version", "files")}
    doc["graphs"] = {name: g.to_dict() for name, g in graphs.items()}
    doc["plans"] = report.plans
    doc["tensorrt"] = plan.to_dict()
    doc["versions"] = {**doc.get("versions", {}), "tensorrt": env.tensorrt_version}
    write_manifest(bundle.root, doc)
    report.bundle = Bundle.open(bundle.root)
    return report
