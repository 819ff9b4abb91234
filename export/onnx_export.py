"""Export a MindHier checkpoint to an engine bundle of ONNX graphs (see ``graphs.py`` for each graph).

Design: the generator is ONE ``generator_step`` graph whose token axis (and, in block-causal mode, the
past-length axis) is symbolic, so its weights exist once on disk and once in memory, and TensorRT can
build one engine with one optimization profile per scale (min = opt = max) sharing those weights.
Everything that differs between scales is an input: the embedded tokens, the rotary tables (sliced by
the host from ``rope_cos.npy`` / ``rope_sin.npy`` at the scale's offset) and the context segment
(a contiguous block of the segment-major context cache). The tiny per-scale VQ updates are one graph
per scale with fully static shapes. The batch-rows axis is symbolic everywhere; the manifest records
the concrete shapes of every scale for the bundle's batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import platform
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mindhier_rt.bundle import Bundle, staged_bundle, write_manifest
from mindhier_rt.bundle import tensor_names as tn
from mindhier_rt.errors import BackendError, ConfigError
from mindhier_rt.execution import exporting
from mindhier_rt.export.checks import check_graph
from mindhier_rt.export.graphs import ContextGraph, DecoderGraph, EncoderGraph, StepGraph, UpdateGraph
from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.sampling import SamplingConfig

log = logging.getLogger(__name__)


class _WithoutTorchvisionNotices(logging.Filter):
    """torch.onnx's exporter warns once per torchvision operator (nms, roi_align, ...) when torchvision is not
    installed; our graphs use none of them, so the notice tells the user nothing they could act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("torchvision is not installed")


logging.getLogger("torch.onnx._internal.exporter._registration").addFilter(_WithoutTorchvisionNotices())

OPSET = 18
EXTERNAL_DATA_BYTES = 64 << 20  # graphs with more weights than this keep them in a .data file
DTYPES = {"float32": torch.float32, "float16": torch.float16}

DECODE_LOOP = [
    "rows = scans * samples (scan-major); with guidance the batch is [conditional rows, unconditional rows]",
    "encoder_<subject>(voxels) -> pooled, context; the unconditional rows use the encoder output of all-zero voxels",
    "context(pooled, context) -> start, ada_blocks, ada_head, cross.{j}.key/value [M, B, H, T, c] (once per scan)",
    "for scale i in 0..K-1:",
    "  if guidance stops at i (sampling.cfg_stop): keep the first `rows` rows of every state tensor",
    "  h = start at i = 0, else the `h_next` output of update_{i-1}",
    "  generator_step(h, rope.cos/sin = rows offset_i .. offset_i + tokens_i of rope_*.npy ([L, head_dim]:"
    " cos repeated per rotary pair, sin signed (-sin, +sin) per pair), ada_blocks, ada_head,"
    " cross.{j}.key/value = segment `segment_i` of the context cache"
    " (context_map reference-pipeline: cross.segment = rows offset_i .. offset_i + tokens_i of"
    " cross_segment.npy (int64), cross.{j}.key/value = the whole context cache [B, H, M*T, c])"
    " [, past_key_values.{j}.key/value = present of scale i-1 (empty at i = 0)]) -> logits [, present]",
    "  guided: logits = (1 + t_i) * logits[:rows] - t_i * logits[rows:], t_i = cfg_scale * i / (K - 1)",
    "  idx_i = sample(logits, seed, scan, sample, i): the counter-based draw of docs/sampling.md",
    "  update_i(f_hat, idx_i) -> f_hat_next, h_next (the next scale's input; duplicate it for the unconditional rows)",
    "vq_decoder(f_hat) -> images in [0, 1]",
]

# The same loop for class-conditional models (VAR blocks): labels instead of an encoder, no rope or cross inputs.
DECODE_LOOP_CLASS = [
    "rows = labels * samples (label-major); with guidance the batch is [conditional rows, unconditional rows]",
    "labels: int64 class ids 0..num_classes-1 per row; the unconditional rows use the null label num_classes",
    "context(labels) -> start, ada_blocks, ada_head (once per batch)",
    "for scale i in 0..K-1:",
    "  if guidance stops at i (sampling.cfg_stop): keep the first `rows` rows of every state tensor",
    "  h = start at i = 0, else the `h_next` output of update_{i-1}",
    "  generator_step(h, ada_blocks, ada_head, past_key_values.{j}.key/value = present of scale i-1 (empty at i = 0))"
    " -> logits, present",
    "  guided: logits = (1 + t_i) * logits[:rows] - t_i * logits[rows:], t_i = cfg_scale * i / (K - 1)",
    "  idx_i = sample(logits, seed, scan, sample, i): the counter-based draw of docs/sampling.md",
    "  update_i(f_hat, idx_i) -> f_hat_next, h_next (the next scale's input; duplicate it for the unconditional rows)",
    "vq_decoder(f_hat) -> images in [0, 1]",
]


@dataclass
class GraphExport:
    name: str
    module: nn.Module
    args: tuple
    inputs: list[str]
    outputs: list[str]
    dynamic_shapes: tuple


def _tensor_spec(name: str, t: Tensor, dims: dict[int, str]) -> dict[str, Any]:
    shape = [dims.get(a, s) for a, s in enumerate(t.shape)]
    return {"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": shape}


def _flatten_dyn(spec: tuple) -> list[dict]:
    out: list[dict] = []
    for s in spec:
        if isinstance(s, tuple):
            out.extend(s)
        else:
            out.append(s)
    return out


def _flatten_args(args: tuple) -> list[Tensor]:
    out: list[Tensor] = []
    for a in args:
        out.extend(a if isinstance(a, tuple) else [a])
    return out


def graph_exports(
    models: MindHier, dtype: torch.dtype = torch.float32, subjects: list[str] | None = None
) -> list[GraphExport]:
    """The graphs of a bundle with example inputs (2 rows) and their symbolic axes."""
    from torch.export import Dim

    cfg, sched = models.cfg, models.cfg.schedule
    g, C, H = cfg.generator, cfg.generator.width, cfg.generator.heads
    c, d, D, E = C // H, g.depth, cfg.context_dim, cfg.latent_dim
    M, T, L, n = sched.n_levels, sched.context_tokens, sched.total_tokens, sched.last_side
    rows = Dim("rows", min=1, max=1 << 16)
    tokens = Dim("tokens", min=1, max=L)
    past = Dim("past", min=0, max=L)
    B = 2
    f = {"dtype": dtype}
    exports = []
    for subject, voxels in cfg.encoder.subjects if cfg.encoder is not None else ():
        if subjects is not None and subject not in subjects:
            continue
        exports.append(
            GraphExport(
                tn.encoder_graph(subject),
                EncoderGraph(models.encoder, subject),
                (torch.zeros(B, voxels, **f),),
                [tn.VOXELS],
                [tn.POOLED, tn.CONTEXT],
                ({0: rows},),
            )
        )
    cross_names = tn.per_layer(tn.cross_kv, d) if g.cross_attention else []
    if g.condition == "class":
        context_args: tuple = (torch.tensor([0, g.num_classes]),)
        context_inputs, context_dyn = [tn.LABELS], ({0: rows},)
    else:
        context_args = (torch.randn(B, g.pooled_dim or D, **f), torch.randn(B, M * T, D, **f))
        context_inputs, context_dyn = [tn.POOLED, tn.CONTEXT], ({0: rows}, {0: rows})
    exports.append(
        GraphExport(
            tn.CONTEXT_GRAPH,
            ContextGraph(models.generator),
            context_args,
            context_inputs,
            [tn.START, tn.ADA_BLOCKS, tn.ADA_HEAD, *cross_names],
            context_dyn,
        )
    )
    # trace the step at a scale with >= 2 tokens and >= 2 past tokens so no axis is specialised to 0 / 1
    i = 2 if sched.n_scales > 2 else sched.n_scales - 1
    l, off = sched.token_counts[i], sched.offsets[i]
    step_args: list[Tensor] = []
    step_dyn: list[dict] = []
    step_inputs = [tn.H]
    if g.rope:
        step_args += [
            models.generator.rope_cos_Lc[off : off + l].to(dtype),
            models.generator.rope_sin_Lc[off : off + l].to(dtype),
        ]
        step_dyn += [{0: tokens}, {0: tokens}]
        step_inputs += [tn.ROPE_COS, tn.ROPE_SIN]
    step_args += [torch.randn(d, B, 6, C, **f), torch.randn(B, 2, C, **f)]
    step_dyn += [{1: rows}, {0: rows}]
    step_inputs += [tn.ADA_BLOCKS, tn.ADA_HEAD]
    if g.cross_attention and not sched.single_segment:  # per-token context map: the segment of every token
        step_args.append(torch.tensor(sched.segment_of_token[sched.scale_slice(i)]))
        step_dyn.append({0: tokens})
        step_inputs.append(tn.CROSS_SEGMENT)
    step_inputs += cross_names
    cross_tokens = T if sched.single_segment else M * T
    step_args += [torch.randn(B, H, cross_tokens, c, **f) for _ in cross_names]
    step_dyn += [{0: rows} for _ in cross_names]
    step_outputs = [tn.LOGITS]
    if g.attn_mode == "block_causal":
        step_args += [torch.randn(B, H, off, c, **f) for _ in range(2 * d)]
        step_dyn += [{0: rows, 2: past} for _ in range(2 * d)]
        step_inputs += tn.per_layer(tn.past_kv, d)
        step_outputs += tn.per_layer(tn.present_kv, d)
    exports.append(
        GraphExport(
            tn.STEP_GRAPH,
            StepGraph(models.generator),
            (torch.randn(B, l, C, **f), *step_args),
            step_inputs,
            step_outputs,
            ({0: rows, 1: tokens}, tuple(step_dyn)),
        )
    )
    for i, count in enumerate(sched.token_counts):
        last = i == sched.n_scales - 1
        exports.append(
            GraphExport(
                tn.update_graph(i),
                UpdateGraph(models.vqvae, models.generator, i),
                (torch.zeros(B, E, n, n, **f), torch.zeros(B, count, dtype=torch.long)),
                [tn.F_HAT, tn.IDX],
                [tn.F_HAT_NEXT] if last else [tn.F_HAT_NEXT, tn.H_NEXT],
                ({0: rows}, {0: rows}),
            )
        )
    exports.append(
        GraphExport(
            tn.DECODER_GRAPH,
            DecoderGraph(models.vqvae),
            (torch.zeros(B, E, n, n, **f),),
            [tn.F_HAT],
            [tn.IMAGE],
            ({0: rows},),
        )
    )
    return exports


def _export_one(spec: GraphExport, path: Path) -> dict[str, Any]:
    """Export one graph to ``path`` (external data beside it when large); return its manifest entry."""
    spec.module.eval()
    weight_bytes = sum(t.numel() * t.element_size() for t in spec.module.state_dict().values())
    with (
        torch.no_grad(),
        exporting(),
        contextlib.redirect_stdout(io.StringIO()),
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
        program = torch.onnx.export(
            spec.module, spec.args, dynamo=True, opset_version=OPSET, input_names=spec.inputs,
            output_names=spec.outputs, dynamic_shapes=spec.dynamic_shapes, optimize=True, verbose=False,
        )  # fmt: skip
        external = weight_bytes > EXTERNAL_DATA_BYTES
        program.save(str(path), external_data=external)
        outs = spec.module(*spec.args)
    axis_names = {0: "rows"}
    ins = []
    for name, t, dyn in zip(spec.inputs, _flatten_args(spec.args), _flatten_dyn(spec.dynamic_shapes), strict=True):
        ins.append(_tensor_spec(name, t, {a: dim.__name__ for a, dim in dyn.items()}))
    outs = outs if isinstance(outs, tuple) else (outs,)
    out_specs = []
    for name, t in zip(spec.outputs, outs, strict=True):
        dims = dict(axis_names)
        if spec.name == tn.CONTEXT_GRAPH and name not in (tn.START, tn.ADA_HEAD):
            # ada_blocks [depth, rows, 6, C]; cross [M, rows, H, T, c] (per-token context map: [rows, H, S, c])
            dims = {0: "rows"} if t.ndim == 4 and name.startswith(tn.CROSS_PREFIX) else {1: "rows"}
        if spec.name == tn.STEP_GRAPH:
            dims = {0: "rows", 1: "tokens"} if name == tn.LOGITS else {0: "rows", 2: "past+tokens"}
        out_specs.append(_tensor_spec(name, t, dims))
    check_graph(path)
    entry: dict[str, Any] = {"file": path.name, "inputs": ins, "outputs": out_specs}
    if external:
        entry["external_data"] = path.name + ".data"
    return entry


def scale_table(models: MindHier) -> list[dict[str, int]]:
    s = models.cfg.schedule
    return [
        {
            "scale": i,
            "patch_num": s.patch_nums[i],
            "tokens": s.token_counts[i],
            "offset": s.offsets[i],
            "past": s.cached_lengths[i] if models.cfg.generator.attn_mode == "block_causal" else 0,
            "segment": s.segment_of_scale[i],
            "level": s.level_of_scale[i],
            "segments": list(s.segments_of_scale[i]),
            "phi": s.phi_index[i],
        }
        for i in range(s.n_scales)
    ]


def export_bundle(
    models: MindHier,
    out: Path,
    dtype: str = "float32",
    batch: int = 1,
    samples: int = 1,
    sampling: SamplingConfig | None = None,
    source: str | None = None,
    on_graph: Callable[[str], None] | None = None,  # called with each graph's name as its export starts
    subjects: list[str] | None = None,
) -> Bundle:
    """Write the bundle of ``models`` to ``out``; returns it opened (checksums verified).

    The bundle is written into a new folder beside ``out`` and moved there only when complete
    (``bundle.staging``): ``out`` may be absent, an empty folder or an earlier bundle (replaced only then); a file
    or a folder of other files is refused. Nothing that export did not write is deleted or listed.
    ``subjects`` limits the encoder graphs to those subjects (default: every subject of the config).
    """
    try:
        import onnx
        import onnxscript
    except ImportError as e:
        raise BackendError(f"ONNX export needs the onnx extra: pip install 'mindhier-rt[onnx]' ({e})") from e
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if batch < 1 or samples < 1:
        raise ConfigError(f"batch and samples must be >= 1, got {batch} and {samples}")
    sampling = sampling or SamplingConfig()
    known = [s for s, _ in models.cfg.encoder.subjects] if models.cfg.encoder is not None else []
    unknown = sorted(set(subjects or ()) - set(known))
    if unknown:
        raise ConfigError(f"unknown subject(s) {', '.join(unknown)}; this model knows: {', '.join(known)}")
    versions = {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": getattr(onnxscript, "__version__", "?"),
        "opset": OPSET,
        "exporter": "torch.onnx.export(dynamo=True)",
        "python": platform.python_version(),
    }
    out = Path(out)
    with staged_bundle(out) as stage:
        _write_bundle(models, stage, dtype, batch, samples, sampling, source, on_graph, subjects, versions)
        written = Bundle.open(stage)  # the new bundle is checked before it replaces anything
    return dataclasses.replace(written, root=out)


def _write_bundle(
    models: MindHier,
    out: Path,
    dtype: str,
    batch: int,
    samples: int,
    sampling: SamplingConfig,
    source: str | None,
    on_graph: Callable[[str], None] | None,
    subjects: list[str] | None,
    versions: dict[str, Any],
) -> None:
    """Write every file of the bundle into the (new, empty) folder ``out``, the manifest last."""
    models = models.eval()
    if dtype != "float32":
        models = _half_models(models, DTYPES[dtype])
    graphs: dict[str, Any] = {}
    for spec in graph_exports(models, DTYPES[dtype], subjects):
        if on_graph:
            on_graph(spec.name)
        graphs[spec.name] = _export_one(spec, out / f"{spec.name}.onnx")
    cfg = models.cfg
    g = cfg.generator
    tables = {}
    if g.rope:
        np.save(out / "rope_cos.npy", models.generator.rope_cos_Lc.float().numpy())
        np.save(out / "rope_sin.npy", models.generator.rope_sin_Lc.float().numpy())
        tables = {tn.ROPE_COS_TABLE: f"{tn.ROPE_COS_TABLE}.npy", tn.ROPE_SIN_TABLE: f"{tn.ROPE_SIN_TABLE}.npy"}
    if g.cross_attention and not cfg.schedule.single_segment:  # the per-token context map, [L] int64
        np.save(out / "cross_segment.npy", np.asarray(cfg.schedule.segment_of_token, dtype=np.int64))
        tables[tn.CROSS_SEGMENT_TABLE] = f"{tn.CROSS_SEGMENT_TABLE}.npy"
    rows = batch * samples * (2 if sampling.cfg_scale > 0 else 1)
    encoder_subjects = cfg.encoder.subjects if cfg.encoder is not None else ()
    condition: dict[str, Any] = {"kind": g.condition}
    if g.condition == "class":
        condition.update(num_classes=g.num_classes, null_label=g.num_classes, input="context.labels")
    manifest = {
        "config": cfg.to_dict(),
        "schedule": cfg.schedule.to_dict(),
        "scales": scale_table(models),
        "subjects": {s: v for s, v in encoder_subjects if subjects is None or s in subjects},
        "condition": condition,
        "dtype": dtype,
        "batch": {"scans": batch, "samples": samples, "rows": rows},
        "sampling": sampling.to_dict(),
        "graphs": graphs,
        "tables": tables,
        "context_map": cfg.context_map,
        "decode_loop": DECODE_LOOP_CLASS if g.condition == "class" else DECODE_LOOP,
        "source": source,
        "versions": versions,
    }
    write_manifest(out, manifest)


def _half_models(models: MindHier, dtype: torch.dtype) -> MindHier:
    import copy

    half = copy.deepcopy(models)
    for m in half.modules().values():
        m.to(dtype)
    return half
