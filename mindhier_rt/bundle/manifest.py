"""The manifest as a typed structure: ``parse_manifest(json) -> Manifest``, one clear error per malformed field.

This is the contract between writers (``export``, ``build``) and readers (runtimes, the builder, hosts). The
checks here are structural and cross-field; they do not touch the disk:

* every field has its type (a dict where a dict is expected, ints that are ints, ...); required keys present;
* every file name is a safe relative name (``files.check_name``) and every file a reader opens (graphs,
  their external data, tables, TensorRT plans) is listed in ``files`` with a SHA-256 and a size;
* the schedule and the per-scale table agree with the config; the graphs the decode loop needs exist;
* ``dtype`` is the dtype of every floating-point graph input.

Keys this version does not know are ignored (they are never used to find files).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from mindhier_rt.bundle.files import FileEntry, check_name
from mindhier_rt.bundle.json_field import JsonField as _Field
from mindhier_rt.bundle.tensorrt_plan import DecodePlan, parse_decode_plan
from mindhier_rt.config import ModelConfig
from mindhier_rt.errors import BundleError, ConfigError
from mindhier_rt.sampling import SamplingConfig

FORMAT = "mindhier-rt-bundle"
# 2: rope tables are per head dim [L, c] (cos repeated, sin signed)
# 3: the context map (``context_map``; ``reference-pipeline`` bundles feed a per-token ``cross.segment`` from the
#    table ``cross_segment`` and the whole context K/V to every step): a reader that ignored it would decode a
#    reference-pipeline bundle with the wrong inputs, so older readers must refuse these bundles
FORMAT_VERSION = 3
DTYPES = ("float32", "float16")
TENSOR_DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool")
SHA256 = re.compile(r"[0-9a-f]{64}")
SCALE_KEYS = ("scale", "patch_num", "tokens", "offset", "past", "segment", "level", "phi")


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, dtype and shape (ints, or symbols such as ``rows`` / ``past+tokens``)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph: its file, external weight file (if any), inputs and outputs; ``extra`` keeps the other
    keys a writer recorded (``derived_from``, ``opset``)."""

    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    external_data: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def files(self) -> tuple[str, ...]:
        return (self.file,) if self.external_data is None else (self.file, self.external_data)

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """The manifest entry (what ``export`` and ``build`` write)."""
        entry: dict[str, Any] = {
            "file": self.file,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }
        if self.external_data is not None:
            entry["external_data"] = self.external_data
        return {**entry, **self.extra}


@dataclass(frozen=True)
class ScaleEntry:
    """One row of the per-scale plan (the schedule's numbers for scale ``scale``)."""

    scale: int
    patch_num: int
    tokens: int
    offset: int
    past: int
    segment: int
    level: int
    phi: int


@dataclass(frozen=True)
class BatchSpec:
    """The shapes recorded at export: scans x samples per run and the rows that makes (x2 when guided)."""

    scans: int
    samples: int
    rows: int


@dataclass(frozen=True)
class Condition:
    kind: str  # "fmri" or "class"
    num_classes: int | None = None
    null_label: int | None = None
    input: str | None = None


@dataclass(frozen=True)
class PlanSpec:
    """A TensorRT plan recorded by ``build``: its file, optimization profiles and the build facts a loader checks
    (TensorRT version, GPU, compute capability, flags); ``extra`` keeps the other build details (precision,
    typing, timing)."""

    graph: str
    file: str
    profiles: tuple[dict[str, Any], ...]
    onnx: str | None = None  # the ONNX file the plan was built from
    tensorrt_version: str | None = None
    gpu: str | None = None
    compute_capability: str | None = None
    flags: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def version_compatible(self) -> bool:
        return "version_compatible" in self.flags


@dataclass(frozen=True)
class Manifest:
    format_version: int
    config: ModelConfig
    schedule: dict[str, Any]
    scales: tuple[ScaleEntry, ...]
    subjects: dict[str, int]
    condition: Condition
    dtype: str
    batch: BatchSpec
    sampling: SamplingConfig
    graphs: dict[str, GraphSpec]
    tables: dict[str, str]
    files: dict[str, FileEntry]
    context_map: str = "training"  # which context segment each query token reads (mindhier_rt/schedule.py)
    decode_loop: tuple[str, ...] = ()
    source: str | None = None
    versions: dict[str, Any] = field(default_factory=dict)
    plans: dict[str, PlanSpec] | None = None
    tensorrt: DecodePlan | None = None  # the binding plan ``build`` recorded (bundle/tensorrt_plan.py)

    def read_files(self) -> tuple[str, ...]:
        """Every file a reader of this bundle may open (each is listed in ``files``)."""
        names: list[str] = []
        for g in self.graphs.values():
            names.extend(g.files)
        names.extend(self.tables.values())
        for p in (self.plans or {}).values():
            names.extend([p.file, p.onnx] if p.onnx is not None else [p.file])
        return tuple(dict.fromkeys(names))


def _tensor(f: _Field) -> TensorSpec:
    dtype = f.key("dtype").str()
    if dtype not in TENSOR_DTYPES:
        raise f.key("dtype").error(f"one of {', '.join(TENSOR_DTYPES)}")
    shape: list[int | str] = []
    for d in f.key("shape").elements():
        if isinstance(d.value, str) and d.value:
            shape.append(d.value)
        else:
            shape.append(d.int())
    return TensorSpec(f.key("name").str(), dtype, tuple(shape))


def _graph(name: str, f: _Field) -> GraphSpec:
    ext = f.opt("external_data")
    extra = {k: v for k, v in f.obj().items() if k not in ("file", "inputs", "outputs", "external_data")}
    return GraphSpec(
        name=name,
        file=f.key("file").file(),
        inputs=tuple(_tensor(t) for t in f.key("inputs").elements()),
        outputs=tuple(_tensor(t) for t in f.key("outputs").elements()),
        external_data=None if ext is None else ext.file(),
        extra=extra,
    )


def _file_entry(f: _Field) -> FileEntry:
    digest = f.key("sha256").str()
    if not SHA256.fullmatch(digest):
        raise f.key("sha256").error("64 lowercase hex digits")
    return FileEntry(digest, f.key("bytes").int())


def _scale(i: int, f: _Field) -> ScaleEntry:
    entry = ScaleEntry(**{k: f.key(k).int() for k in SCALE_KEYS})
    if entry.scale != i:
        raise f.key("scale").error(f"{i} (its position in the list)")
    return entry


def _condition(f: _Field | None, cfg: ModelConfig) -> Condition:
    if f is None:  # bundles written before the key existed
        return Condition(cfg.generator.condition)
    kind = f.key("kind").str()
    if kind != cfg.generator.condition:
        raise f.key("kind").error(f"{cfg.generator.condition!r} (the config's condition)")
    num, null, inp = (f.opt(k) for k in ("num_classes", "null_label", "input"))
    return Condition(
        kind,
        None if num is None else num.int(1),
        None if null is None else null.int(),
        None if inp is None else inp.str(),
    )


_PLAN_FACTS = ("file", "profiles", "onnx", "tensorrt_version", "gpu", "compute_capability", "flags")


def _plans(f: _Field) -> dict[str, PlanSpec]:
    plans = {}
    for name, p in f.items():
        extra = {k: v for k, v in p.obj().items() if k not in _PLAN_FACTS}
        profiles = tuple(x.obj() for x in p.key("profiles").elements())
        onnx, version, gpu, cc, flags = (p.opt(k) for k in _PLAN_FACTS[2:])
        plans[name] = PlanSpec(
            graph=name,
            file=p.key("file").file(),
            profiles=profiles,
            onnx=None if onnx is None else onnx.file(),
            tensorrt_version=None if version is None else version.str(),
            gpu=None if gpu is None else gpu.str(),
            compute_capability=None if cc is None else cc.str(),
            flags=() if flags is None else tuple(x.str() for x in flags.elements()),
            extra=extra,
        )
    return plans


def _check_decode_plan(
    top: _Field, plan: DecodePlan, graphs: dict[str, GraphSpec], tables: dict[str, str], cfg: ModelConfig
) -> None:
    """The recorded bindings name the graphs' own inputs and outputs with their shapes, and the tables exist (a
    dtype that differs is the backend's to report: the plans were built for other graphs).

    A bound shape has its tensor's rank and fixed sizes; a symbolic size is at most the plan's rows (``rows``) or
    the pyramid's tokens (``tokens``, ``past+tokens``, ...). With every buffer no larger than its furthest use
    (``parse_decode_plan``), the memory a plan asks for is bounded by the rows it was built for and the model."""
    where = top.key("tensorrt")
    tokens = cfg.schedule.total_tokens
    for graph, table in plan.bindings.items():
        spec = graphs.get(graph)
        if spec is None:
            raise where.key("bindings").error(f"graphs of the bundle (no graph {graph!r})")
        tensors = {t.name: True for t in spec.inputs} | {t.name: False for t in spec.outputs}
        if {b.name: b.is_input for b in table.values()} != tensors:
            raise (
                where.key("bindings")
                .key(graph)
                .error(
                    f"a binding for each input and output of graph {graph} (the graph has {', '.join(sorted(tensors))})"
                )
            )
        for t in (*spec.inputs, *spec.outputs):
            for shape in table[t.name].shapes:
                fits = len(shape) == len(t.shape) and all(
                    n == d if isinstance(d, int) else n <= (plan.rows.rows if d == "rows" else tokens)
                    for n, d in zip(shape, t.shape, strict=True)
                )
                if not fits:
                    raise (
                        where.key("bindings")
                        .key(graph)
                        .error(f"shapes of {t.name} that fit {list(t.shape)} (rows <= {plan.rows.rows}, tokens <= "
                               f"{tokens}), not {list(shape)}")
                    )  # fmt: skip
    for upload in plan.tables:
        if upload.table not in tables:
            raise where.key("tables").error(f"tables of the bundle (no table {upload.table!r})")


def _required_graphs(cfg: ModelConfig, subjects: dict[str, int]) -> list[str]:
    updates = [f"update_{i}" for i in range(cfg.schedule.n_scales)]
    return [*(f"encoder_{s}" for s in subjects), "context", "generator_step", *updates, "vq_decoder"]


def parse_manifest(doc: object, source: str) -> Manifest:
    """Check ``doc`` (the JSON of ``manifest.json``) field by field; ``source`` names it in every message."""
    top = _Field(doc, "", source)
    if not isinstance(doc, dict):
        raise BundleError(f"{source}: expected the manifest to be a JSON object, found {type(doc).__name__}")
    fmt = doc.get("format")
    if fmt != FORMAT:
        raise BundleError(f"{source}: expected format {FORMAT!r}, found {fmt!r}")
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{source}: bundle format version {version} is not supported "
            f"(this mindhier-rt reads version {FORMAT_VERSION}); re-export it"
        )
    try:
        cfg = ModelConfig.from_dict(top.key("config").obj())
    except (ConfigError, TypeError, ValueError, KeyError) as e:
        raise BundleError(f"{source}: manifest field config: not a valid model config ({e})") from e

    schedule = top.key("schedule").obj()
    expected_schedule = json.loads(json.dumps(cfg.schedule.to_dict()))
    if schedule != expected_schedule:
        raise top.key("schedule").error(f"the config's schedule {json.dumps(expected_schedule)[:60]}...")
    scales = tuple(_scale(i, s) for i, s in enumerate(top.key("scales").elements()))
    if len(scales) != cfg.schedule.n_scales:
        raise top.key("scales").error(f"{cfg.schedule.n_scales} scales (the config's schedule)")
    for s in scales:
        want = (cfg.schedule.token_counts[s.scale], cfg.schedule.offsets[s.scale])
        if (s.tokens, s.offset) != want:
            raise top.key("scales").error(f"scale {s.scale} with tokens, offset = {want}")

    subjects = {k: v.int(1) for k, v in top.key("subjects").items()}
    condition = _condition(top.opt("condition"), cfg)
    dtype = top.key("dtype").str()
    if dtype not in DTYPES:
        raise top.key("dtype").error(f"one of {', '.join(DTYPES)}")
    b = top.key("batch")
    batch = BatchSpec(b.key("scans").int(1), b.key("samples").int(1), b.key("rows").int(1))
    try:
        sampling = SamplingConfig.from_dict(top.key("sampling").obj())
    except (ConfigError, TypeError) as e:
        raise BundleError(f"{source}: manifest field sampling: {e}") from e

    graphs = {name: _graph(name, g) for name, g in top.key("graphs").items()}
    missing = [g for g in _required_graphs(cfg, subjects) if g not in graphs]
    if missing:
        raise top.key("graphs").error(f"the decode loop's graphs (missing: {', '.join(missing)})")
    for g in graphs.values():
        for t in g.inputs:
            if t.dtype.startswith(("float", "bfloat")) and t.dtype != dtype:
                raise BundleError(
                    f"{source}: manifest field dtype: expected the dtype of the graphs' inputs, found {dtype!r} "
                    f"(graphs.{g.name} input {t.name} is {t.dtype})"
                )
    tables = {k: v.file() for k, v in top.key("tables").items()}
    context_map = top.key("context_map").str()
    if context_map != cfg.context_map:
        raise top.key("context_map").error(f"{cfg.context_map!r} (the config's context map)")
    per_token = cfg.generator.cross_attention and not cfg.schedule.single_segment
    if per_token != ("cross_segment" in tables):
        want = "a" if per_token else "no"
        raise top.key("tables").error(f"{want} cross_segment table (context map {context_map!r})")
    files = {check_name(k, f"{source}: manifest field files"): _file_entry(v) for k, v in top.key("files").items()}
    if "manifest.json" in files:
        raise top.key("files").error("the bundle's files other than manifest.json")

    loop = top.opt("decode_loop")
    src = top.opt("source")
    versions = top.opt("versions")
    plans = top.opt("plans")
    trt = top.opt("tensorrt")
    manifest = Manifest(
        format_version=version,
        config=cfg,
        schedule=schedule,
        scales=scales,
        subjects=subjects,
        condition=condition,
        dtype=dtype,
        batch=batch,
        sampling=sampling,
        graphs=graphs,
        tables=tables,
        files=files,
        context_map=context_map,
        decode_loop=() if loop is None else tuple(x.str() for x in loop.elements()),
        source=None if src is None or src.value is None else src.str(),
        versions={} if versions is None else versions.obj(),
        plans=None if plans is None else _plans(plans),
        tensorrt=None if trt is None else parse_decode_plan(trt),
    )
    if (manifest.plans is None) != (manifest.tensorrt is None):
        raise top.error("both plans and tensorrt (written together by `mindhier-rt build`), or neither")
    if manifest.tensorrt is not None:
        _check_decode_plan(top, manifest.tensorrt, graphs, tables, manifest.config)
    unlisted = [rel for rel in manifest.read_files() if rel not in files]
    if unlisted:
        raise BundleError(
            f"{source}: manifest field files: expected every file the runtime reads to be listed with its sha256, "
            f"found no entry for {', '.join(unlisted)}"
        )
    return manifest
