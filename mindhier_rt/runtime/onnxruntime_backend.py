"""The ONNX Runtime backend: runs an engine bundle's graphs, no PyTorch models needed.

Inputs and outputs are bound with IOBinding. On CPU the numpy buffers are handed over without copies
and the segment of the context cache a scale reads is a contiguous view (the cache is segment-major).
The CUDA execution provider is used where onnxruntime-gpu is installed and ``providers`` asks for it.

Threads on the CPU. The decode loop alternates ONNX Runtime runs with host work in PyTorch (guidance combine,
token sampling), and the two thread pools compete for the same cores:
* ONNX Runtime's workers spin between the kernels of a run (``spinning=True``, the default) and are told to
  stop when the run ends (``session.force_spinning_stop``), so they never busy-wait through PyTorch's work.
  Without the stop, spinning made the small preset's decode 2.7x slower on a 2-core CPU.
* PyTorch's OpenMP workers busy-wait for a while after each parallel region and then sit on the cores the
  next ONNX Runtime run needs. With the CPU execution provider the backend therefore asks the loop to run
  its host work on ``host_threads`` PyTorch threads (default 1; ``None`` leaves PyTorch's setting alone):
  ``runtime.base.host_threads`` applies it around the loop and restores the setting afterwards.
Together these moved the small preset's onnxruntime decode from 0.74-0.81x to 0.69-0.73x of eager PyTorch at
batch 4 (paired medians of three A/B runs) and from 0.72x to 0.57x at batch 1, although sampling alone is slower
on one thread (``benchmarks/ort_threads_ab.py``, ``benchmarks/results/profile_small_cpu.md``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mindhier_rt.bundle import Bundle, OnnxGraph
from mindhier_rt.bundle import tensor_names as tn
from mindhier_rt.errors import BackendError, BundleError
from mindhier_rt.runtime.base import DecodeBackend, ScaleUpdate

log = logging.getLogger(__name__)


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendError(
            "the onnxruntime backend needs onnxruntime: pip install 'mindhier-rt[onnx]' "
            "(or onnxruntime-gpu for the CUDA execution provider)"
        ) from e
    return onnxruntime


@dataclass
class OrtState:
    start: np.ndarray  # [B, 1, C]
    ada_blocks: np.ndarray  # [depth, B, 6, C]
    ada_head: np.ndarray  # [B, 2, C]
    # 2 * depth arrays [M, B, H, T, c] (key, value per layer; per-token context map: [B, H, M*T, c]); empty for VAR
    cross: list[np.ndarray]
    past: list[np.ndarray] | None  # block-causal: 2 * depth arrays [B, H, past, c]


def _tensors(graph) -> Iterator:
    """Every TensorProto of an ONNX graph: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def _check_external_refs(graph: OnnxGraph, bundle: Bundle) -> None:
    """Every external weight file the model refers to must be the checked one the manifest lists; otherwise
    onnxruntime would open a file by the name inside the model, outside the bundle's checks."""
    import onnx

    try:
        model = onnx.load_from_string(graph.model)
    except Exception as e:  # protobuf's DecodeError and friends: the bytes are not an ONNX model
        raise BundleError(f"{bundle.root}: graph {graph.name} is not a readable ONNX model ({e})") from e
    refs = {
        entry.value
        for t in _tensors(model.graph)
        if t.data_location == onnx.TensorProto.EXTERNAL
        for entry in t.external_data
        if entry.key == "location"
    }
    unlisted = sorted(refs - set(graph.external))
    if unlisted:
        raise BundleError(
            f"{bundle.root}: graph {graph.name} reads weights from {', '.join(unlisted)}; expected only its "
            f"manifest external_data ({', '.join(graph.external) or 'none'})"
        )


class OnnxRuntimeBackend(DecodeBackend):
    name = "onnxruntime"

    def __init__(
        self,
        bundle: Bundle | str | Path,
        providers: list[str] | None = None,
        threads: int | None = None,
        spinning: bool = True,
        host_threads: int | None = 1,
    ) -> None:
        ort = _ort()
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        self.cfg = self.bundle.cfg
        self.device = torch.device("cpu")
        self.providers = providers or ["CPUExecutionProvider"]
        missing = [p for p in self.providers if p not in ort.get_available_providers()]
        if missing:
            raise BackendError(
                f"onnxruntime here offers {', '.join(ort.get_available_providers())}, not {', '.join(missing)}"
            )
        self.threads, self.spinning = threads, spinning
        self.options = self._session_options()
        # PyTorch threads for the loop's host work; only the CPU provider competes with them for cores
        self.host_threads = host_threads if self.providers == ["CPUExecutionProvider"] else None
        self._sessions: dict[str, object] = {}
        self.dtype = np.dtype(self.bundle.spec.dtype)
        self.rope_cos = self.rope_sin = None  # VAR blocks have no rotary tables
        if tn.ROPE_COS_TABLE in self.bundle.spec.tables:
            self.rope_cos = self.bundle.load_table(tn.ROPE_COS_TABLE).astype(self.dtype)
            self.rope_sin = self.bundle.load_table(tn.ROPE_SIN_TABLE).astype(self.dtype)
        self.block_causal = self.cfg.generator.attn_mode == "block_causal"
        g = self.cfg.generator
        # per-token context map (reference-pipeline): each step reads the whole context and its tokens' segments
        self.cross_segment = None
        if tn.CROSS_SEGMENT_TABLE in self.bundle.spec.tables:
            table = self.bundle.load_table(tn.CROSS_SEGMENT_TABLE)
            want = np.asarray(self.cfg.schedule.segment_of_token, dtype=np.int64)
            if table.shape != want.shape or not np.array_equal(table, want):
                raise BundleError(
                    f"{self.bundle.root}: table cross_segment {table.dtype}{list(table.shape)} is not the context map "
                    f"{self.cfg.context_map!r} of the config's schedule (int64[{want.size}])"
                )
            self.cross_segment = want
        self.class_condition = g.condition == "class"
        self._empty_past = (g.heads, g.head_dim)

    # ---- plumbing --------------------------------------------------------------------------------
    def _session_options(self):
        ort = _ort()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            options.intra_op_num_threads = self.threads
        for pool in ("intra_op", "inter_op"):
            options.add_session_config_entry(f"session.{pool}.allow_spinning", "1" if self.spinning else "0")
        options.add_session_config_entry("session.force_spinning_stop", "1")
        return options

    def session(self, name: str):
        """The session of graph ``name``, created from the bundle's checked bytes (never from a path, so the
        graph and weights used are the ones whose SHA-256 matched, and nothing outside the bundle is opened)."""
        if name not in self._sessions:
            ort = _ort()
            graph = self.bundle.onnx_graph(name)
            _check_external_refs(graph, self.bundle)
            options = self.options
            if graph.external:
                options = self._session_options()
                names = list(graph.external)
                data = [graph.external[n] for n in names]
                options.add_external_initializers_from_files_in_memory(names, data, [len(d) for d in data])
            self._sessions[name] = ort.InferenceSession(graph.model, options, providers=self.providers)
        return self._sessions[name]

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        sess = self.session(name)
        binding = sess.io_binding()
        for key, value in feeds.items():
            binding.bind_cpu_input(key, np.ascontiguousarray(value))
        for out in sess.get_outputs():
            binding.bind_output(out.name, "cpu")
        sess.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def _in(self, t: Tensor) -> np.ndarray:
        return t.detach().cpu().numpy().astype(self.dtype, copy=False)

    @staticmethod
    def _out(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).float()

    # ---- the decode contract ---------------------------------------------------------------------
    def voxel_count(self, subject: str) -> int:
        return self.bundle.voxel_count(subject)

    def encode(self, voxels_BV: Tensor, subject: str) -> tuple[Tensor, Tensor]:
        self.bundle.encoder_graph(subject)
        pooled, context = self.run(tn.encoder_graph(subject), {tn.VOXELS: self._in(voxels_BV)})
        return self._out(pooled), self._out(context)

    def prepare(self, pooled_BD: Tensor, context_BSD: Tensor | None) -> OrtState:
        if self.class_condition:  # class labels, no context
            feeds = {tn.LABELS: pooled_BD.detach().cpu().numpy().astype(np.int64)}
        else:
            feeds = {tn.POOLED: self._in(pooled_BD), tn.CONTEXT: self._in(context_BSD)}
        start, ada_blocks, ada_head, *cross = self.run(tn.CONTEXT_GRAPH, feeds)
        past = None
        if self.block_causal:
            H, c = self._empty_past
            past = [np.zeros((start.shape[0], H, 0, c), self.dtype) for _ in range(2 * self.cfg.generator.depth)]
        return OrtState(start, ada_blocks, ada_head, cross, past)

    def select(self, state: OrtState, rows: slice) -> OrtState:
        whole = self.cross_segment is not None
        return OrtState(
            start=state.start[rows],
            ada_blocks=state.ada_blocks[:, rows],
            ada_head=state.ada_head[rows],
            # rows are axis 1 of the segment-major cache, axis 0 of the whole-context one
            cross=[np.ascontiguousarray(x[rows] if whole else x[:, rows]) for x in state.cross],
            past=None if state.past is None else [p[rows] for p in state.past],
        )

    def step(self, i: int, state: OrtState, h_BlC: Tensor | None) -> Tensor:
        sched = self.cfg.schedule
        tokens, segment = sched.scale_slice(i), sched.segment_of_scale[i]
        h = state.start if i == 0 else self._in(h_BlC)
        feeds = {tn.H: h, tn.ADA_BLOCKS: state.ada_blocks, tn.ADA_HEAD: state.ada_head}
        if self.rope_cos is not None:
            feeds[tn.ROPE_COS], feeds[tn.ROPE_SIN] = self.rope_cos[tokens], self.rope_sin[tokens]
        per_token = self.cross_segment is not None
        if per_token and state.cross:
            feeds[tn.CROSS_SEGMENT] = self.cross_segment[tokens]
        for j in range(self.cfg.generator.depth):
            if state.cross:
                feeds[tn.cross_kv(j, "key")] = state.cross[2 * j] if per_token else state.cross[2 * j][segment]
                feeds[tn.cross_kv(j, "value")] = (
                    state.cross[2 * j + 1] if per_token else state.cross[2 * j + 1][segment]
                )
            if state.past is not None:
                feeds[tn.past_kv(j, "key")] = state.past[2 * j]
                feeds[tn.past_kv(j, "value")] = state.past[2 * j + 1]
        logits, *present = self.run(tn.STEP_GRAPH, feeds)
        if state.past is not None:
            state.past = present
        return self._out(logits)

    def empty_fhat(self, batch: int) -> Tensor:
        n = self.cfg.schedule.last_side
        return torch.zeros(batch, self.cfg.latent_dim, n, n)

    def update(self, i: int, f_hat_BEhw: Tensor, idx_Bl: Tensor) -> ScaleUpdate:
        feeds = {tn.F_HAT: self._in(f_hat_BEhw), tn.IDX: idx_Bl.cpu().numpy().astype(np.int64)}
        outs = self.run(tn.update_graph(i), feeds)
        return ScaleUpdate(self._out(outs[0]), self._out(outs[1]) if len(outs) > 1 else None)

    def decode_image(self, f_hat_BEhw: Tensor) -> Tensor:
        (image,) = self.run(tn.DECODER_GRAPH, {tn.F_HAT: self._in(f_hat_BEhw)})
        return self._out(image)
