"""A TensorRT double for the tests: plans are JSON, engines run the ONNX graph with onnxruntime on host memory.

``FakeTensorRT`` has the slice of TensorRT's runtime API the backend calls, and refuses what TensorRT refuses:
input shapes outside the optimization profile's min .. max, a context run before every input shape and address
is set, addresses that are not 256-byte aligned, and one execution whose output overlaps another bound tensor
unless the engine aliases that output to that input (TensorRT's in-place cache update).
"""

from __future__ import annotations

import ctypes
import enum
import json
import math

import numpy as np
import torch

from mindhier_rt.bundle import Bundle
from mindhier_rt.bundle.tensor_names import KV_STEP_GRAPH as KV_GRAPH
from mindhier_rt.bundle.tensorrt_plan import ALIGNMENT, ITEMSIZE
from mindhier_rt.errors import BackendError
from mindhier_rt.export.tensorrt_policy import BuildEnvironment
from mindhier_rt.runtime.tensorrt_backend import TensorRTBackend
from mindhier_rt.runtime.tensorrt_compat import version_tuple

FAKE_VERSION = "10.15.1.29"  # has TensorScatter: in-place caches


class FakePlanBuilder:
    def __init__(self, version: str = FAKE_VERSION, fail_on: str | None = None) -> None:
        weak = frozenset({"fp16", "bf16"}) if version_tuple(version) < (11,) else frozenset()
        self.env = BuildEnvironment(version, "Fake GPU", "9.0", weak)
        self.fail_on, self.built, self.finished = fail_on, [], False

    def environment(self) -> BuildEnvironment:
        return self.env

    def build(self, graph, onnx_path, profiles, typing, precision, options) -> bytes:
        if graph == self.fail_on:
            raise BackendError(f"TensorRT failed to build {graph}")
        self.built.append((graph, len(profiles), typing, precision))
        aliases = {}
        if graph == KV_GRAPH:
            names = [s["name"] for s in json.loads((onnx_path.parent / "manifest.json").read_text())["graphs"][
                "generator_step"]["outputs"]]  # fmt: skip
            aliases = {n: "past_key_values." + n.removeprefix("present.") for n in names if n.startswith("present.")}
        return json.dumps({"onnx": str(onnx_path), "profiles": profiles, "aliases": aliases}).encode()

    def finish(self) -> None:
        self.finished = True


class FakeTensorRT:
    """The part of TensorRT's runtime API the backend uses."""

    __version__ = FAKE_VERSION

    class Logger:
        WARNING, INFO, ERROR = 2, 3, 1

        def __init__(self, level: int = 2) -> None:
            self.level = level

    DataType = enum.Enum("DataType", "FLOAT HALF BF16 INT64 INT32 BOOL")
    TensorIOMode = enum.Enum("TensorIOMode", "INPUT OUTPUT")
    ExecutionContextAllocationStrategy = enum.Enum("ExecutionContextAllocationStrategy", "STATIC USER_MANAGED")

    class Runtime:
        def __init__(self, logger) -> None:
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, blob: bytes):
            return FakeEngine(json.loads(blob))


ORT_TYPES = {
    "tensor(float)": ("FLOAT", np.float32),
    "tensor(float16)": ("HALF", np.float16),
    "tensor(int64)": ("INT64", np.int64),
}


class FakeEngine:
    def __init__(self, spec: dict) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(spec["onnx"], opts, providers=["CPUExecutionProvider"])
        self.profiles, self.aliases = spec["profiles"], spec["aliases"]
        self.num_optimization_profiles = len(self.profiles)
        self.io = {t.name: (True, t.type) for t in self.session.get_inputs()}
        self.io.update({t.name: (False, t.type) for t in self.session.get_outputs()})
        self.names = list(self.io)
        self.num_io_tensors = len(self.names)
        self.contexts: list[FakeContext] = []

    def get_tensor_name(self, k: int) -> str:
        return self.names[k]

    def get_tensor_mode(self, name: str):
        return FakeTensorRT.TensorIOMode.INPUT if self.io[name][0] else FakeTensorRT.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str):
        return FakeTensorRT.DataType[ORT_TYPES[self.io[name][1]][0]]

    def get_device_memory_size_for_profile_v2(self, profile: int) -> int:
        return 1024

    def get_aliased_input_tensor(self, name: str) -> str | None:
        return self.aliases.get(name)

    def create_execution_context(self, strategy):
        assert strategy == FakeTensorRT.ExecutionContextAllocationStrategy.USER_MANAGED
        ctx = FakeContext(self)
        self.contexts.append(ctx)
        return ctx


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.shapes, self.addresses, self.profile, self.runs = engine, {}, {}, None, 0
        self.output_shapes: dict[tuple, dict[str, tuple[int, ...]]] = {}

    def set_device_memory(self, ptr: int, size: int) -> None:
        assert ptr and size >= 1024

    def set_optimization_profile_async(self, profile: int, stream: int) -> bool:
        self.profile = profile
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        """False, as TensorRT, for a shape outside the selected profile's min .. max (or an unknown input)."""
        if self.profile is None or name not in self.engine.io or not self.engine.io[name][0]:
            return False
        limits = self.engine.profiles[self.profile].get(name)
        if limits is not None:
            low, high = limits["min"], limits["max"]
            if len(shape) != len(low) or not all(lo <= d <= hi for lo, d, hi in zip(low, shape, high, strict=True)):
                return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        assert ptr % ALIGNMENT == 0, name
        self.addresses[name] = ptr
        return True

    def _inputs(self, zeros: bool = False) -> dict[str, np.ndarray]:
        feeds = {}
        for name, (is_input, kind) in self.engine.io.items():
            if is_input:
                dtype = ORT_TYPES[kind][1]
                shape = self.shapes[name]
                if zeros:
                    feeds[name] = np.zeros(shape, dtype)
                else:
                    n = math.prod(shape) * np.dtype(dtype).itemsize
                    raw = (ctypes.c_char * max(n, 1)).from_address(self.addresses[name])
                    feeds[name] = np.frombuffer(raw, dtype, count=math.prod(shape)).reshape(shape).copy()
        return feeds

    def get_tensor_shape(self, name: str):
        if name in self.shapes:
            return self.shapes[name]
        key = tuple(sorted(self.shapes.items()))
        if key not in self.output_shapes:  # run once on zeros per set of input shapes
            outs = self.engine.session.run(None, self._inputs(zeros=True))
            names = [o.name for o in self.engine.session.get_outputs()]
            self.output_shapes[key] = dict(zip(names, [o.shape for o in outs], strict=True))
        return self.output_shapes[key][name]

    def _spans(self) -> dict[str, tuple[int, int]]:
        """Byte range [start, end) of every bound tensor in this execution."""
        spans = {}
        for name, (is_input, kind) in self.engine.io.items():
            dtype = np.dtype(ORT_TYPES[kind][1])
            shape = self.shapes[name] if is_input else self.get_tensor_shape(name)
            spans[name] = (self.addresses[name], self.addresses[name] + math.prod(shape) * dtype.itemsize)
        return spans

    def check_bindings(self) -> None:
        """What TensorRT refuses or leaves undefined: a missing shape or address, and an output that overlaps
        another bound tensor unless the engine aliases it to exactly that input at the same address."""
        missing = [
            n
            for n, (is_input, _) in self.engine.io.items()
            if n not in self.addresses or (is_input and n not in self.shapes)
        ]
        if missing:
            raise BackendError(f"fake TensorRT: {', '.join(missing)} not bound")
        spans = self._spans()
        for out, (is_input, _) in self.engine.io.items():
            if is_input:
                continue
            for other, span in spans.items():
                if other == out or not (span[0] < spans[out][1] and spans[out][0] < span[1]):
                    continue
                if self.engine.aliases.get(out) == other and span[0] == spans[out][0]:
                    continue  # the in-place cache: TensorRT writes the output over its aliased input
                raise BackendError(f"fake TensorRT: output {out} overlaps {other} in one execution")

    def execute_async_v3(self, stream: int) -> bool:
        self.check_bindings()
        outs = self.engine.session.run(None, self._inputs())
        for o, a in zip(self.engine.session.get_outputs(), outs, strict=True):
            a = np.ascontiguousarray(a)
            ctypes.memmove(self.addresses[o.name], a.ctypes.data, a.nbytes)
        self.runs += 1
        return True


class HostMemory:
    """The backend's memory interface on host memory; ``capture`` keeps the closure, ``launch`` replays it."""

    device = torch.device("cpu")
    stream_handle = 0

    def __init__(self) -> None:
        self.buffers: dict[int, torch.Tensor] = {}
        self.captures = self.launches = 0

    def properties(self) -> tuple[str, str]:
        return "Fake GPU", "9.0"

    def alloc(self, nbytes: int) -> int:
        buf = torch.zeros(nbytes + ALIGNMENT, dtype=torch.uint8)
        ptr = buf.data_ptr()
        start = (-ptr) % ALIGNMENT
        self.buffers[ptr + start] = buf[start : start + nbytes]
        return ptr + start

    def _bytes(self, ptr: int, nbytes: int) -> torch.Tensor:
        for base, buf in self.buffers.items():
            if base <= ptr and ptr + nbytes <= base + buf.numel():
                return buf[ptr - base : ptr - base + nbytes]
        raise AssertionError(f"{ptr:#x} outside the buffers")

    def view(self, ptr, shape, dtype):
        from mindhier_rt.runtime.device_memory import TORCH_DTYPES

        return self._bytes(ptr, math.prod(shape) * ITEMSIZE[dtype]).view(TORCH_DTYPES[dtype]).view(shape)

    def begin(self) -> None: ...

    def end(self) -> None: ...

    def synchronize(self) -> None: ...

    def write(self, ptr, shape, dtype, src) -> None:
        self.view(ptr, shape, dtype)[: src.shape[0]].copy_(src)

    def read(self, ptr, shape, dtype, rows):
        return self.view(ptr, shape, dtype)[:rows]

    def copy(self, dst, src, nbytes) -> None:
        self._bytes(dst, nbytes).copy_(self._bytes(src, nbytes))

    def upload(self, ptr, array) -> None:
        data = torch.from_numpy(np.ascontiguousarray(array).view(np.uint8).reshape(-1))
        self._bytes(ptr, data.numel()).copy_(data)

    def zero(self, ptr, nbytes) -> None:
        self._bytes(ptr, nbytes).zero_()

    def capture(self, run):
        self.captures += 1
        return run

    def launch(self, graph) -> None:
        self.launches += 1
        graph()


def fake_backend(bundle: Bundle, memory: HostMemory | None = None) -> TensorRTBackend:
    return TensorRTBackend(bundle.root, memory=memory or HostMemory(), tensorrt=(FakeTensorRT, False))
