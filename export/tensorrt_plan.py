"""The one TensorRT decode plan, computed at build time from the typed manifest (no TensorRT needed).

``build`` writes the result to the manifest's ``tensorrt`` section (``mindhier_rt/bundle/tensorrt_plan.py``
describes it); the Python backend and the C++ host execute it as recorded.

Profiles
    ``generator_step`` is one graph for every scale: its plan has one optimization profile per scale,
    profile index = scale index, each with min = opt = max (the scale's token count, past length and the
    built row count), so all scales share one copy of the weights. ``context``, ``update_<i>`` and
    ``vq_decoder`` have one static profile each. ``encoder_<subject>`` has one profile with rows from 1 to
    the scan count (it runs on the scans and on one all-zero null scan). Row counts come from the
    manifest's ``batch`` (or ``--batch`` / ``--samples`` at build time): ``rows`` = scans x samples,
    doubled with guidance, for ``context`` and the step; scans x samples for the updates and the decoder.
    A decode with fewer rows pads up to the built count (rows are independent); more rows is an error.

Buffers
    The context step writes its outputs where the steps read them: scale 0's ``h`` is the ``start`` output,
    each scale's cross-attention K/V is a segment of the context cache bound at a byte offset (or copied to an
    aligned buffer where that offset is not a multiple of 256), the rotary rows of each scale start at an
    aligned offset of one table. Encoders of all subjects share their output buffers; ``f_hat`` alternates
    between two buffers across the updates, and the decoder reads the last. The self-attention cache is
    ``in_place`` (``generator_step_kv``: ``present`` bound over ``past_key_values``, one buffer, written at
    ``write_indices``), ``ping_pong`` (``present`` of scale i is ``past`` of scale i + 1, in the other of two
    buffers) or ``none`` (scale-local attention).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

from mindhier_rt.bundle import tensor_names as tn
from mindhier_rt.bundle.manifest import GraphSpec, Manifest, TensorSpec
from mindhier_rt.bundle.tensorrt_plan import (
    ALIGNMENT,
    ITEMSIZE,
    Binding,
    DecodePlan,
    Fill,
    RowCounts,
    SelfCache,
    TableUpload,
    align_up,
)
from mindhier_rt.errors import ConfigError

__all__ = [
    "binding_plan",
    "decode_graphs",
    "graph_role",
    "graph_symbols",
    "plan_profiles",
    "resolve_dim",
    "row_counts",
    "tensor_shape",
    "with_graph",
]

Profile = dict[str, dict[str, list[int]]]


def row_counts(manifest: Manifest, scans: int | None = None, samples: int | None = None) -> RowCounts:
    """Rows from the manifest's ``batch`` (what ``export --batch --samples`` recorded), optionally overridden."""
    batch = manifest.batch
    scans = batch.scans if scans is None else scans
    samples = batch.samples if samples is None else samples
    if scans < 1 or samples < 1:
        raise ConfigError(f"scans and samples must be >= 1, got {scans} and {samples}")
    guided = batch.rows == 2 * batch.scans * batch.samples
    return RowCounts(scans, samples, guided)


def graph_role(name: str) -> str:
    """encoder / context / step / update / decoder."""
    if name.startswith(tn.ENCODER_PREFIX):
        return "encoder"
    if tn.is_step_graph(name):
        return "step"
    if name.startswith(tn.UPDATE_PREFIX):
        return "update"
    if name == tn.DECODER_GRAPH:
        return "decoder"
    if name == tn.CONTEXT_GRAPH:
        return "context"
    raise ConfigError(f"unknown graph {name!r} in the bundle")


def n_profiles(manifest: Manifest, graph: str) -> int:
    return len(manifest.scales) if graph_role(graph) == "step" else 1


def graph_symbols(manifest: Manifest, graph: str, profile: int, rows: RowCounts) -> dict[str, int]:
    """Values of the symbolic axes of ``graph`` under ``profile`` (max shapes for the encoder)."""
    role = graph_role(graph)
    if role == "encoder":
        return {"rows": rows.scans}
    if role in ("update", "decoder"):
        return {"rows": rows.sample_rows}
    if role == "context":
        return {"rows": rows.rows}
    scale = manifest.scales[profile]
    return {"rows": rows.rows, "tokens": scale.tokens, "past": scale.past}


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


def tensor_shape(spec: TensorSpec, symbols: dict[str, int]) -> tuple[int, ...]:
    return tuple(resolve_dim(d, symbols) for d in spec.shape)


def plan_profiles(manifest: Manifest, graph: str, rows: RowCounts) -> list[Profile]:
    """The optimization profiles of ``graph``: ``[{input_name: {"min", "opt", "max"}}]`` (see the docstring)."""
    entry = manifest.graphs[graph]
    profiles = []
    for p in range(n_profiles(manifest, graph)):
        symbols = graph_symbols(manifest, graph, p, rows)
        shapes: Profile = {}
        for spec in entry.inputs:
            full = list(tensor_shape(spec, symbols))
            low = full
            if graph_role(graph) == "encoder":
                low = [1 if d == "rows" else n for d, n in zip(spec.shape, full, strict=True)]
            shapes[spec.name] = {"min": low, "opt": full, "max": full}
        profiles.append(shapes)
    return profiles


def decode_graphs(manifest: Manifest, step_graph: str) -> list[str]:
    """The graphs the decode loop runs, in build order (the step first: the longest build)."""
    encoders = sorted(g for g in manifest.graphs if g.startswith(tn.ENCODER_PREFIX))
    updates = [tn.update_graph(i) for i in range(len(manifest.scales))]
    return [step_graph, tn.CONTEXT_GRAPH, *encoders, *updates, tn.DECODER_GRAPH]


class _Planner:
    """Collects bindings and the size each buffer needs."""

    def __init__(self, manifest: Manifest, rows: RowCounts) -> None:
        self.manifest, self.rows = manifest, rows
        self.need: dict[str, int] = {}
        self.tables: dict[str, dict[str, Binding]] = {}

    def shapes_of(self, graph: str, spec: TensorSpec) -> tuple[tuple[int, ...], ...]:
        m, rows = self.manifest, self.rows
        return tuple(tensor_shape(spec, graph_symbols(m, graph, p, rows)) for p in range(n_profiles(m, graph)))

    def add(
        self,
        graph: str,
        spec: TensorSpec,
        is_input: bool,
        buffers: str | Sequence[str],
        offsets: int | Sequence[int],
        copy_from: tuple[tuple[str, int], ...] | None = None,
    ) -> None:
        shapes = self.shapes_of(graph, spec)
        n = len(shapes)
        per_buffer = (buffers,) * n if isinstance(buffers, str) else tuple(buffers)
        per_offset = (offsets,) * n if isinstance(offsets, int) else tuple(offsets)
        b = Binding(spec.name, is_input, spec.dtype, shapes, per_buffer, per_offset, copy_from)
        for p in range(n):
            assert per_offset[p] % ALIGNMENT == 0, (graph, spec.name, per_offset[p])
            self.reserve(per_buffer[p], per_offset[p] + b.nbytes(p))
        self.tables.setdefault(graph, {})[spec.name] = b

    def reserve(self, buffer: str, end: int) -> None:
        self.need[buffer] = max(self.need.get(buffer, 0), align_up(end))

    def graph(self, graph: str, place: Callable[[TensorSpec, bool], str]) -> None:
        """A graph whose tensors each live at offset 0 of the buffer ``place(spec, is_input)`` names."""
        spec = self.manifest.graphs[graph]
        for t in spec.inputs:
            self.add(graph, t, True, place(t, True), 0)
        for t in spec.outputs:
            self.add(graph, t, False, place(t, False), 0)


def _table_upload(manifest: Manifest, spec: TensorSpec | None, table: str) -> TableUpload | None:
    """Each scale's rows of ``table`` at an aligned offset of ``table.<table>``, in scale order."""
    if spec is None:
        return None
    columns = math.prod(resolve_dim(d, {}) for d in spec.shape[1:])
    row_bytes = columns * ITEMSIZE[spec.dtype]
    layout, at = [], 0
    for s in manifest.scales:
        layout.append((s.offset, s.tokens, at))
        at += align_up(s.tokens * row_bytes)
    return TableUpload(f"table.{table}", table, spec.dtype, columns, tuple(layout))


def _step_bindings(plan: _Planner, step_graph: str, per_token: bool) -> None:
    """The step's tensors, one binding per tensor with a buffer and offset per scale."""
    m, rows = plan.manifest, plan.rows
    K = len(m.scales)
    in_place = step_graph == tn.KV_STEP_GRAPH
    step = m.graphs[step_graph]
    for spec in step.inputs:
        name = spec.name
        if name == tn.H:  # scale 0 reads the start token straight from the context output
            plan.add(step_graph, spec, True, [f"context.{tn.START}"] + ["step.h"] * (K - 1), 0)
        elif name in (tn.ROPE_COS, tn.ROPE_SIN):
            upload = _upload_of(m, spec)
            plan.add(step_graph, spec, True, upload.buffer, [r[2] for r in upload.layout])
        elif name in (tn.ADA_BLOCKS, tn.ADA_HEAD):
            plan.add(step_graph, spec, True, f"context.{name}", 0)
        elif name == tn.CROSS_SEGMENT:
            upload = _upload_of(m, spec)
            plan.add(step_graph, spec, True, upload.buffer, [r[2] for r in upload.layout])
        elif name.startswith(tn.CROSS_PREFIX) and per_token:  # the whole context, in place
            plan.add(step_graph, spec, True, f"context.{name}", 0)
        elif name.startswith(tn.CROSS_PREFIX):
            block = math.prod(plan.shapes_of(step_graph, spec)[0]) * ITEMSIZE[spec.dtype]
            seg_offsets = [s.segment * block for s in m.scales]
            if all(o % ALIGNMENT == 0 for o in seg_offsets):
                plan.add(step_graph, spec, True, f"context.{name}", seg_offsets)
            else:  # a misaligned segment: copied into an aligned buffer when the segment changes
                copies = tuple((f"context.{name}", o) for o in seg_offsets)
                plan.add(step_graph, spec, True, f"step.{name}", 0, copies)
        elif name.startswith(tn.PAST_PREFIX):
            cache = name.removeprefix(tn.PAST_PREFIX)
            if in_place:
                plan.add(step_graph, spec, True, f"cache.{cache}", 0)
            else:
                plan.add(step_graph, spec, True, [f"cache.{cache}.{'ab'[i % 2]}" for i in range(K)], 0)
        elif name == tn.WRITE_INDICES:
            stride = align_up(rows.rows * ITEMSIZE["int64"])
            plan.add(step_graph, spec, True, "table.write_indices", [i * stride for i in range(K)])
        else:
            raise ConfigError(f"{step_graph}: unexpected input {name!r}")
    for spec in step.outputs:
        name = spec.name
        if name == tn.LOGITS:
            plan.add(step_graph, spec, False, "step.logits", 0)
        elif name.startswith(tn.PRESENT_PREFIX):
            cache = name.removeprefix(tn.PRESENT_PREFIX)
            if in_place:
                plan.add(step_graph, spec, False, f"cache.{cache}", 0)
            else:
                plan.add(step_graph, spec, False, [f"cache.{cache}.{'ab'[(i + 1) % 2]}" for i in range(K)], 0)
        else:
            raise ConfigError(f"{step_graph}: unexpected output {name!r}")


_TABLE_OF_INPUT = {
    tn.ROPE_COS: tn.ROPE_COS_TABLE,
    tn.ROPE_SIN: tn.ROPE_SIN_TABLE,
    tn.CROSS_SEGMENT: tn.CROSS_SEGMENT_TABLE,
}


def _upload_of(manifest: Manifest, spec: TensorSpec) -> TableUpload:
    upload = _table_upload(manifest, spec, _TABLE_OF_INPUT[spec.name])
    assert upload is not None
    return upload


def binding_plan(
    manifest: Manifest, rows: RowCounts, step_graph: str = tn.STEP_GRAPH, version_compatible: bool = False
) -> DecodePlan:
    """Assign every tensor of every decode graph to a device buffer (see the module docstring)."""
    graphs = manifest.graphs
    if step_graph not in graphs:
        raise ConfigError(f"the bundle has no graph {step_graph!r}")
    step = graphs[step_graph]
    K = len(manifest.scales)
    in_place = step_graph == tn.KV_STEP_GRAPH
    has_past = any(s.name.startswith(tn.PAST_PREFIX) for s in step.inputs)
    self_cache: SelfCache = "in_place" if in_place else ("ping_pong" if has_past else "none")
    per_token = step.input(tn.CROSS_SEGMENT) is not None
    plan = _Planner(manifest, rows)

    plan.graph(tn.CONTEXT_GRAPH, lambda t, _: f"context.{t.name}")  # its outputs: the state every step reads
    _step_bindings(plan, step_graph, per_token)
    for graph in sorted(g for g in graphs if g.startswith(tn.ENCODER_PREFIX)):  # outputs shared by all subjects
        plan.graph(graph, lambda t, is_input, g=graph: f"{g}.{t.name}" if is_input else f"encoder.{t.name}")
    for i in range(K):

        def update_buffer(t: TensorSpec, _: bool, i: int = i) -> str:
            if t.name == tn.F_HAT:
                return f"update.f_hat.{i % 2}"
            return f"update.f_hat.{(i + 1) % 2}" if t.name == tn.F_HAT_NEXT else f"update.{t.name}"

        plan.graph(tn.update_graph(i), update_buffer)
    plan.graph(tn.DECODER_GRAPH, lambda t, is_input: f"update.f_hat.{K % 2}" if is_input else f"decoder.{t.name}")

    uploads = [
        u
        for u in (
            _table_upload(manifest, step.input(tn.ROPE_COS), tn.ROPE_COS_TABLE),
            _table_upload(manifest, step.input(tn.ROPE_SIN), tn.ROPE_SIN_TABLE),
            _table_upload(manifest, step.input(tn.CROSS_SEGMENT), tn.CROSS_SEGMENT_TABLE),
        )
        if u is not None
    ]
    for u in uploads:
        _, last_rows, last_at = u.layout[-1]
        plan.reserve(u.buffer, max(last_at + last_rows * u.columns * ITEMSIZE[u.dtype], ALIGNMENT))
    fills: list[Fill] = []
    if in_place:  # per scale, the scale's offset once per row: where the step writes its keys and values
        stride = align_up(rows.rows * ITEMSIZE["int64"])
        fills = [Fill("table.write_indices", i * stride, s.offset, rows.rows) for i, s in enumerate(manifest.scales)]
        plan.reserve("table.write_indices", K * stride)
    order = decode_graphs(manifest, step_graph)
    return DecodePlan(
        rows=rows,
        self_cache=self_cache,
        step_graph=step_graph,
        bindings={g: plan.tables[g] for g in order},
        buffers=dict(sorted(plan.need.items())),
        tables=tuple(uploads),
        fills=tuple(fills),
        version_compatible=version_compatible,
    )


def with_graph(manifest: Manifest, graph: GraphSpec) -> Manifest:
    """The manifest with ``graph`` added (a graph the build derives before it is recorded)."""
    return dataclasses.replace(manifest, graphs={**manifest.graphs, graph.name: graph})
