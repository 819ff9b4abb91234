"""The TensorRT decode plan: device buffers and where every tensor of every plan lives, as ``build`` records it.

``mindhier-rt build`` computes the plan once (``export/tensorrt_plan.py``) and writes it to the manifest's
``tensorrt`` section; the Python TensorRT backend and the C++ host (``export/cpp/exec_plan.cpp``) execute it and
never plan themselves. This module is the plan's types and its reader: every name, index, offset and size is
checked when the manifest is parsed, so a reader can bind addresses without further bounds checks.

The section (``plan_version`` 2)::

    plan_version        2 (another value: rebuild the plans)
    step_graph          generator_step or generator_step_kv
    self_cache          none / in_place / ping_pong
    rows                {scans, samples, guided, rows, sample_rows}: what the plans were built for
    alignment           256: every bound address is a multiple of it
    version_compatible  whether the plans were built version compatible
    buffers             {name: bytes}: the device buffers, allocated once and zeroed
    bindings            {graph: [{name, input, dtype, buffer: [per profile], shapes: [per profile],
                        offsets: [bytes, per profile], copy_from: null or [[buffer, offset] per profile]}]}
                        in run order (the step first); ``copy_from``: before a run with that profile the input
                        is copied from (buffer, offset) into its own aligned place (a misaligned segment)
    tables              [{buffer, table, dtype, columns, layout: [[first_row, rows, byte_offset], ...]}]: rows of
                        the bundle table ``table`` (converted to ``dtype``, ``columns`` values a row) placed at
                        byte offsets of ``buffer`` once at load
    fills               [{buffer, offset, dtype, value, count}]: ``count`` int64 values placed once at load
                        (the in-place cache's write indices: one per row and scale)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from mindhier_rt.bundle import tensor_names as tn
from mindhier_rt.bundle.json_field import JsonField
from mindhier_rt.errors import BundleError

PLAN_VERSION = 2
ALIGNMENT = 256  # byte alignment of every tensor address bound to TensorRT
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "bool": 1, "uint8": 1}
SELF_CACHES = ("none", "in_place", "ping_pong")
MAX_BYTES = 1 << 48  # far above any device; keeps sizes and offsets exact in every reader's integers

SelfCache = Literal["none", "in_place", "ping_pong"]


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


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


@dataclass(frozen=True)
class TableUpload:
    """Rows of a bundle table placed in a buffer at load: ``layout`` is [(first_row, rows, byte_offset)]."""

    buffer: str
    table: str
    dtype: str
    columns: int
    layout: tuple[tuple[int, int, int], ...]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "layout": [list(r) for r in self.layout]}


@dataclass(frozen=True)
class Fill:
    """``count`` copies of the int64 ``value`` at byte ``offset`` of ``buffer``, placed at load."""

    buffer: str
    offset: int
    value: int
    count: int
    dtype: str = "int64"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DecodePlan:
    """Everything a host needs to bind the plans: rows, cache mode, buffers, per-graph bindings, load-time data."""

    rows: RowCounts
    self_cache: SelfCache
    step_graph: str
    bindings: dict[str, dict[str, Binding]]  # graph -> tensor -> binding, graphs in build order (the step first)
    buffers: dict[str, int]
    tables: tuple[TableUpload, ...] = ()
    fills: tuple[Fill, ...] = ()
    version_compatible: bool = False

    @property
    def graphs(self) -> list[str]:
        return list(self.bindings)

    def binding(self, graph: str, name: str) -> Binding:
        return self.bindings[graph][name]

    def n_profiles(self, graph: str) -> int:
        return len(next(iter(self.bindings[graph].values())).shapes)

    def table_upload(self, buffer: str) -> TableUpload | None:
        return next((t for t in self.tables if t.buffer == buffer), None)

    @property
    def rope_layout(self) -> list[tuple[int, int, int]]:
        upload = self.table_upload(f"table.{tn.ROPE_COS_TABLE}")
        return [] if upload is None else list(upload.layout)

    @property
    def segment_layout(self) -> list[tuple[int, int, int]]:
        upload = self.table_upload(f"table.{tn.CROSS_SEGMENT_TABLE}")
        return [] if upload is None else list(upload.layout)

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan_version": PLAN_VERSION,
            "step_graph": self.step_graph,
            "self_cache": self.self_cache,
            "rows": self.rows.to_dict(),
            "alignment": ALIGNMENT,
            "version_compatible": self.version_compatible,
            "buffers": dict(self.buffers),
            "bindings": {g: [b.to_dict() for b in table.values()] for g, table in self.bindings.items()},
            "tables": [t.to_dict() for t in self.tables],
            "fills": [f.to_dict() for f in self.fills],
        }


# ---- reading the section -------------------------------------------------------------------------------
class _Reader:
    """Parses the section with every size and index checked against the buffers."""

    def __init__(self, f: JsonField) -> None:
        self.f = f
        self.buffers = {name: v.int() for name, v in f.key("buffers").items()}
        for name, size in self.buffers.items():
            if not name or size > MAX_BYTES:
                raise f.key("buffers").error(f"buffer names with sizes <= {MAX_BYTES}")
        self.used = dict.fromkeys(self.buffers, 0)

    def buffer(self, f: JsonField) -> str:
        name = f.str()
        if name not in self.buffers:
            raise f.error("the name of a buffer in tensorrt.buffers")
        return name

    def span(self, f: JsonField, buffer: str, offset: int, nbytes: int, aligned: bool = True) -> None:
        if aligned and offset % ALIGNMENT:
            raise f.error(f"a byte offset that is a multiple of {ALIGNMENT}")
        if offset + nbytes > self.buffers[buffer]:
            size = self.buffers[buffer]
            raise f.error(f"a place inside buffer {buffer} ({size} bytes; this needs {offset} + {nbytes})")
        self.used[buffer] = max(self.used[buffer], offset + nbytes)

    def check_sizes(self) -> None:
        """No buffer larger than its furthest use (aligned up): a plan cannot ask for memory nothing binds."""
        for name, size in self.buffers.items():
            if size > align_up(self.used[name]):
                raise (
                    self.f.key("buffers")
                    .key(name)
                    .error(
                        f"at most {align_up(self.used[name])} bytes (the furthest byte its bindings, tables and "
                        "fills use)"
                    )
                )

    def dtype(self, f: JsonField) -> str:
        dtype = f.str()
        if dtype not in ITEMSIZE:
            raise f.error(f"one of {', '.join(ITEMSIZE)}")
        return dtype

    def binding(self, f: JsonField, n_profiles: int | None) -> Binding:
        dtype = self.dtype(f.key("dtype"))
        shapes = tuple(tuple(d.int() for d in s.elements()) for s in f.key("shapes").elements())
        n = len(shapes)
        if n == 0 or (n_profiles is not None and n != n_profiles):
            raise f.key("shapes").error(f"one shape per profile ({n_profiles or 'at least one'})")
        buffers = tuple(self.buffer(b) for b in f.key("buffer").elements())
        offsets = tuple(o.int() for o in f.key("offsets").elements())
        if len(buffers) != n or len(offsets) != n:
            raise f.error(f"buffer and offsets with one entry per profile ({n})")
        nbytes = [math.prod(s) * ITEMSIZE[dtype] for s in shapes]
        if max(nbytes) > MAX_BYTES:
            raise f.key("shapes").error(f"tensors of at most {MAX_BYTES} bytes")
        for p in range(n):
            self.span(f.key("offsets"), buffers[p], offsets[p], nbytes[p])
        copy_from = None
        c = f.key("copy_from")
        if c.value is not None:
            sources = c.elements()
            if len(sources) != n:
                raise c.error(f"one [buffer, offset] per profile ({n})")
            pairs = []
            for p, s in enumerate(sources):
                buffer, offset = s.elements() if len(s.list()) == 2 else (None, None)
                if buffer is None or offset is None:
                    raise s.error("[buffer, offset]")
                pair = (self.buffer(buffer), offset.int())
                self.span(s, pair[0], pair[1], nbytes[p], aligned=False)
                pairs.append(pair)
            copy_from = tuple(pairs)
        return Binding(f.key("name").str(), f.key("input").bool(), dtype, shapes, buffers, offsets, copy_from)

    def table(self, f: JsonField) -> TableUpload:
        buffer, dtype, columns = self.buffer(f.key("buffer")), self.dtype(f.key("dtype")), f.key("columns").int(1)
        layout = []
        for r in f.key("layout").elements():
            if len(r.list()) != 3:
                raise r.error("[first_row, rows, byte_offset]")
            first, rows, offset = (x.int() for x in r.elements())
            self.span(r, buffer, offset, rows * columns * ITEMSIZE[dtype])
            layout.append((first, rows, offset))
        return TableUpload(buffer, f.key("table").str(), dtype, columns, tuple(layout))

    def fill(self, f: JsonField) -> Fill:
        buffer, offset, count = self.buffer(f.key("buffer")), f.key("offset").int(), f.key("count").int()
        if f.key("dtype").str() != "int64":
            raise f.key("dtype").error('"int64"')
        self.span(f, buffer, offset, count * ITEMSIZE["int64"], aligned=False)
        return Fill(buffer, offset, f.key("value").int(minimum=None), count)


def parse_decode_plan(f: JsonField) -> DecodePlan:
    """The ``tensorrt`` section as a DecodePlan, or a BundleError naming the field that is wrong."""
    version = f.opt("plan_version")
    if version is None or version.value != PLAN_VERSION:
        found = None if version is None else version.value
        raise BundleError(
            f"{f.source}: manifest field tensorrt: TensorRT plan version {found} is not supported (this mindhier-rt "
            f"reads version {PLAN_VERSION}): rebuild the plans with `mindhier-rt build --engine BUNDLE`"
        )
    if f.key("alignment").int() != ALIGNMENT:
        raise f.key("alignment").error(str(ALIGNMENT))
    reader = _Reader(f)
    r = f.key("rows")
    rows = RowCounts(r.key("scans").int(1), r.key("samples").int(1), r.key("guided").bool())
    self_cache = f.key("self_cache").str()
    if self_cache not in SELF_CACHES:
        raise f.key("self_cache").error(f"one of {', '.join(SELF_CACHES)}")
    bindings: dict[str, dict[str, Binding]] = {}
    for graph, entries in f.key("bindings").items():
        table: dict[str, Binding] = {}
        n_profiles: int | None = None
        for e in entries.elements():
            b = reader.binding(e, n_profiles)
            n_profiles = len(b.shapes)
            if b.name in table:
                raise e.key("name").error(f"a tensor name not bound twice in {graph}")
            table[b.name] = b
        if not table:
            raise entries.error("at least one binding")
        bindings[graph] = table
    step_graph = f.key("step_graph").str()
    if not tn.is_step_graph(step_graph) or step_graph not in bindings:
        raise f.key("step_graph").error("generator_step or generator_step_kv, with bindings")
    plan = DecodePlan(
        rows=rows,
        self_cache=self_cache,  # type: ignore[arg-type]  # checked against SELF_CACHES above
        step_graph=step_graph,
        bindings=bindings,
        buffers=reader.buffers,
        tables=tuple(reader.table(t) for t in f.key("tables").elements()),
        fills=tuple(reader.fill(x) for x in f.key("fills").elements()),
        version_compatible=f.key("version_compatible").bool(),
    )
    reader.check_sizes()
    return plan
