"""One deserialized TensorRT plan with an execution context per optimization profile, bound as the plan says.

Each context gets its profile, input shapes and every tensor address once (``set_input_shape`` /
``set_tensor_address``); all contexts share one scratch allocation (they run one after another on one stream).
The engine's I/O names, modes and dtypes are checked against the recorded bindings, and every output shape
against the plan; a mismatch is a ``PlanMismatchError`` that says to rebuild.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mindhier_rt.bundle.tensorrt_plan import Binding
from mindhier_rt.errors import BackendError
from mindhier_rt.runtime.tensorrt_compat import PlanMismatchError

if TYPE_CHECKING:  # the published type stubs (tests/test_tensorrt_types.py checks this module against them)
    import tensorrt as trt

__all__ = ["TensorRTEngine"]

DATA_TYPES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int64": "INT64", "int32": "INT32"}
DATA_TYPES |= {"bool": "BOOL", "uint8": "UINT8"}


def _scratch_bytes(engine: trt.ICudaEngine, profile: int) -> int:
    if hasattr(engine, "get_device_memory_size_for_profile_v2"):
        return int(engine.get_device_memory_size_for_profile_v2(profile))
    return int(engine.get_device_memory_size_for_profile(profile))


class TensorRTEngine:
    """One plan: the engine, its recorded bindings and one execution context per profile."""

    def __init__(
        self, module: Any, runtime: trt.Runtime, graph: str, file: str, blob: bytes, table: dict[str, Binding]
    ) -> None:
        """``module``: ``tensorrt`` or ``tensorrt_lean`` (enums come from it); ``blob``: the plan's checked bytes."""
        self.module, self.graph, self.table = module, graph, table
        engine = runtime.deserialize_cuda_engine(blob)
        if engine is None:
            raise PlanMismatchError(f"TensorRT could not deserialize {file} (its log above says why)")
        self.engine: trt.ICudaEngine = engine
        self._check_io()
        self.n_profiles = len(next(iter(table.values())).shapes)
        if self.engine.num_optimization_profiles != self.n_profiles:
            raise PlanMismatchError(
                f"{file} has {self.engine.num_optimization_profiles} optimization profiles, "
                f"the manifest expects {self.n_profiles}: rebuild the plans"
            )
        self.contexts: list[trt.IExecutionContext] = []

    def _check_io(self) -> None:
        engine, module = self.engine, self.module
        names = {engine.get_tensor_name(k) for k in range(engine.num_io_tensors)}
        if names != set(self.table):
            raise PlanMismatchError(
                f"plan of {self.graph}: engine tensors {sorted(names ^ set(self.table))} differ from the manifest"
            )
        for name, b in self.table.items():
            mode = engine.get_tensor_mode(name)
            if (mode == module.TensorIOMode.INPUT) != b.is_input:
                raise PlanMismatchError(f"plan of {self.graph}: {name} is an {mode.name.lower()} in the engine")
            dtype = engine.get_tensor_dtype(name)
            if dtype != getattr(module.DataType, DATA_TYPES[b.dtype]):
                raise PlanMismatchError(
                    f"plan of {self.graph}: {name} is {dtype} in the engine, {b.dtype} in the manifest: "
                    "rebuild the plans"
                )

    def aliased_input(self, output: str) -> str | None:
        """The input TensorRT writes ``output`` over (in-place cache updates), or None."""
        if not hasattr(self.engine, "get_aliased_input_tensor"):
            raise PlanMismatchError(
                "this TensorRT cannot report aliased tensors, so the in-place cache plan is unsafe here: "
                "rebuild with `mindhier-rt build --kv-cache ping-pong`"
            )
        return self.engine.get_aliased_input_tensor(output)

    def scratch_bytes(self) -> int:
        return max(_scratch_bytes(self.engine, p) for p in range(self.n_profiles))

    def create_contexts(
        self, scratch: int, scratch_bytes: int, stream: int, address: Callable[[Binding, int], int]
    ) -> None:
        """One context per profile: profile, input shapes and every tensor address set once."""
        strategy = self.module.ExecutionContextAllocationStrategy.USER_MANAGED
        for p in range(self.n_profiles):
            ctx = self.engine.create_execution_context(strategy)
            ctx.set_device_memory(scratch, scratch_bytes)
            if not ctx.set_optimization_profile_async(p, stream):
                raise BackendError(f"{self.graph}: could not select optimization profile {p}")
            for name, b in self.table.items():
                if b.is_input and not ctx.set_input_shape(name, b.shapes[p]):
                    raise PlanMismatchError(f"{self.graph}: profile {p} does not admit {name} {b.shapes[p]}")
            for name, b in self.table.items():
                if not ctx.set_tensor_address(name, address(b, p)):
                    raise BackendError(f"{self.graph}: TensorRT refused the address of {name} (profile {p})")
            for name, b in self.table.items():
                if b.is_input:
                    continue
                shape = tuple(int(d) for d in ctx.get_tensor_shape(name)[:])  # Dims: a tuple by slicing
                if shape != b.shapes[p]:
                    raise PlanMismatchError(
                        f"plan of {self.graph}: {name} has shape {shape} in profile {p}, the binding plan expects "
                        f"{b.shapes[p]}: rebuild the plans"
                    )
            self.contexts.append(ctx)

    def set_rows(self, profile: int, name: str, shape: tuple[int, ...]) -> None:
        """A run on fewer rows than built (the encoder's null scan): inside the profile's range."""
        if not self.contexts[profile].set_input_shape(name, shape):
            raise BackendError(f"{self.graph}: profile {profile} does not admit {name} {shape}")

    def execute(self, profile: int, stream: int) -> None:
        if not self.contexts[profile].execute_async_v3(stream):
            raise BackendError(f"TensorRT failed to run {self.graph} (its log above says why)")
