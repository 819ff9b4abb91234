"""TensorRT plans for an engine bundle: what to build (pure planning, no TensorRT needed) and the build.

``mindhier-rt build --engine BUNDLE`` turns the bundle's ONNX graphs into TensorRT plans next to them
and records them in ``manifest.json``. Everything that can be decided without TensorRT is plain Python
here and tested on CPU: the optimization profiles of every graph, the binding table (which device
buffer, at which byte offset, every tensor of every profile lives in), the block-causal step variant
with an in-place self-attention cache, the precision rules and the load-time checks of plan metadata.
The TensorRT calls sit behind one lazy import (``HAS_TENSORRT`` is detected once, at import).

Profiles
    ``generator_step`` is one graph for every scale: its plan has one optimization profile per scale,
    profile index = scale index, each with min = opt = max (the scale's token count, past length and the
    built row count), so all scales share one copy of the weights. ``context``, ``update_<i>`` and
    ``vq_decoder`` have one static profile each. ``encoder_<subject>`` has one profile with rows from 1 to
    the scan count (it runs on the scans and on one all-zero null scan). Row counts come from the
    manifest's ``batch`` (or ``--batch`` / ``--samples`` at build time): ``rows`` = scans x samples,
    doubled with guidance, for ``context`` and the step; scans x samples for the updates and the decoder.
    A decode with fewer rows pads up to the built count (rows are independent); more rows is an error.

Precision
    TensorRT 11 networks are strongly typed: the precision is the one the casts in the ONNX carry, so
    ``--precision`` must match the bundle's export dtype (``mindhier-rt export --dtype float16`` for fp16).
    On TensorRT 10 a float32 bundle can still be built in fp16 / bf16 with the (weakly typed) builder
    flags; the plan's ``typing`` key says which route was taken.

Self-attention cache (block-causal mode)
    ``in_place``: where TensorRT's ONNX parser has ``TensorScatter`` (TensorRT >= 10.15, where it becomes an
    ``IKVCacheUpdateLayer``), the build derives ``generator_step_kv.onnx`` from ``generator_step.onnx``:
    ``past_key_values.{j}.key/value`` become preallocated caches [rows, H, L, c], each ``Concat(past, new)``
    becomes ``TensorScatter(cache, new, write_indices)`` (opset 24) whose output ``present.{j}.*`` TensorRT
    aliases to the cache input (one device buffer, updated in place), and every self-attention softmax gets
    a key mask ``position < write_index + tokens`` (keys past the scale are stale or zero). It shares the
    weight file of ``generator_step`` and is checked against it with onnxruntime (tests/test_tensorrt.py).
    We use the standard ``TensorScatter`` rather than TensorRT's ``TRT_KVCacheUpdate`` custom op: the parser
    maps both to the same layer, and onnxruntime runs the standard one, so the variant is checked on CPU.
    ``build --kv-cache in-place|ping-pong`` overrides the choice.
    ``ping_pong``: older TensorRT keeps the exported concat graph; ``present`` of scale i is written into
    the second of two buffers per cache and bound as ``past`` of scale i + 1, so nothing is copied on the
    host, but every scale copies the cache inside the engine (the concat) and needs twice the memory.
    ``none``: scale-local attention has no self cache.

``manifest.json`` after a build (keys beside the ones ``export`` writes)
    ``plans``: ``{graph_name: {...}}`` for every graph the decode loop runs, each with
        ``file``                plan file name, relative to the bundle
        ``profiles``            one dict per optimization profile: ``{input_name: {"min": [...], "opt": [...],
                                "max": [...]}}`` (``generator_step`` / ``generator_step_kv``: index = scale)
        ``onnx``                the graph the plan was built from
        ``precision``           ``fp32`` / ``fp16`` / ``bf16``
        ``typing``              ``strong`` (precision from the ONNX) or ``weak`` (TensorRT 10 builder flag)
        ``tensorrt_version``    ``tensorrt.__version__`` of the builder
        ``gpu``                 the device name the plan was built (and timed) on
        ``compute_capability``  ``"major.minor"`` of that device; a plan runs only on the same one
        ``flags``               builder options that matter at load time: ``version_compatible``
        ``workspace_bytes``     the workspace limit given, or null (TensorRT's default: the device memory)
        ``build_seconds``       wall time of the build
    ``tensorrt``: how a host runs the plans (the C++ host reads the same):
        ``step_graph``          ``generator_step`` or ``generator_step_kv``
        ``self_cache``          ``none`` / ``in_place`` / ``ping_pong`` (see above)
        ``rows``                ``{"scans", "samples", "guided", "rows", "sample_rows"}`` the plans were built for
        ``alignment``           byte alignment of every binding (256)
        ``buffers``             ``{buffer_name: bytes}``: the device buffers to allocate once
        ``bindings``            ``{graph_name: [{"name", "input", "dtype", "buffer", "shapes": [per profile],
                                "offsets": [bytes per profile], "copy_from": null or [[buffer, offset], ...]}]}``
                                an input with ``copy_from`` is copied (per profile) from that buffer and offset
                                before the run instead of being bound in place (misaligned segments only)
        ``rope_layout``         ``[[first_row, rows, byte_offset], ...]`` per scale: where the rows of
                                ``rope_cos.npy`` / ``rope_sin.npy`` go in the ``table.rope_*`` buffers
        ``segment_layout``      the same for the int64 table ``cross_segment.npy`` in ``table.cross_segment``
                                (``context_map`` reference-pipeline: the step's input ``cross.segment``; its
                                ``cross.*`` inputs then bind the whole context output, offset 0, every scale)
        ``write_indices``       in-place mode: the int64 table ``table.write_indices`` holds, per scale, the
                                scale's offset repeated for every row, at ``scale * stride`` bytes
        ``version_compatible``  whether the plans were built version compatible
    ``graphs.generator_step_kv`` (in-place mode): the derived graph's entry, like ``export``'s entries (``file``,
        ``inputs``, ``outputs``, ``external_data`` = the step's weight file) plus ``derived_from`` and ``opset``.
    ``versions.tensorrt``: the builder's TensorRT version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from mindhier_rt.bundle import Bundle, write_manifest
from mindhier_rt.errors import BackendError, ConfigError, MissingDependencyError
from mindhier_rt.export.attention_plugin import (
    PLUGIN_SUFFIX,
    derive_plugin_graph,
    load_graph_structure,
    register_plugin,
)
from mindhier_rt.io import atomic_write_bytes

log = logging.getLogger(__name__)

__all__ = [
    "HAS_TENSORRT",
    "KV_GRAPH",
    "BuildEnvironment",
    "BuildOptions",
    "DecodePlan",
    "PlanMismatchError",
    "RowCounts",
    "RuntimeEnvironment",
    "TensorRTPlanBuilder",
    "binding_plan",
    "build_plans",
    "check_plan_metadata",
    "choose_self_cache",
    "choose_typing",
    "derive_kv_step_graph",
    "plan_profiles",
    "require_tensorrt",
    "row_counts",
]


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

INSTALL_TENSORRT = (
    "install TensorRT 10 or 11 for your CUDA version, e.g. `pip install tensorrt-cu12` (NVIDIA's wheels; the "
    "builder is not on every package index), or run on a machine that has it"
)

KV_GRAPH = "generator_step_kv"
STEP_GRAPH = "generator_step"
ALIGNMENT = 256  # byte alignment of every tensor address bound to TensorRT
TENSOR_SCATTER_MIN_VERSION = (10, 15)  # ONNX TensorScatter -> IKVCacheUpdateLayer in the TensorRT parser
KV_OPSET = 24  # TensorScatter is an opset-24 operator
PLAN_SUFFIX = ".plan"
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "bool": 1, "uint8": 1}

SelfCache = Literal["none", "in_place", "ping_pong"]
Typing = Literal["strong", "weak"]


class PlanMismatchError(BackendError):
    """A plan that cannot run here: other TensorRT version, other GPU architecture, missing or altered."""


def require_tensorrt() -> Any:
    """The ``tensorrt`` module, or MissingDependencyError saying how to install it."""
    if _TENSORRT is None:
        raise MissingDependencyError(f"TensorRT is not installed ({_TENSORRT_MISSING}): {INSTALL_TENSORRT}")
    return _TENSORRT


def version_tuple(version: str) -> tuple[int, ...]:
    """``"10.15.1.29"`` -> (10, 15, 1, 29); non-numeric parts end the tuple."""
    out = []
    for part in version.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits or digits != part:
            if digits and part.startswith(digits):
                out.append(int(digits))
            break
        out.append(int(digits))
    return tuple(out)


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


# ---- rows and profiles -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowCounts:
    """Batch rows the plans are built for."""

    scans: int
    samples: int
    guided: bool

    @property
    def sample_rows(self) -> int:
        """Rows of the VQ updates and the decoder: scans x samples."""
        return self.scans * self.samples

    @property
    def rows(self) -> int:
        """Rows of the context step and the generator step: scans x samples, doubled with guidance."""
        return self.sample_rows * (2 if self.guided else 1)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "rows": self.rows, "sample_rows": self.sample_rows}


def row_counts(manifest: dict[str, Any], scans: int | None = None, samples: int | None = None) -> RowCounts:
    """Rows from the manifest's ``batch`` (what ``export --batch --samples`` recorded), optionally overridden."""
    batch = manifest["batch"]
    scans = batch["scans"] if scans is None else scans
    samples = batch["samples"] if samples is None else samples
    if scans < 1 or samples < 1:
        raise ConfigError(f"scans and samples must be >= 1, got {scans} and {samples}")
    guided = batch["rows"] == 2 * batch["scans"] * batch["samples"]
    return RowCounts(scans, samples, guided)


def graph_role(name: str) -> str:
    """encoder / context / step / update / decoder."""
    if name.startswith("encoder_"):
        return "encoder"
    if name in (STEP_GRAPH, KV_GRAPH):
        return "step"
    if name.startswith("update_"):
        return "update"
    if name == "vq_decoder":
        return "decoder"
    if name == "context":
        return "context"
    raise ConfigError(f"unknown graph {name!r} in the bundle")


def n_profiles(manifest: dict[str, Any], graph: str) -> int:
    return len(manifest["scales"]) if graph_role(graph) == "step" else 1


def graph_symbols(manifest: dict[str, Any], graph: str, profile: int, rows: RowCounts) -> dict[str, int]:
    """Values of the symbolic axes of ``graph`` under ``profile`` (max shapes for the encoder)."""
    role = graph_role(graph)
    if role == "encoder":
        return {"rows": rows.scans}
    if role in ("update", "decoder"):
        return {"rows": rows.sample_rows}
    if role == "context":
        return {"rows": rows.rows}
    scale = manifest["scales"][profile]
    return {"rows": rows.rows, "tokens": scale["tokens"], "past": scale["past"]}


def resolve_dim(dim: int | str, symbols: dict[str, int]) -> int:
    """A manifest dim: an int, a symbol (``rows``) or a sum of symbols and ints (``past + tokens``)."""
    if isinstance(dim, int):
        return dim
    total = 0
    for term in str(dim).split("+"):
        term = term.strip()
        if term.isdigit():
            total += int(term)
        elif term in symbols:
            total += symbols[term]
        else:
            raise ConfigError(f"axis {dim!r}: unknown symbol {term!r} (known: {', '.join(symbols)})")
    return total


def tensor_shape(spec: dict[str, Any], symbols: dict[str, int]) -> tuple[int, ...]:
    return tuple(resolve_dim(d, symbols) for d in spec["shape"])


def plan_profiles(manifest: dict[str, Any], graph: str, rows: RowCounts) -> list[dict[str, dict[str, list[int]]]]:
    """The optimization profiles of ``graph``: ``[{input_name: {"min", "opt", "max"}}]`` (see the docstring)."""
    entry = manifest["graphs"][graph]
    profiles = []
    for p in range(n_profiles(manifest, graph)):
        symbols = graph_symbols(manifest, graph, p, rows)
        shapes: dict[str, dict[str, list[int]]] = {}
        for spec in entry["inputs"]:
            full = list(tensor_shape(spec, symbols))
            low = full
            if graph_role(graph) == "encoder":
                low = [1 if d == "rows" else n for d, n in zip(spec["shape"], full, strict=True)]
            shapes[spec["name"]] = {"min": low, "opt": full, "max": full}
        profiles.append(shapes)
    return profiles


# ---- binding tables ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Binding:
    """Where one tensor of one graph lives in every profile: buffer name and byte offset per profile."""

    name: str
    is_input: bool
    dtype: str
    shapes: tuple[tuple[int, ...], ...]
    buffer: tuple[str, ...]
    offsets: tuple[int, ...]
    copy_from: tuple[tuple[str, int], ...] | None = None  # per profile: copied in from (buffer, offset)

    def nbytes(self, profile: int) -> int:
        return math.prod(self.shapes[profile]) * ITEMSIZE[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input": self.is_input,
            "dtype": self.dtype,
            "buffer": list(self.buffer),
            "shapes": [list(s) for s in self.shapes],
            "offsets": list(self.offsets),
            "copy_from": None if self.copy_from is None else [list(c) for c in self.copy_from],
        }


@dataclass
class DecodePlan:
    """Everything a host needs to bind the plans: rows, cache mode, buffers and per-graph bindings."""

    rows: RowCounts
    self_cache: SelfCache
    step_graph: str
    graphs: list[str]
    bindings: dict[str, dict[str, Binding]]
    buffers: dict[str, int]
    rope_layout: list[tuple[int, int, int]]
    write_indices_stride: int | None = None
    segment_layout: list[tuple[int, int, int]] = field(default_factory=list)

    def binding(self, graph: str, name: str) -> Binding:
        return self.bindings[graph][name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "step_graph": self.step_graph,
            "self_cache": self.self_cache,
            "rows": self.rows.to_dict(),
            "alignment": ALIGNMENT,
            "buffers": dict(self.buffers),
            "bindings": {g: [b.to_dict() for b in table.values()] for g, table in self.bindings.items()},
            "rope_layout": [list(r) for r in self.rope_layout],
            "segment_layout": [list(r) for r in self.segment_layout],
            "write_indices": None
            if self.write_indices_stride is None
            else {"buffer": "table.write_indices", "stride": self.write_indices_stride, "dtype": "int64"},
        }


def decode_graphs(manifest: dict[str, Any], step_graph: str) -> list[str]:
    """The graphs the decode loop runs, in build order (the step first: the longest build)."""
    graphs = manifest["graphs"]
    encoders = sorted(g for g in graphs if g.startswith("encoder_"))
    updates = [f"update_{i}" for i in range(len(manifest["scales"]))]
    return [step_graph, "context", *encoders, *updates, "vq_decoder"]


def binding_plan(manifest: dict[str, Any], rows: RowCounts, step_graph: str = STEP_GRAPH) -> DecodePlan:
    """Assign every tensor of every decode graph to a device buffer (see the module docstring)."""
    graphs = manifest["graphs"]
    if step_graph not in graphs:
        raise ConfigError(f"the bundle has no graph {step_graph!r}")
    scales = manifest["scales"]
    K = len(scales)
    in_place = step_graph == KV_GRAPH
    has_past = any(s["name"].startswith("past_key_values.") for s in graphs[step_graph]["inputs"])
    self_cache: SelfCache = "in_place" if in_place else ("ping_pong" if has_past else "none")
    need: dict[str, int] = {}
    tables: dict[str, dict[str, Binding]] = {}

    def shapes_of(graph: str, spec: dict[str, Any]) -> tuple[tuple[int, ...], ...]:
        return tuple(
            tensor_shape(spec, graph_symbols(manifest, graph, p, rows)) for p in range(n_profiles(manifest, graph))
        )

    def add(graph: str, spec: dict[str, Any], is_input: bool, buffers, offsets, copy_from=None) -> None:
        shapes = shapes_of(graph, spec)
        n = len(shapes)
        buffers = tuple(buffers) if isinstance(buffers, (list, tuple)) else (buffers,) * n
        offsets = tuple(offsets) if isinstance(offsets, (list, tuple)) else (offsets,) * n
        b = Binding(spec["name"], is_input, spec["dtype"], shapes, buffers, offsets, copy_from)
        for p in range(n):
            assert offsets[p] % ALIGNMENT == 0, (graph, spec["name"], offsets[p])
            need[buffers[p]] = max(need.get(buffers[p], 0), align_up(offsets[p] + b.nbytes(p)))
        tables.setdefault(graph, {})[spec["name"]] = b

    # the rope tables: each scale's rows start at an aligned offset of table.rope_cos / table.rope_sin
    rope_spec = next((s for s in graphs[step_graph]["inputs"] if s["name"] == "rope.cos"), None)
    rope_layout, at = [], 0
    if rope_spec is not None:  # blocks with absolute positions (VAR) have no rotary tables
        row_bytes = resolve_dim(rope_spec["shape"][1], {}) * ITEMSIZE[rope_spec["dtype"]]
        for s in scales:
            rope_layout.append((s["offset"], s["tokens"], at))
            at += align_up(s["tokens"] * row_bytes)

    # the per-token context map (reference-pipeline): each scale's rows of cross_segment at an aligned offset
    segment_spec = next((s for s in graphs[step_graph]["inputs"] if s["name"] == "cross.segment"), None)
    segment_layout, segment_at = [], 0
    if segment_spec is not None:
        for s in scales:
            segment_layout.append((s["offset"], s["tokens"], segment_at))
            segment_at += align_up(s["tokens"] * ITEMSIZE[segment_spec["dtype"]])

    # context: its outputs are the per-scan state every step reads
    ctx = graphs["context"]
    for spec in ctx["inputs"]:
        add("context", spec, True, f"context.{spec['name']}", 0)
    for spec in ctx["outputs"]:
        add("context", spec, False, f"context.{spec['name']}", 0)

    # the step, per scale
    step = graphs[step_graph]
    write_stride = align_up(rows.rows * ITEMSIZE["int64"]) if in_place else None
    for spec in step["inputs"]:
        name = spec["name"]
        if name == "h":  # scale 0 reads the start token straight from the context output
            add(step_graph, spec, True, ["context.start"] + ["step.h"] * (K - 1), 0)
        elif name in ("rope.cos", "rope.sin"):
            add(step_graph, spec, True, f"table.{name.replace('.', '_')}", [r[2] for r in rope_layout])
        elif name in ("ada_blocks", "ada_head"):
            add(step_graph, spec, True, f"context.{name}", 0)
        elif name == "cross.segment":
            add(step_graph, spec, True, "table.cross_segment", [r[2] for r in segment_layout])
        elif name.startswith("cross.") and segment_spec is not None:  # the whole context, in place
            add(step_graph, spec, True, f"context.{name}", 0)
        elif name.startswith("cross."):
            block = math.prod(shapes_of(step_graph, spec)[0]) * ITEMSIZE[spec["dtype"]]
            seg_offsets = [s["segment"] * block for s in scales]
            if all(o % ALIGNMENT == 0 for o in seg_offsets):
                add(step_graph, spec, True, f"context.{name}", seg_offsets)
            else:  # a misaligned segment: copied into an aligned buffer when the segment changes
                copies = tuple((f"context.{name}", o) for o in seg_offsets)
                add(step_graph, spec, True, f"step.{name}", 0, copies)
        elif name.startswith("past_key_values."):
            cache = name.removeprefix("past_key_values.")
            if in_place:
                add(step_graph, spec, True, f"cache.{cache}", 0)
            else:
                add(step_graph, spec, True, [f"cache.{cache}.{'ab'[i % 2]}" for i in range(K)], 0)
        elif name == "write_indices":
            assert write_stride is not None
            add(step_graph, spec, True, "table.write_indices", [i * write_stride for i in range(K)])
        else:
            raise ConfigError(f"{step_graph}: unexpected input {name!r}")
    for spec in step["outputs"]:
        name = spec["name"]
        if name == "logits":
            add(step_graph, spec, False, "step.logits", 0)
        elif name.startswith("present."):
            cache = name.removeprefix("present.")
            if in_place:
                add(step_graph, spec, False, f"cache.{cache}", 0)
            else:
                add(step_graph, spec, False, [f"cache.{cache}.{'ab'[(i + 1) % 2]}" for i in range(K)], 0)
        else:
            raise ConfigError(f"{step_graph}: unexpected output {name!r}")

    # encoders (one set of output buffers shared by every subject), updates (f_hat ping-pong), decoder
    for graph in sorted(g for g in graphs if g.startswith("encoder_")):
        for spec in graphs[graph]["inputs"]:
            add(graph, spec, True, f"{graph}.{spec['name']}", 0)
        for spec in graphs[graph]["outputs"]:
            add(graph, spec, False, f"encoder.{spec['name']}", 0)
    for i in range(K):
        graph = f"update_{i}"
        entry = graphs[graph]
        for spec in entry["inputs"]:
            buffer = f"update.f_hat.{i % 2}" if spec["name"] == "f_hat" else f"update.{spec['name']}"
            add(graph, spec, True, buffer, 0)
        for spec in entry["outputs"]:
            buffer = f"update.f_hat.{(i + 1) % 2}" if spec["name"] == "f_hat_next" else f"update.{spec['name']}"
            add(graph, spec, False, buffer, 0)
    for spec in graphs["vq_decoder"]["inputs"]:
        add("vq_decoder", spec, True, f"update.f_hat.{K % 2}", 0)
    for spec in graphs["vq_decoder"]["outputs"]:
        add("vq_decoder", spec, False, f"decoder.{spec['name']}", 0)

    if rope_spec is not None:
        need["table.rope_cos"] = need["table.rope_sin"] = max(at, ALIGNMENT)
    if write_stride is not None:
        need["table.write_indices"] = K * write_stride
    if segment_spec is not None:
        need["table.cross_segment"] = max(segment_at, ALIGNMENT)
    order = decode_graphs(manifest, step_graph)
    return DecodePlan(
        rows=rows,
        self_cache=self_cache,
        step_graph=step_graph,
        graphs=order,
        bindings={g: tables[g] for g in order},
        buffers=dict(sorted(need.items())),
        rope_layout=rope_layout,
        write_indices_stride=write_stride,
        segment_layout=segment_layout,
    )


# ---- the block-causal step with an in-place cache ----------------------------------------------------
def kv_graph_entry(manifest: dict[str, Any], file: str = f"{KV_GRAPH}.onnx") -> dict[str, Any]:
    """Manifest entry of ``generator_step_kv``: the step's inputs and outputs with full-length caches."""
    step = manifest["graphs"][STEP_GRAPH]
    total = sum(s["tokens"] for s in manifest["scales"])

    def full_length(spec: dict[str, Any]) -> dict[str, Any]:
        shape = list(spec["shape"])
        shape[2] = total
        return {**spec, "shape": shape}

    inputs = [full_length(s) if s["name"].startswith("past_key_values.") else s for s in step["inputs"]]
    inputs.append({"name": "write_indices", "dtype": "int64", "shape": ["rows"]})
    outputs = [full_length(s) if s["name"].startswith("present.") else s for s in step["outputs"]]
    entry = {"file": file, "inputs": inputs, "outputs": outputs, "derived_from": STEP_GRAPH, "opset": KV_OPSET}
    if "external_data" in step:
        entry["external_data"] = step["external_data"]  # the same weight file: stored once
    return entry


def derive_kv_step_graph(bundle: Bundle, out_name: str = f"{KV_GRAPH}.onnx") -> dict[str, Any]:
    """Write ``generator_step_kv.onnx`` (in-place cache variant, see the module docstring); return its entry.

    Pure ONNX surgery on the exported concat graph, so the variant cannot drift from it; the weights are
    not loaded or copied (the variant references ``generator_step``'s initializers and weight file).
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper, version_converter

    from mindhier_rt.export.checks import FORBIDDEN_OPS, TENSORRT_ONNX_OPS, GraphCheckError, op_counts

    manifest = bundle.manifest
    step = manifest["graphs"][STEP_GRAPH]
    if not any(s["name"].startswith("past_key_values.") for s in step["inputs"]):
        raise ConfigError("the in-place cache variant is for block-causal bundles; this one is scale-local")
    total = sum(s["tokens"] for s in manifest["scales"])
    model = load_graph_structure(bundle, step["file"])
    model = version_converter.convert_version(model, KV_OPSET)
    graph = model.graph

    def set_seq_len(value_info) -> None:
        dim = value_info.type.tensor_type.shape.dim[2]
        dim.Clear()
        dim.dim_value = total

    caches = [vi for vi in graph.input if vi.name.startswith("past_key_values.")]
    for vi in caches:
        set_seq_len(vi)
    for vo in graph.output:
        if vo.name.startswith("present."):
            set_seq_len(vo)
    graph.input.append(helper.make_tensor_value_info("write_indices", TensorProto.INT64, ["rows"]))
    elem = caches[0].type.tensor_type.elem_type
    np_dtype = helper.tensor_dtype_to_np_dtype(elem)

    # key mask, one for all layers: bias[r, 0, 0, s] = 0 if s < write_indices[r] + tokens else -inf
    mask_nodes = [
        helper.make_node("Shape", ["h"], ["kv_mask.tokens"], start=1, end=2),
        helper.make_node("Add", ["write_indices", "kv_mask.tokens"], ["kv_mask.end"]),
        helper.make_node("Unsqueeze", ["kv_mask.end", "kv_mask.axis_1"], ["kv_mask.end_r1"]),
        helper.make_node("Less", ["kv_mask.positions", "kv_mask.end_r1"], ["kv_mask.visible"]),
        helper.make_node("Where", ["kv_mask.visible", "kv_mask.zero", "kv_mask.minus_inf"], ["kv_mask.bias_rS"]),
        helper.make_node("Unsqueeze", ["kv_mask.bias_rS", "kv_mask.axes_1_2"], ["kv_mask.bias"]),
    ]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([1], np.int64), "kv_mask.axis_1"),
            numpy_helper.from_array(np.array([1, 2], np.int64), "kv_mask.axes_1_2"),
            numpy_helper.from_array(np.arange(total, dtype=np.int64)[None, :], "kv_mask.positions"),
            numpy_helper.from_array(np.array(0, np_dtype), "kv_mask.zero"),
            numpy_helper.from_array(np.array(-np.inf, np_dtype), "kv_mask.minus_inf"),
        ]
    )
    consumers: dict[str, list] = {}
    for node in graph.node:
        for x in node.input:
            consumers.setdefault(x, []).append(node)

    def softmax_after(tensor: str, hops: int = 6):
        frontier = [tensor]
        for _ in range(hops):
            nxt = []
            for t in frontier:
                for node in consumers.get(t, []):
                    if node.op_type == "Softmax":
                        return node
                    nxt.extend(node.output)
            frontier = nxt
        return None

    nodes, masked, updates = [], set(), 0
    for node in graph.node:
        if node.op_type == "Concat" and node.input and node.input[0].startswith("past_key_values."):
            if len(node.input) != 2 or not node.output[0].startswith("present."):
                raise GraphCheckError(f"{step['file']}: unexpected cache concat {node.name}")
            scatter = helper.make_node(
                "TensorScatter", [node.input[0], node.input[1], "write_indices"], list(node.output),
                name=f"kv_update.{node.output[0].removeprefix('present.')}", axis=-2, mode="linear",
            )  # fmt: skip
            nodes.append(scatter)
            updates += 1
            if node.output[0].endswith(".key"):
                softmax = softmax_after(node.output[0])
                if softmax is None:
                    raise GraphCheckError(f"{step['file']}: no softmax after {node.output[0]}")
                masked.add(softmax.output[0])
            continue
        if node.op_type == "Softmax" and node.output[0] in masked:
            scores = node.input[0]
            nodes.append(helper.make_node("Add", [scores, "kv_mask.bias"], [f"{scores}.kv_masked"]))
            node.input[0] = f"{scores}.kv_masked"
        nodes.append(node)
    if updates != len(caches) or len(masked) != len(caches) // 2:
        raise GraphCheckError(
            f"{step['file']}: expected {len(caches)} cache concats and {len(caches) // 2} self-attention softmaxes, "
            f"found {updates} and {len(masked)}"
        )
    del graph.node[:]
    graph.node.extend(mask_nodes + nodes)
    out = bundle.path(out_name)
    onnx.save(model, str(out))
    try:
        onnx.checker.check_model(str(out), full_check=True)
    except onnx.checker.ValidationError as e:
        raise GraphCheckError(f"{out_name}: ONNX checker failed: {str(e).splitlines()[0]}") from e
    bad = sorted(op for op in op_counts(out) if op not in TENSORRT_ONNX_OPS | {"TensorScatter"} or op in FORBIDDEN_OPS)
    if bad:
        raise GraphCheckError(f"{out_name}: operators TensorRT's ONNX parser cannot import: {', '.join(bad)}")
    return kv_graph_entry(manifest, out_name)


# ---- build environment, precision and cache decisions ------------------------------------------------
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


def choose_self_cache(manifest: dict[str, Any], env: BuildEnvironment, wanted: str = "auto") -> SelfCache:
    """in_place where TensorRT has TensorScatter, ping_pong otherwise; none for scale-local bundles."""
    has_past = any(s["name"].startswith("past_key_values.") for s in manifest["graphs"][STEP_GRAPH]["inputs"])
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


# ---- load-time checks ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RuntimeEnvironment:
    tensorrt_version: str
    gpu: str
    compute_capability: str
    lean: bool = False  # the lean runtime (tensorrt_lean) runs version-compatible plans only


def check_plan_metadata(graph: str, meta: dict[str, Any], env: RuntimeEnvironment) -> list[str]:
    """Raise PlanMismatchError where the plan cannot run here; return warnings (same architecture, other GPU)."""
    missing = [k for k in ("file", "tensorrt_version", "compute_capability", "gpu") if k not in meta]
    if missing:
        raise PlanMismatchError(f"plan of {graph}: manifest entry lacks {', '.join(missing)}; rebuild the plans")
    built, running = meta["tensorrt_version"], env.tensorrt_version
    compatible = "version_compatible" in meta.get("flags", [])
    rebuild = "rebuild with `mindhier-rt build --engine BUNDLE` on this machine"
    if env.lean and not compatible:
        raise PlanMismatchError(
            f"plan of {graph} was not built version compatible; the lean TensorRT runtime {running} runs only "
            f"plans built with `mindhier-rt build --version-compatible`"
        )
    if compatible:
        b, r = version_tuple(built), version_tuple(running)
        if b[:1] != r[:1] or r < b:
            raise PlanMismatchError(
                f"plan of {graph} was built version compatible with TensorRT {built}; it runs on later "
                f"{b[0] if b else '?'}.x runtimes, not on {running}: {rebuild}"
            )
    elif built != running:
        raise PlanMismatchError(
            f"plan of {graph} was built with TensorRT {built}, this is TensorRT {running}: {rebuild} "
            f"(or build with --version-compatible)"
        )
    if meta["compute_capability"] != env.compute_capability:
        raise PlanMismatchError(
            f"plan of {graph} was built for compute capability {meta['compute_capability']} ({meta['gpu']}), "
            f"this GPU is {env.compute_capability} ({env.gpu}): {rebuild}"
        )
    if meta["gpu"] != env.gpu:
        return [
            f"plan of {graph} was built and timed on {meta['gpu']}, running on {env.gpu} (same architecture): "
            f"it runs, but a rebuild here may pick faster kernels"
        ]
    return []


# ---- the builder ---------------------------------------------------------------------------------------
class PlanBuilder(Protocol):
    """What ``build_plans`` needs from a builder; tests pass a double that writes fake plans."""

    def environment(self) -> BuildEnvironment: ...

    def build(
        self, graph: str, onnx_path: Path, profiles: list[dict], typing: Typing, precision: str, options: BuildOptions
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
        self.logger = trt.Logger(getattr(trt.Logger, log_level))
        self.builder = trt.Builder(self.logger)
        self.timing_cache_path = timing_cache or default_timing_cache(self.env)
        blob = self.timing_cache_path.read_bytes() if self.timing_cache_path.is_file() else b""
        self._cache_config = self.builder.create_builder_config()
        self.timing_cache = self._cache_config.create_timing_cache(blob)
        log.info("timing cache %s (%d bytes)", self.timing_cache_path, len(blob))

    def environment(self) -> BuildEnvironment:
        return self.env

    def build(
        self, graph: str, onnx_path: Path, profiles: list[dict], typing: Typing, precision: str, options: BuildOptions
    ) -> bytes:
        trt = self.trt
        flags = 0
        strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if typing == "strong" and strongly_typed is not None:
            flags |= 1 << int(strongly_typed)  # TensorRT 10; on 11 every network is strongly typed
        network = self.builder.create_network(flags)
        if options.attention_plugin and onnx_path.name.endswith(f"{PLUGIN_SUFFIX}.onnx"):
            major, minor = (int(x) for x in self.env.compute_capability.split("."))
            register_plugin((major, minor))  # before parsing: the parser looks the plugin up by name
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(_parser_error(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors}")
        config = self.builder.create_builder_config()
        if options.workspace_gib is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 2**30))
        config.set_timing_cache(self.timing_cache, False)
        if typing == "weak" and precision != "fp32":
            config.set_flag(getattr(trt.BuilderFlag, precision.upper()))
        if options.version_compatible:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        for shapes in profiles:
            profile = self.builder.create_optimization_profile()
            for name, s in shapes.items():
                profile.set_shape(name, s["min"], s["opt"], s["max"])
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
def _build_input(bundle: Bundle, entry: dict[str, Any], onnx_file: str) -> Path:
    """The ONNX path handed to TensorRT's parser (it reads paths, with external data beside them): a listed file
    and its weight file are hashed just before; a graph this build derived (not listed yet) is used as written."""
    if onnx_file not in bundle.spec.files:
        return bundle.path(onnx_file)
    if "external_data" in entry:
        bundle.checked_path(entry["external_data"])
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
    manifest = dict(bundle.manifest)
    dtype = manifest["dtype"]
    precision = options.precision or precision_of_dtype(dtype)
    typing = choose_typing(dtype, precision, env)
    if options.workspace_gib is not None and options.workspace_gib <= 0:
        raise ConfigError(f"--workspace-gib must be > 0, got {options.workspace_gib}")
    rows = row_counts(manifest, options.scans, options.samples)
    self_cache = choose_self_cache(manifest, env, options.self_cache)
    graphs = dict(manifest["graphs"])
    had_kv_graph = graphs.pop(KV_GRAPH, None) is not None
    kv_file = bundle.path(f"{KV_GRAPH}.onnx")
    if self_cache == "in_place":
        graphs[KV_GRAPH] = derive_kv_step_graph(bundle)  # deterministic: rewriting a listed one changes nothing
    manifest["graphs"] = graphs
    step_graph = KV_GRAPH if self_cache == "in_place" else STEP_GRAPH
    plan = binding_plan(manifest, rows, step_graph)

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
            profiles = plan_profiles(manifest, graph, rows)
            log.info("building %s (%d profile(s), %s, %s typing)", graph, len(profiles), precision, typing)
            onnx_file = graphs[graph]["file"]
            if options.attention_plugin and graph == step_graph:
                onnx_file = derive_plugin_graph(bundle, graph, bundle.cfg.generator.head_dim).name
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
    manifest["plans"] = report.plans
    manifest["tensorrt"] = {**plan.to_dict(), "version_compatible": options.version_compatible}
    manifest["versions"] = {**manifest.get("versions", {}), "tensorrt": env.tensorrt_version}
    for key in ("format", "format_version", "files"):
        manifest.pop(key, None)
    write_manifest(bundle.root, manifest)
    report.bundle = Bundle.open(bundle.root)
    return report


def decode_plan_from_manifest(manifest: dict[str, Any]) -> DecodePlan:
    """The binding plan of a built bundle, recomputed from its manifest (and checked against the recorded one)."""
    if "plans" not in manifest or "tensorrt" not in manifest:
        raise PlanMismatchError("the bundle has no TensorRT plans: run `mindhier-rt build --engine BUNDLE` first")
    recorded = manifest["tensorrt"]
    r = recorded["rows"]
    plan = binding_plan(manifest, RowCounts(r["scans"], r["samples"], r["guided"]), recorded["step_graph"])
    if plan.to_dict()["buffers"] != recorded["buffers"]:
        raise PlanMismatchError("the manifest's TensorRT buffer table does not match its graphs; rebuild the plans")
    return plan
