"""Device memory, one stream and CUDA graphs for the TensorRT backend: from PyTorch or from cuda-python.

``memory="torch"`` (default): buffers are torch CUDA tensors, streams and graphs torch's, and the contract's
tensors live on the GPU. ``memory="cuda-python"``: buffers come from ``cudaMalloc``, the stream and CUDA graphs
from the CUDA runtime through cuda-python, and no CUDA build of PyTorch is needed (a CPU-only torch is
enough): inputs are copied from host memory, outputs copied back, and sampling runs on the CPU with the same
shared routine, so the tokens are the same. ``DeviceMemory`` is the interface both offer (tests pass a
host-memory double).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from mindhier_rt.bundle.tensorrt_plan import ITEMSIZE
from mindhier_rt.errors import BackendError, MissingDependencyError

__all__ = ["TORCH_DTYPES", "CudaPythonMemory", "DeviceMemory", "Memory", "TorchMemory"]

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


class DeviceMemory(Protocol):
    """What the backend needs from device memory: buffers by address, one stream, CUDA graphs."""

    device: torch.device

    @property
    def stream_handle(self) -> int: ...

    def properties(self) -> tuple[str, str]:
        """(device name, "major.minor")."""
        ...

    def alloc(self, nbytes: int) -> int: ...

    def begin(self) -> None: ...

    def end(self) -> None: ...

    def write(self, ptr: int, shape: tuple[int, ...], dtype: str, src: Tensor) -> None: ...

    def read(self, ptr: int, shape: tuple[int, ...], dtype: str, rows: int) -> Tensor: ...

    def copy(self, dst: int, src: int, nbytes: int) -> None: ...

    def upload(self, ptr: int, array: np.ndarray) -> None: ...

    def zero(self, ptr: int, nbytes: int) -> None: ...

    def capture(self, run: Callable[[], None]) -> Any: ...

    def launch(self, graph: Any) -> None: ...

    def synchronize(self) -> None: ...


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

    def capture(self, run: Callable[[], None]) -> Any:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            run()
        return graph

    def launch(self, graph: Any) -> None:
        with torch.cuda.stream(self.stream):
            graph.replay()

    def synchronize(self) -> None:
        self.stream.synchronize()


def _cudart() -> Any:
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
        self.device = torch.device("cpu")  # where the contract's tensors live
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

    def capture(self, run: Callable[[], None]) -> Any:
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
