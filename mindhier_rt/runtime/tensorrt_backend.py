"""The TensorRT backend: runs the plans ``mindhier-rt build`` wrote, driven by ``pipeline.reconstruct`` unchanged.

How a decode runs
    Every device buffer is allocated once, at load, from the binding plan recorded in the manifest
    (``mindhier_rt/bundle/tensorrt_plan.py``: buffer names and sizes, the buffer and byte offset of every
    tensor of every profile, the tables to place). Each graph is a ``TensorRTEngine`` with one execution
    context per optimization profile (the generator step: one per scale). A run is ``execute_async_v3`` on
    the backend's stream; the first run of a (graph, profile) is the warm-up, the second captures it into a
    CUDA graph that every later run replays, so a scale's step is one graph launch. Nothing in the loop
    synchronises the host: outputs are views of the device buffers, the caller's stream waits on the
    backend's stream with an event, and token sampling runs on the GPU with the shared routine
    (``mindhier_rt.sampling``) because the logits are CUDA tensors. Device memory comes from PyTorch or
    cuda-python (``device_memory.py``).

Rows
    Plans have static shapes (one profile per scale, min = opt = max). A decode with fewer rows than the
    plans were built for fills the first rows and leaves the rest (rows are independent); once guidance
    stops (``cfg_stop``) the unconditional rows keep being computed and are ignored, so the captured
    graphs stay valid. More rows than built is an error that says how to rebuild.

Load-time checks
    Every plan's build facts are compared with the running TensorRT and GPU (``check_plan_metadata``),
    every engine's I/O with the recorded bindings, and, for in-place caches, that TensorRT aliases each
    ``present`` output to its ``past_key_values`` input; a mismatch is a ``PlanMismatchError`` that says what
    to rebuild. Without TensorRT or without a GPU the constructor raises ``MissingDependencyError``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from mindhier_rt.bundle import Bundle, DecodePlan
from mindhier_rt.bundle import tensor_names as tn
from mindhier_rt.bundle.tensorrt_plan import Binding
from mindhier_rt.errors import BackendError, InputError
from mindhier_rt.runtime.base import DecodeBackend, ScaleUpdate
from mindhier_rt.runtime.device_memory import TORCH_DTYPES, CudaPythonMemory, DeviceMemory, Memory, TorchMemory
from mindhier_rt.runtime.tensorrt_compat import (
    PlanMismatchError,
    RuntimeEnvironment,
    check_plan_metadata,
    load_tensorrt_runtime,
)
from mindhier_rt.runtime.tensorrt_engine import TensorRTEngine

if TYPE_CHECKING:  # the published type stubs (tests/test_tensorrt_types.py checks this module against them)
    import tensorrt as trt_api

log = logging.getLogger(__name__)

__all__ = ["TensorRTBackend", "TrtState"]


@dataclass
class TrtState:
    """Per-scan state: everything else lives in the backend's buffers (one decode at a time per backend)."""

    rows: int  # rows of the current decode (cond + uncond while guided), <= the built rows


class TensorRTBackend(DecodeBackend):
    """Decode backend on TensorRT plans (see the module docstring)."""

    name = "tensorrt"

    def __init__(
        self,
        bundle: Bundle | str | Path,
        memory: Memory | DeviceMemory = "torch",
        device: str | torch.device = "cuda",
        cuda_graphs: bool = True,
        verify: bool = True,
        log_level: str = "WARNING",
        tensorrt: tuple[Any, bool] | None = None,
    ) -> None:
        """``memory``: "torch", "cuda-python" or an object with the same methods (tests pass a host-memory
        double); ``tensorrt``: (module, is_lean) with TensorRT's runtime API, default the installed one."""
        # what is missing is reported in this order: TensorRT, then a GPU, then the bundle
        trt, lean = tensorrt if tensorrt is not None else load_tensorrt_runtime()
        if memory == "torch":
            self.memory: DeviceMemory = TorchMemory(device)
        elif memory == "cuda-python":
            self.memory = CudaPythonMemory()
        elif isinstance(memory, str):
            raise BackendError(f"memory must be 'torch' or 'cuda-python', got {memory!r}")
        else:
            self.memory = memory
        self.device = self.memory.device
        gpu = self.memory.properties()
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle, verify=verify)
        spec = self.bundle.spec
        if spec.plans is None or spec.tensorrt is None:
            raise PlanMismatchError(
                f"{self.bundle.root} has no TensorRT plans: run `mindhier-rt build --engine {self.bundle.root}`"
            )
        plans = spec.plans
        env = RuntimeEnvironment(trt.__version__, gpu[0], gpu[1], lean)
        self.plan: DecodePlan = spec.tensorrt
        for graph in self.plan.graphs:
            if graph not in plans:
                raise PlanMismatchError(f"the manifest has no plan for {graph}: rebuild the plans")
            for t in (*spec.graphs[graph].inputs, *spec.graphs[graph].outputs):
                if self.plan.binding(graph, t.name).dtype != t.dtype:
                    raise PlanMismatchError(
                        f"{graph} {t.name} is {t.dtype} in the bundle's graphs, "
                        f"{self.plan.binding(graph, t.name).dtype} in the plans: rebuild the plans"
                    )
            for warning in check_plan_metadata(plans[graph], env):
                log.warning(warning)
        self.cfg = self.bundle.cfg
        self.dtype = self.bundle.spec.dtype
        self.cuda_graphs = cuda_graphs
        self.trt = trt
        self.logger: trt_api.Logger = trt.Logger(getattr(trt.Logger, log_level))
        self.runtime: trt_api.Runtime = trt.Runtime(self.logger)
        if all(plans[g].version_compatible for g in self.plan.graphs):
            self.runtime.engine_host_code_allowed = True  # version-compatible plans embed their lean runtime
        self.buffers = {name: self.memory.alloc(nbytes) for name, nbytes in self.plan.buffers.items()}
        self._upload_tables()
        self.engines = {
            g: TensorRTEngine(
                trt, self.runtime, g, plans[g].file, self.bundle.read_bytes(plans[g].file), self.plan.bindings[g]
            )
            for g in self.plan.graphs
        }
        if self.plan.self_cache == "in_place":
            self._check_aliasing()
        scratch_bytes = max(e.scratch_bytes() for e in self.engines.values())
        self._scratch = self.memory.alloc(max(scratch_bytes, 256))
        for engine in self.engines.values():
            engine.create_contexts(self._scratch, scratch_bytes, self.memory.stream_handle, self._address)
        self.memory.synchronize()
        self._runs: dict[tuple[str, int], int] = {}
        self._graphs: dict[tuple[str, int], Any] = {}
        self._copied: dict[str, tuple[str, int]] = {}
        K = self.cfg.schedule.n_scales
        self._f_hat_ptr = [self.address(tn.update_graph(i), tn.F_HAT, 0) for i in range(K)]
        log.info(
            "tensorrt backend: %d plans, %s self cache, %d rows, %.1f MB of buffers, %.1f MB scratch",
            len(self.engines), self.plan.self_cache, self.plan.rows.rows,
            sum(self.plan.buffers.values()) / 1e6, scratch_bytes / 1e6,
        )  # fmt: skip

    # ---- plumbing --------------------------------------------------------------------------------------
    def _address(self, b: Binding, profile: int) -> int:
        return self.buffers[b.buffer[profile]] + b.offsets[profile]

    def address(self, graph: str, name: str, profile: int = 0) -> int:
        return self._address(self.plan.binding(graph, name), profile)

    def _upload_tables(self) -> None:
        """The plan's tables (rows of bundle tables at recorded offsets) and fills (write indices), once."""
        for upload in self.plan.tables:
            table = self.bundle.load_table(upload.table)
            if table.ndim == 0 or int(np.prod(table.shape[1:])) != upload.columns:
                raise PlanMismatchError(
                    f"table {upload.table} has shape {table.shape}, the plan places rows of {upload.columns} "
                    "values: rebuild the plans"
                )
            rows = (
                torch.from_numpy(np.ascontiguousarray(table)).reshape(table.shape[0], -1).to(TORCH_DTYPES[upload.dtype])
            )
            image = np.zeros(self.plan.buffers[upload.buffer], np.uint8)
            for first, count, offset in upload.layout:
                if first + count > rows.shape[0]:
                    raise PlanMismatchError(
                        f"table {upload.table} has {rows.shape[0]} rows, the plan reads {first + count}"
                    )
                data = rows[first : first + count].contiguous().view(torch.uint8).numpy().reshape(-1)
                image[offset : offset + data.size] = data
            self.memory.upload(self.buffers[upload.buffer], image)
        images: dict[str, np.ndarray] = {}
        for fill in self.plan.fills:
            image = images.setdefault(fill.buffer, np.zeros(self.plan.buffers[fill.buffer], np.uint8))
            image[fill.offset : fill.offset + fill.count * 8] = np.full(fill.count, fill.value, np.int64).view(np.uint8)
        for buffer, image in images.items():
            self.memory.upload(self.buffers[buffer], image)

    def _check_aliasing(self) -> None:
        engine = self.engines[tn.KV_STEP_GRAPH]
        for name in self.plan.bindings[tn.KV_STEP_GRAPH]:
            if name.startswith(tn.PRESENT_PREFIX):
                alias = engine.aliased_input(name)
                expected = tn.PAST_PREFIX + name.removeprefix(tn.PRESENT_PREFIX)
                if alias != expected:
                    raise PlanMismatchError(
                        f"{tn.KV_STEP_GRAPH}: TensorRT aliases {name} to {alias!r}, not {expected!r} (no in-place "
                        "cache update in this plan): rebuild with `mindhier-rt build --kv-cache ping-pong`"
                    )

    def _run(self, graph: str, profile: int) -> None:
        """Execute one context; from its second run on, as a replay of a captured CUDA graph."""
        engine = self.engines[graph]
        stream = self.memory.stream_handle
        key = (graph, profile)
        for name, b in engine.table.items():  # misaligned segments: copied in when they change
            if b.copy_from is not None and self._copied.get(f"{graph}.{name}") != b.copy_from[profile]:
                src_buffer, src_offset = b.copy_from[profile]
                self.memory.copy(self._address(b, profile), self.buffers[src_buffer] + src_offset, b.nbytes(profile))
                self._copied[f"{graph}.{name}"] = b.copy_from[profile]
        if key in self._graphs:
            self.memory.launch(self._graphs[key])
            return
        runs = self._runs.get(key, 0)
        capture = self.cuda_graphs and runs >= 1 and not graph.startswith(tn.ENCODER_PREFIX)
        if capture:
            try:
                self._graphs[key] = self.memory.capture(lambda: engine.execute(profile, stream))
                self.memory.launch(self._graphs[key])
                return
            except Exception as e:  # a TensorRT or driver that cannot capture: run without graphs
                log.warning("CUDA graph capture of %s (profile %d) failed, running uncaptured: %s", graph, profile, e)
                self.cuda_graphs = False
        engine.execute(profile, stream)
        self._runs[key] = runs + 1

    def _write(self, graph: str, name: str, profile: int, src: Tensor) -> None:
        b = self.plan.binding(graph, name)
        ptr = self._address(b, profile)
        if src.data_ptr() == ptr and src.device == self.device:
            return  # already there (a view this backend returned)
        self.memory.write(ptr, b.shapes[profile], b.dtype, src)

    def _read(self, graph: str, name: str, profile: int, rows: int) -> Tensor:
        b = self.plan.binding(graph, name)
        return self.memory.read(self._address(b, profile), b.shapes[profile], b.dtype, rows)

    def _check_rows(self, rows: int, built: int, what: str) -> None:
        if rows > built:
            r = self.plan.rows
            raise BackendError(
                f"{what} has {rows} rows, the plans were built for {built} ({r.scans} scan(s) x {r.samples} "
                f"sample(s){', guided' if r.guided else ''}): decode fewer scans at once (--batch) or rebuild "
                f"with `mindhier-rt build --batch N --samples S`"
            )

    # ---- the decode contract -----------------------------------------------------------------------------
    def encode(self, voxels_BV: Tensor, subject: str) -> tuple[Tensor, Tensor]:
        self.bundle.encoder_graph(subject)
        graph = tn.encoder_graph(subject)
        voxels_b = self.plan.binding(graph, tn.VOXELS)
        expected = voxels_b.shapes[0][1]  # the loop has checked the voxels against voxel_count
        N = voxels_BV.shape[0]
        self._check_rows(N, voxels_b.shapes[0][0], "the voxel batch")
        self.memory.begin()
        self._write(graph, tn.VOXELS, 0, voxels_BV)
        self.engines[graph].set_rows(0, tn.VOXELS, (N, expected))
        self._run(graph, 0)
        self.memory.end()  # before any work on the caller's stream touches the outputs
        pooled = self._read(graph, tn.POOLED, 0, N).float().clone()
        context = self._read(graph, tn.CONTEXT, 0, N).float().clone()
        return pooled, context

    def prepare(self, pooled_BD: Tensor, context_BSD: Tensor | None = None) -> TrtState:
        """The context step on (pooled, context), or on class labels [B] for class-conditional bundles."""
        rows = pooled_BD.shape[0]
        self._check_rows(rows, self.plan.rows.rows, "the context step")
        names = [s.name for s in self.bundle.spec.graphs[tn.CONTEXT_GRAPH].inputs]
        given = [pooled_BD] if context_BSD is None else [pooled_BD, context_BSD]
        if len(given) != len(names):
            raise InputError(f"the context step of this bundle takes {', '.join(names)}, got {len(given)} tensor(s)")
        self.memory.begin()
        for name, tensor in zip(names, given, strict=True):
            self._write(tn.CONTEXT_GRAPH, name, 0, tensor)
        self._run(tn.CONTEXT_GRAPH, 0)
        self._copied = {}
        self.memory.end()
        return TrtState(rows)

    def select(self, state: TrtState, rows: slice) -> TrtState:
        kept = range(state.rows)[rows]
        if kept.start != 0 or kept.step != 1:
            raise BackendError(f"the tensorrt backend keeps a prefix of the rows, got {rows}")
        return TrtState(len(kept))

    def step(self, i: int, state: TrtState, h_BlC: Tensor | None) -> Tensor:
        graph = self.plan.step_graph
        self.memory.begin()
        if i > 0:
            assert h_BlC is not None
            self._write(graph, tn.H, i, h_BlC)
        self._run(graph, i)
        self.memory.end()
        return self._read(graph, tn.LOGITS, i, state.rows).float()  # a view: valid until the next step

    def empty_fhat(self, batch: int) -> Tensor:
        self._check_rows(batch, self.plan.rows.sample_rows, "the latent batch")
        b = self.plan.binding(tn.update_graph(0), tn.F_HAT)
        self.memory.begin()
        self.memory.zero(self._f_hat_ptr[0], b.nbytes(0))
        self.memory.end()
        return self.memory.read(self._f_hat_ptr[0], b.shapes[0], b.dtype, batch)

    def update(self, i: int, f_hat_BEhw: Tensor, idx_Bl: Tensor) -> ScaleUpdate:
        graph = tn.update_graph(i)
        rows = f_hat_BEhw.shape[0]
        self._check_rows(rows, self.plan.rows.sample_rows, "the latent batch")
        self.memory.begin()
        self._write(graph, tn.F_HAT, 0, f_hat_BEhw)
        self._write(graph, tn.IDX, 0, idx_Bl)
        self._run(graph, 0)
        self.memory.end()
        f_hat = self._read(graph, tn.F_HAT_NEXT, 0, rows)
        h_next = self._read(graph, tn.H_NEXT, 0, rows) if tn.H_NEXT in self.plan.bindings[graph] else None
        return ScaleUpdate(f_hat, h_next)

    def decode_image(self, f_hat_BEhw: Tensor) -> Tensor:
        rows = f_hat_BEhw.shape[0]
        self.memory.begin()
        self._write(tn.DECODER_GRAPH, tn.F_HAT, 0, f_hat_BEhw)
        self._run(tn.DECODER_GRAPH, 0)
        self.memory.end()
        return self._read(tn.DECODER_GRAPH, tn.IMAGE, 0, rows).float().clone()
