"""The TensorRT backend: runs the plans ``mindhier-rt build`` wrote, driven by ``pipeline.reconstruct`` unchanged.

How a decode runs
    Every device buffer is allocated once, at load, from the bundle's binding plan
    (``export/tensorrt_build.py``: buffer names, sizes, and the buffer and byte offset of every tensor of
    every profile). Each graph gets one execution context per optimization profile (the generator step:
    one per scale), its input shapes and tensor addresses set once with ``set_input_shape`` /
    ``set_tensor_address``; all contexts share one scratch allocation (they run one after another on one
    stream). A run is ``execute_async_v3`` on the backend's stream; the first run of a (graph, profile)
    is the warm-up, the second captures it into a CUDA graph that every later run replays, so a scale's
    step is one graph launch. Nothing in the loop synchronises the host: outputs are views of the device
    buffers, the caller's stream waits on the backend's stream with an event, and token sampling runs on
    the GPU with the shared routine (``mindhier_rt.sampling``) because the logits are CUDA tensors.

    The context step writes its outputs where the steps read them: scale 0's input is the ``start``
    output, each scale's cross-attention K/V is a contiguous segment of the context cache (a pointer
    offset), the rotary rows are laid out per scale in one table uploaded at load. The self-attention
    cache of block-causal bundles is updated in place (``in_place`` plans: ``present`` and ``past`` are one
    buffer, checked with ``get_aliased_input_tensor``) or alternates between two buffers (``ping_pong``).

Rows
    Plans have static shapes (one profile per scale, min = opt = max). A decode with fewer rows than the
    plans were built for fills the first rows and leaves the rest (rows are independent); once guidance
    stops (``cfg_stop``) the unconditional rows keep being computed and are ignored, so the captured
    graphs stay valid. More rows than built is an error that says how to rebuild.

Device memory
    ``memory="torch"`` (default): buffers are torch CUDA tensors, streams and graphs torch's, and the
    contract's tensors live on the GPU. ``memory="cuda-python"``: buffers come from ``cudaMalloc``, the
    stream and CUDA graphs from the CUDA runtime through cuda-python, and no CUDA build of PyTorch is
    needed (a CPU-only torch, which the package imports, is enough): inputs are copied from host memory,
    outputs copied back, and sampling runs on the CPU with the same shared routine, so the tokens are the
    same. That path suits slim deployments and hosts that drive the loop themselves.

Load-time checks
    Every plan's metadata is compared with the running TensorRT and GPU (``check_plan_metadata``: exact
    TensorRT version unless built ``--version-compatible``, same compute capability), every engine's I/O
    names, modes and dtypes with the manifest, and every output shape with the binding plan; a mismatch is
    a ``PlanMismatchError`` that says what to rebuild. Without TensorRT or without a GPU the constructor
    raises ``MissingDependencyError`` (the CLI prints one line and exits with code 2).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from mindhier_rt.bundle import Bundle
from mindhier_rt.errors import BackendError, InputError, MissingDependencyError
from mindhier_rt.export.tensorrt_build import (
    INSTALL_TENSORRT,
    ITEMSIZE,
    KV_GRAPH,
    Binding,
    DecodePlan,
    PlanMismatchError,
    RuntimeEnvironment,
    check_plan_metadata,
    decode_plan_from_manifest,
)
from mindhier_rt.runtime.base import DecodeBackend, ScaleUpdate

log = logging.getLogger(__name__)

__all__ = ["CudaPythonMemory", "TensorRTBackend", "TorchMemory", "load_tensorrt_runtime"]

TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
    "uint8": torch.uint8,
}
Memory = Literal["torch", "cuda-python"]


def load_tensorrt_runtime() -> tuple[Any, bool]:
    """(module, is_lean): ``tensorrt``, else the lean runtime ``tensorrt_lean`` (version-compatible plans only)."""
    try:
        import tensorrt

        return tensorrt, False
    except (ImportError, OSError) as e:
        reason = str(e)
    try:
        import tensorrt_lean

        return tensorrt_lean, True
    except (ImportError, OSError):
        pass
    raise MissingDependencyError(
        f"the tensorrt backend needs TensorRT ({reason}): {INSTALL_TENSORRT}; plans built with "
        f"--version-compatible also run on the lean runtime (`pip install tensorrt-lean-cu12`)"
    )


# ---- device memory, streams and CUDA graphs ----------------------------------------------------------
class TorchMemory:
    """Device buffers, one stream and CUDA graphs from PyTorch; contract tensors stay on the GPU."""

    def __init__(self, device: str | torch.device = "cuda") -> None:
        if not torch.cuda.is_available():
            raise MissingDependencyError(
                "the tensorrt backend needs a CUDA GPU and torch sees none (no device or driver, or a CPU-only "
                "torch build): run on a GPU machine, or pass memory='cuda-python' with cuda-python installed"
            )
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise BackendError(f"memory='torch' runs on a CUDA device, got {device!r}")
        self.stream = torch.cuda.Stream(self.device)
        self._buffers: dict[int, Tensor] = {}

    @property
    def stream_handle(self) -> int:
        return self.stream.cuda_stream

    def properties(self) -> tuple[str, str]:
        """(device name, "major.minor")."""
        major, minor = torch.cuda.get_device_capability(self.device)
        return torch.cuda.get_device_name(self.device), f"{major}.{minor}"

    def alloc(self, nbytes: int) -> int:
        buf = torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
        ptr = buf.data_ptr()
        self._buffers[ptr] = buf
        return ptr

    def _bytes(self, ptr: int, nbytes: int) -> Tensor:
        for base, buf in self._buffers.items():
            if base <= ptr and ptr + nbytes <= base + buf.numel():
                return buf[ptr - base : ptr - base + nbytes]
        raise BackendError(f"address {ptr:#x} is outside every buffer of this backend")

    def view(self, ptr: int, shape: tuple[int, ...], dtype: str) -> Tensor:
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        return self._bytes(ptr, nbytes).view(TORCH_DTYPES[dtype]).view(shape)

    def begin(self) -> None:
        """The backend's stream waits for the caller's work (its inputs)."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def end(self) -> None:
        """The caller's stream waits for the backend's work (the outputs)."""
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def write(self, ptr: int, shape: tuple[int, ...], dtype: str, src: Tensor) -> None:
        """Copy ``src`` ([rows <= shape[0], ...]) into the first rows of the tensor at ``ptr``."""
        src = src.to(self.device)
        with torch.cuda.stream(self.stream):
            self.view(ptr, shape, dtype)[: src.shape[0]].copy_(src)
        src.record_stream(self.stream)

    def read(self, ptr: int, shape: tuple[int, ...], dtype: str, rows: int) -> Tensor:
        return self.view(ptr, shape, dtype)[:rows]

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        with torch.cuda.stream(self.stream):
            self._bytes(dst, nbytes).copy_(self._bytes(src, nbytes))

    def upload(self, ptr: int, array: np.ndarray) -> None:
        data = torch.from_numpy(np.ascontiguousarray(array).view(np.uint8).reshape(-1)).pin_memory()
        with torch.cuda.stream(self.stream):
            self._bytes(ptr, data.numel()).copy_(data, non_blocking=True)
        self.stream.synchronize()

    def zero(self, ptr: int, nbytes: int) -> None:
        with torch.cuda.stream(self.stream):
            self._bytes(ptr, nbytes).zero_()

    def capture(self, run) -> Any:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            run()
        return graph

    def launch(self, graph: Any) -> None:
        with torch.cuda.stream(self.stream):
            graph.replay()

    def synchronize(self) -> None:
        self.stream.synchronize()


def _cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError as e:
            raise MissingDependencyError(
                f"memory='cuda-python' needs cuda-python ({e}): pip install 'cuda-python>=12.3' "
                "(or the project's gpu extra: pip install 'mindhier-rt[gpu]')"
            ) from e
    return cudart


class CudaPythonMemory:
    """Device buffers, a stream and CUDA graphs from the CUDA runtime (cuda-python): no CUDA build of torch.

    Contract tensors live in host memory (CPU torch tensors): inputs are copied in, outputs copied out.
    """

    def __init__(self) -> None:
        self.rt = _cudart()
        err, count = self.rt.cudaGetDeviceCount()
        if int(err) != 0 or count == 0:
            raise MissingDependencyError(
                f"the tensorrt backend needs a CUDA GPU: the CUDA runtime reports {self._name(err)} "
                "(no device, or no driver): run on a GPU machine"
            )
        self.stream = self._check(self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking))
        self._allocations: list[Any] = []
        self._graphs: list[tuple[Any, Any]] = []

    def _name(self, err: Any) -> str:
        return getattr(err, "name", str(err))

    def _check(self, result: Any) -> Any:
        err, *values = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            _, text = self.rt.cudaGetErrorString(err)
            raise BackendError(f"CUDA error {self._name(err)}: {text.decode() if isinstance(text, bytes) else text}")
        return values[0] if len(values) == 1 else (tuple(values) or None)

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def properties(self) -> tuple[str, str]:
        props = self._check(self.rt.cudaGetDeviceProperties(0))
        name = props.name
        name = name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)
        return name, f"{props.major}.{props.minor}"

    def alloc(self, nbytes: int) -> int:
        ptr = self._check(self.rt.cudaMalloc(nbytes))
        self._allocations.append(ptr)
        self.zero(int(ptr), nbytes)
        self.synchronize()
        return int(ptr)

    def begin(self) -> None:
        pass

    def end(self) -> None:
        pass

    def write(self, ptr: int, shape: tuple[int, ...], dtype: str, src: Tensor) -> None:
        host = src.detach().to("cpu", TORCH_DTYPES[dtype]).contiguous()
        nbytes = host.numel() * host.element_size()
        self._check(
            self.rt.cudaMemcpyAsync(
                ptr, host.data_ptr(), nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream
            )
        )
        self.synchronize()  # the host tensor may go away after this call

    def read(self, ptr: int, shape: tuple[int, ...], dtype: str, rows: int) -> Tensor:
        host = torch.empty((rows, *shape[1:]), dtype=TORCH_DTYPES[dtype])
        nbytes = host.numel() * host.element_size()
        self._check(
            self.rt.cudaMemcpyAsync(
                host.data_ptr(), ptr, nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream
            )
        )
        self.synchronize()
        return host

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self._check(self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, self.stream))

    def upload(self, ptr: int, array: np.ndarray) -> None:
        host = np.ascontiguousarray(array)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, kind, self.stream))
        self.synchronize()

    def zero(self, ptr: int, nbytes: int) -> None:
        self._check(self.rt.cudaMemsetAsync(ptr, 0, nbytes, self.stream))

    def capture(self, run) -> Any:
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._check(self.rt.cudaStreamBeginCapture(self.stream, mode))
        try:
            run()
        finally:
            graph = self._check(self.rt.cudaStreamEndCapture(self.stream))
        executable = self._check(self.rt.cudaGraphInstantiate(graph, 0))
        self._graphs.append((graph, executable))
        return executable

    def launch(self, graph: Any) -> None:
        self._check(self.rt.cudaGraphLaunch(graph, self.stream))

    def synchronize(self) -> None:
        self._check(self.rt.cudaStreamSynchronize(self.stream))

    def close(self) -> None:
        self.synchronize()
        for graph, executable in self._graphs:
            self.rt.cudaGraphExecDestroy(executable)
            self.rt.cudaGraphDestroy(graph)
        for ptr in self._allocations:
            self.rt.cudaFree(ptr)
        self.rt.cudaStreamDestroy(self.stream)
        self._graphs, self._allocations = [], []

    def __del__(self) -> None:
        if getattr(self, "_allocations", None):
            with contextlib.suppress(Exception):  # interpreter shutdown: the runtime may be gone already
                self.close()


# ---- engines -------------------------------------------------------------------------------------------
def _scratch_bytes(engine: Any, profile: int) -> int:
    for attr in ("get_device_memory_size_for_profile_v2", "get_device_memory_size_for_profile"):
        fn = getattr(engine, attr, None)
        if fn is not None:
            return int(fn(profile))
    return int(getattr(engine, "device_memory_size_v2", None) or engine.device_memory_size)


class _Engine:
    """One deserialized plan with an execution context per optimization profile."""

    def __init__(self, trt: Any, runtime: Any, graph: str, file: str, blob: bytes, table: dict[str, Binding]) -> None:
        self.trt, self.graph, self.table = trt, graph, table
        self.engine = runtime.deserialize_cuda_engine(blob)  # the plan's checked bytes (Bundle.read_bytes)
        if self.engine is None:
            raise PlanMismatchError(f"TensorRT could not deserialize {file} (its log above says why)")
        self._check_io()
        self.n_profiles = len(next(iter(table.values())).shapes)
        if self.engine.num_optimization_profiles != self.n_profiles:
            raise PlanMismatchError(
                f"{file} has {self.engine.num_optimization_profiles} optimization profiles, "
                f"the manifest expects {self.n_profiles}: rebuild the plans"
            )
        self.contexts: list[Any] = []

    def _check_io(self) -> None:
        trt, engine = self.trt, self.engine
        dtypes = {
            "float32": trt.DataType.FLOAT,
            "float16": trt.DataType.HALF,
            "bfloat16": trt.DataType.BF16,
            "int64": trt.DataType.INT64,
            "int32": trt.DataType.INT32,
            "bool": trt.DataType.BOOL,
        }
        names = {engine.get_tensor_name(k) for k in range(engine.num_io_tensors)}
        if names != set(self.table):
            raise PlanMismatchError(
                f"plan of {self.graph}: engine tensors {sorted(names ^ set(self.table))} differ from the manifest"
            )
        for name, b in self.table.items():
            mode = engine.get_tensor_mode(name)
            if (mode == trt.TensorIOMode.INPUT) != b.is_input:
                raise PlanMismatchError(f"plan of {self.graph}: {name} is an {mode.name.lower()} in the engine")
            if engine.get_tensor_dtype(name) != dtypes[b.dtype]:
                raise PlanMismatchError(
                    f"plan of {self.graph}: {name} is {engine.get_tensor_dtype(name)} in the engine, "
                    f"{b.dtype} in the manifest: rebuild the plans"
                )

    def scratch_bytes(self) -> int:
        return max(_scratch_bytes(self.engine, p) for p in range(self.n_profiles))

    def create_contexts(self, scratch: int, scratch_bytes: int, stream: int, address: Any) -> None:
        """One context per profile: profile, input shapes and every tensor address set once."""
        trt = self.trt
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        for p in range(self.n_profiles):
            if strategy is not None:
                ctx = self.engine.create_execution_context(strategy.USER_MANAGED)
            else:
                ctx = self.engine.create_execution_context_without_device_memory()
            if hasattr(ctx, "set_device_memory"):
                ctx.set_device_memory(scratch, scratch_bytes)
            else:
                ctx.device_memory = scratch
            if not ctx.set_optimization_profile_async(p, stream):
                raise BackendError(f"{self.graph}: could not select optimization profile {p}")
            for name, b in self.table.items():
                if b.is_input and not ctx.set_input_shape(name, b.shapes[p]):
                    raise PlanMismatchError(f"{self.graph}: profile {p} does not admit {name} {b.shapes[p]}")
            for name, b in self.table.items():
                if not ctx.set_tensor_address(name, address(b, p)):
                    raise BackendError(f"{self.graph}: TensorRT refused the address of {name} (profile {p})")
            for name, b in self.table.items():
                if not b.is_input and tuple(ctx.get_tensor_shape(name)) != b.shapes[p]:
                    raise PlanMismatchError(
                        f"plan of {self.graph}: {name} has shape {tuple(ctx.get_tensor_shape(name))} in profile "
                        f"{p}, the binding plan expects {b.shapes[p]}: rebuild the plans"
                    )
            self.contexts.append(ctx)


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
        memory: Memory | Any = "torch",
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
            self.memory: Any = TorchMemory(device)
        elif memory == "cuda-python":
            self.memory = CudaPythonMemory()
        elif isinstance(memory, str):
            raise BackendError(f"memory must be 'torch' or 'cuda-python', got {memory!r}")
        else:
            self.memory = memory
        self.device = getattr(self.memory, "device", torch.device("cpu"))
        gpu = self.memory.properties()
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle, verify=verify)
        manifest = self.bundle.manifest
        plans = manifest.get("plans")
        if not plans:
            raise PlanMismatchError(
                f"{self.bundle.root} has no TensorRT plans: run `mindhier-rt build --engine {self.bundle.root}`"
            )
        all_compatible = all("version_compatible" in p.get("flags", []) for p in plans.values())
        env = RuntimeEnvironment(trt.__version__, gpu[0], gpu[1], lean)
        self.plan: DecodePlan = decode_plan_from_manifest(manifest)
        for graph in self.plan.graphs:
            if graph not in plans:
                raise PlanMismatchError(f"the manifest has no plan for {graph}: rebuild the plans")
            for warning in check_plan_metadata(graph, plans[graph], env):
                log.warning(warning)
        self.cfg = self.bundle.cfg
        self.dtype = self.bundle.spec.dtype
        self.cuda_graphs = cuda_graphs
        self.trt = trt
        self.logger = trt.Logger(getattr(trt.Logger, log_level))
        self.runtime = trt.Runtime(self.logger)
        if all_compatible and hasattr(self.runtime, "engine_host_code_allowed"):
            self.runtime.engine_host_code_allowed = True  # version-compatible plans embed their lean runtime
        self.buffers = {name: self.memory.alloc(nbytes) for name, nbytes in self.plan.buffers.items()}
        self._upload_tables()
        self.engines = {
            g: _Engine(
                trt, self.runtime, g, plans[g]["file"], self.bundle.read_bytes(plans[g]["file"]), self.plan.bindings[g]
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
        self._f_hat_ptr = [self.address(f"update_{i}", "f_hat", 0) for i in range(K)]
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
        step = self.plan.bindings[self.plan.step_graph]
        rope_dtype = step["rope.cos"].dtype if "rope.cos" in step else "float32"
        for key, buffer in (("rope_cos", "table.rope_cos"), ("rope_sin", "table.rope_sin")):
            if buffer not in self.buffers:
                continue
            rows = torch.from_numpy(self.bundle.load_table(key)).to(TORCH_DTYPES[rope_dtype])
            image = np.zeros(self.plan.buffers[buffer], np.uint8)
            for first, count, offset in self.plan.rope_layout:
                data = rows[first : first + count].contiguous().view(torch.uint8).numpy().reshape(-1)
                image[offset : offset + data.size] = data
            self.memory.upload(self.buffers[buffer], image)
        if "table.cross_segment" in self.buffers:  # the per-token context map (reference-pipeline)
            segment = self.bundle.load_table("cross_segment").astype(np.int64)
            image = np.zeros(self.plan.buffers["table.cross_segment"], np.uint8)
            for first, count, offset in self.plan.segment_layout:
                image[offset : offset + count * 8] = segment[first : first + count].view(np.uint8)
            self.memory.upload(self.buffers["table.cross_segment"], image)
        if self.plan.write_indices_stride is not None:
            stride, rows = self.plan.write_indices_stride, self.plan.rows.rows
            image = np.zeros(self.plan.buffers["table.write_indices"], np.uint8)
            for i, scale in enumerate(self.bundle.spec.scales):
                image[i * stride : i * stride + rows * 8] = np.full(rows, scale.offset, np.int64).view(np.uint8)
            self.memory.upload(self.buffers["table.write_indices"], image)

    def _check_aliasing(self) -> None:
        engine = self.engines[KV_GRAPH].engine
        if not hasattr(engine, "get_aliased_input_tensor"):
            raise PlanMismatchError(
                "this TensorRT cannot report aliased tensors, so the in-place cache plan is unsafe here: "
                "rebuild with `mindhier-rt build --kv-cache ping-pong`"
            )
        for name in self.plan.bindings[KV_GRAPH]:
            if name.startswith("present."):
                alias = engine.get_aliased_input_tensor(name)
                expected = "past_key_values." + name.removeprefix("present.")
                if alias != expected:
                    raise PlanMismatchError(
                        f"{KV_GRAPH}: TensorRT aliases {name} to {alias!r}, not {expected!r} (no in-place cache "
                        "update in this plan): rebuild with `mindhier-rt build --kv-cache ping-pong`"
                    )

    def _run(self, graph: str, profile: int) -> None:
        """Execute one context; from its second run on, as a replay of a captured CUDA graph."""
        engine = self.engines[graph]
        ctx = engine.contexts[profile]
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
        capture = self.cuda_graphs and runs >= 1 and not graph.startswith("encoder_")
        if capture:
            try:
                self._graphs[key] = self.memory.capture(lambda: self._execute(ctx, stream, graph))
                self.memory.launch(self._graphs[key])
                return
            except Exception as e:  # a TensorRT or driver that cannot capture: run without graphs
                log.warning("CUDA graph capture of %s (profile %d) failed, running uncaptured: %s", graph, profile, e)
                self.cuda_graphs = False
        self._execute(ctx, stream, graph)
        self._runs[key] = runs + 1

    @staticmethod
    def _execute(ctx: Any, stream: int, graph: str) -> None:
        if not ctx.execute_async_v3(stream):
            raise BackendError(f"TensorRT failed to run {graph} (its log above says why)")

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
        graph = f"encoder_{subject}"
        voxels_b = self.plan.binding(graph, "voxels")
        expected = voxels_b.shapes[0][1]  # the loop has checked the voxels against voxel_count
        N = voxels_BV.shape[0]
        self._check_rows(N, voxels_b.shapes[0][0], "the voxel batch")
        self.memory.begin()
        self._write(graph, "voxels", 0, voxels_BV)
        ctx = self.engines[graph].contexts[0]
        ctx.set_input_shape("voxels", (N, expected))
        self._run(graph, 0)
        self.memory.end()  # before any work on the caller's stream touches the outputs
        pooled = self._read(graph, "pooled", 0, N).float().clone()
        context = self._read(graph, "context", 0, N).float().clone()
        return pooled, context

    def prepare(self, pooled_BD: Tensor, context_BSD: Tensor | None = None) -> TrtState:
        """The context step on (pooled, context), or on class labels [B] for class-conditional bundles."""
        rows = pooled_BD.shape[0]
        self._check_rows(rows, self.plan.rows.rows, "the context step")
        names = [s["name"] for s in self.bundle.manifest["graphs"]["context"]["inputs"]]
        given = [pooled_BD] if context_BSD is None else [pooled_BD, context_BSD]
        if len(given) != len(names):
            raise InputError(f"the context step of this bundle takes {', '.join(names)}, got {len(given)} tensor(s)")
        self.memory.begin()
        for name, tensor in zip(names, given, strict=True):
            self._write("context", name, 0, tensor)
        self._run("context", 0)
        self._copied = {}
        self.memory.end()
        return TrtState(rows)

    def select(self, state: TrtState, rows: slice) -> TrtState:
        kept = range(state.rows)[rows]
        if kept.start != 0 or kept.step != 1:
            raise BackendError(f"the tensorrt backend keeps a prefix of the rows, got {rows}")
        return TrtState(len(kept))

    def step(self, i: int, state: TrtState, x_BlC: Tensor | None) -> Tensor:
        graph = self.plan.step_graph
        self.memory.begin()
        if i > 0:
            assert x_BlC is not None
            self._write(graph, "h", i, x_BlC)
        self._run(graph, i)
        self.memory.end()
        return self._read(graph, "logits", i, state.rows).float()  # a view: valid until the next step

    def empty_fhat(self, batch: int) -> Tensor:
        self._check_rows(batch, self.plan.rows.sample_rows, "the latent batch")
        b = self.plan.binding("update_0", "f_hat")
        self.memory.begin()
        self.memory.zero(self._f_hat_ptr[0], b.nbytes(0))
        self.memory.end()
        return self.memory.read(self._f_hat_ptr[0], b.shapes[0], b.dtype, batch)

    def update(self, i: int, f_hat_BEhw: Tensor, idx_Bl: Tensor) -> ScaleUpdate:
        graph = f"update_{i}"
        rows = f_hat_BEhw.shape[0]
        self._check_rows(rows, self.plan.rows.sample_rows, "the latent batch")
        self.memory.begin()
        self._write(graph, "f_hat", 0, f_hat_BEhw)
        self._write(graph, "idx", 0, idx_Bl)
        self._run(graph, 0)
        self.memory.end()
        f_hat = self._read(graph, "f_hat_next", 0, rows)
        x_next = self._read(graph, "h_next", 0, rows) if "h_next" in self.plan.bindings[graph] else None
        return ScaleUpdate(f_hat, x_next)

    def decode_image(self, f_hat_BEhw: Tensor) -> Tensor:
        rows = f_hat_BEhw.shape[0]
        self.memory.begin()
        self._write("vq_decoder", "f_hat", 0, f_hat_BEhw)
        self._run("vq_decoder", 0)
        self.memory.end()
        return self._read("vq_decoder", "image", 0, rows).float().clone()
