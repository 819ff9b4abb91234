"""Compile the Triton launches a decode really makes, for a GPU, on a machine without one.

Triton's interpreter (``TRITON_INTERPRET=1``, how the CPU tests run the kernels) executes a kernel's Python
body with NumPy; it does not do what the compiler does to the arguments first. The JIT specialises each integer
argument by its value: one equal to 1 becomes a compile-time constant (a Python ``int`` inside the kernel, so
``n.to(tl.uint32)`` fails with ``'int' object has no attribute 'to'``), and one divisible by 16 (or a pointer
16-byte aligned) is compiled with that divisibility assumed. So a launch can pass every interpreter test and
fail to compile on the first GPU, as the token draw's did at scale 1 on an H200.

This module closes that gap in two steps, in two processes (a process that imported Triton in interpreter mode
cannot compile):

    record_launches()                  interpreter process: every kernel launch made inside, with its
                                       arguments reduced to what specialisation reads (Launch)
    compile_launches(launches, (9, 0)) compiler process: each launch replayed through the kernel's own JIT
                                       ``warmup`` (its specialisation, its ``do_not_specialize``) against a
                                       stand-in driver for that compute capability, down to a cubin
    value_class_sweep(launches)        the integer arguments that vary between a kernel's launches, each
                                       set to 1, 16 and 17 in turn: the value classes the JIT tells apart

    python -m mindhier_rt.kernels.compile_check launches.json [--capability 9.0] [--sweep]

The JIT caches one compile per specialisation, so replaying many launches costs one compile per distinct
specialisation. Tensor dtypes are recorded as launched (float32 under the interpreter); the half-precision
variants of each kernel are compiled by the kernels' own tests.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

SWEEP_VALUES = (1, 16, 17)  # the JIT's integer classes: equal to 1, divisible by 16, neither


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as the JIT's specialisation sees it.

    ``args`` holds, per positional argument: ``{"tensor": dtype name, "aligned": bool}`` for a tensor (its data
    pointer 16-byte aligned or not), else the value itself (int, float, bool, str or None). ``kwargs`` holds the
    constexpr keyword arguments and launch options (``num_warps``, ...) as given.
    """

    module: str
    kernel: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.module}.{self.kernel}"

    def to_json(self) -> dict[str, Any]:
        return {"module": self.module, "kernel": self.kernel, "args": list(self.args), "kwargs": self.kwargs}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Launch:
        return cls(obj["module"], obj["kernel"], tuple(obj["args"]), dict(obj["kwargs"]))


def _describe(arg: Any) -> Any:
    if isinstance(arg, torch.Tensor):
        return {"tensor": str(arg.dtype).removeprefix("torch."), "aligned": arg.data_ptr() % 16 == 0}
    if arg is None or isinstance(arg, bool | int | float | str):
        return arg
    raise TypeError(f"cannot record a kernel argument of type {type(arg).__name__}")


@contextlib.contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Inside: every Triton kernel launch is appended to the yielded list (and still runs). Needs the
    interpreter (``TRITON_INTERPRET=1`` before the kernel modules were imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    launches: list[Launch] = []
    original = InterpretedFunction.run

    def run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        if not warmup:
            launches.append(Launch(self.fn.__module__, self.fn.__name__, tuple(map(_describe, args)), dict(kwargs)))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield launches
    finally:
        InterpretedFunction.run = original


# ---- the compiler side ---------------------------------------------------------------------------------
class _Pointer:
    """What the JIT's specialisation reads of a tensor: its dtype and whether its address is 16-byte aligned."""

    def __init__(self, dtype: torch.dtype, aligned: bool) -> None:
        self.dtype = dtype
        self._address = 1 << 20 if aligned else (1 << 20) + 8

    def data_ptr(self) -> int:
        return self._address


class _StandInDriver:
    """The part of a Triton GPU driver that compiling (``JITFunction.warmup``) asks for: the target."""

    def __init__(self, capability: tuple[int, int]) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 10 * capability[0] + capability[1], 32)

    def get_current_target(self) -> Any:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


@contextlib.contextmanager
def stand_in_gpu(capability: tuple[int, int]) -> Iterator[None]:
    """Inside: Triton compiles for a GPU of ``capability`` as if one were present (nothing can be launched)."""
    from triton.runtime import driver

    previous = driver._active  # restored exactly, "not chosen yet" included
    driver.set_active(_StandInDriver(capability))
    try:
        yield
    finally:
        driver._active = previous


def _kernel(launch: Launch) -> Any:
    fn = getattr(importlib.import_module(launch.module), launch.kernel)
    if not hasattr(fn, "warmup") or type(fn).__name__ == "InterpretedFunction":
        raise RuntimeError(
            f"{launch.name} is not a compilable JIT function here (is TRITON_INTERPRET set in this process?)"
        )
    return fn


def _rebuild(arg: Any) -> Any:
    if isinstance(arg, dict):
        return _Pointer(getattr(torch, arg["tensor"]), arg["aligned"])
    return arg


@dataclasses.dataclass
class CompileReport:
    launches: int = 0
    compiled: dict[str, int] = dataclasses.field(default_factory=dict)  # kernel -> distinct specialisations
    failures: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def compile_launches(launches: list[Launch], capability: tuple[int, int] = (9, 0)) -> CompileReport:
    """Compile every launch to a cubin for ``capability`` through the kernel's JIT (specialisation included)."""
    report = CompileReport()
    seen: dict[str, set[int]] = {}
    with stand_in_gpu(capability):
        for launch in launches:
            report.launches += 1
            try:
                compiled = _kernel(launch).warmup(*map(_rebuild, launch.args), grid=(1,), **launch.kwargs)
                if not compiled.asm.get("cubin"):
                    raise RuntimeError("no cubin produced")
            except Exception as e:  # every failure is reported with the launch that caused it
                message = str(e).strip().splitlines()
                where = [line for line in message if line.strip()][-3:]
                report.failures.append(f"{launch.name}{_signature(launch)}: {type(e).__name__}: {' | '.join(where)}")
                continue
            seen.setdefault(launch.name, set()).add(id(compiled))
    report.compiled = {name: len(ids) for name, ids in sorted(seen.items())}
    return report


def _signature(launch: Launch) -> str:
    shown = ["ptr" if isinstance(a, dict) else repr(a) for a in launch.args]
    return "(" + ", ".join(shown) + ")"


def value_class_sweep(launches: list[Launch]) -> list[Launch]:
    """Variants of the launches in which each integer argument that takes different values across a kernel's
    launches (per scale, per batch) is set to each of ``SWEEP_VALUES`` in turn, the others as launched."""
    varying: dict[str, set[int]] = {}
    first: dict[str, Launch] = {}
    for launch in launches:
        base = first.setdefault(launch.name, launch)
        for i, (a, b) in enumerate(zip(base.args, launch.args, strict=True)):
            if a != b and isinstance(a, int) and not isinstance(a, bool):
                varying.setdefault(launch.name, set()).add(i)
    out: list[Launch] = []
    done: set[str] = set()
    for launch in launches:
        for i in sorted(varying.get(launch.name, ())):
            for value in SWEEP_VALUES:
                variant = dataclasses.replace(launch, args=(*launch.args[:i], value, *launch.args[i + 1 :]))
                key = json.dumps(variant.to_json(), sort_keys=True)
                if key not in done:
                    done.add(key)
                    out.append(variant)
    return out


def save_launches(launches: list[Launch], path: Path) -> None:
    unique = {json.dumps(x.to_json(), sort_keys=True): x for x in launches}
    path.write_text(json.dumps([x.to_json() for x in unique.values()], indent=0))


def load_launches(path: Path) -> list[Launch]:
    return [Launch.from_json(obj) for obj in json.loads(path.read_text())]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Compile recorded Triton launches for a GPU without one.")
    p.add_argument("launches", type=Path, help="JSON list written by save_launches")
    p.add_argument("--capability", default="9.0", help="compute capability to compile for (default 9.0: H100/H200)")
    p.add_argument("--sweep", action="store_true", help="also every value class of the varying integer arguments")
    a = p.parse_args(argv)
    major, minor = (int(x) for x in a.capability.split("."))
    launches = load_launches(a.launches)
    if a.sweep:
        launches = launches + value_class_sweep(launches)
    report = compile_launches(launches, (major, minor))
    print(json.dumps({"launches": report.launches, "compiled": report.compiled, "failures": report.failures}))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
