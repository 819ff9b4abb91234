"""Can a recorded TensorRT plan run here: the runtime module, and the plan's build facts against this machine.

Used by the TensorRT backend at load and by ``build`` (its error type); nothing here needs TensorRT itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mindhier_rt.bundle.manifest import PlanSpec
from mindhier_rt.errors import BackendError, MissingDependencyError

INSTALL_TENSORRT = (
    "install TensorRT 10 or 11 for your CUDA version, e.g. `pip install tensorrt-cu12` (NVIDIA's wheels; the "
    "builder is not on every package index), or run on a machine that has it"
)


class PlanMismatchError(BackendError):
    """A plan that cannot run here: other TensorRT version, other GPU architecture, missing or altered."""


def version_tuple(version: str) -> tuple[int, ...]:
    """``"10.15.1.29"`` -> (10, 15, 1, 29); non-numeric parts end the tuple."""
    out = []
    for part in version.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits or digits != part:
            if digits and part.startswith(digits):
                out.append(int(digits))
            break
        out.append(int(digits))
    return tuple(out)


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


@dataclass(frozen=True)
class RuntimeEnvironment:
    tensorrt_version: str
    gpu: str
    compute_capability: str
    lean: bool = False  # the lean runtime (tensorrt_lean) runs version-compatible plans only


def check_plan_metadata(plan: PlanSpec, env: RuntimeEnvironment) -> list[str]:
    """Raise PlanMismatchError where the plan cannot run here; return warnings (same architecture, other GPU)."""
    graph = plan.graph
    facts = {"tensorrt_version": plan.tensorrt_version, "compute_capability": plan.compute_capability, "gpu": plan.gpu}
    missing = [k for k, v in facts.items() if v is None]
    if missing:
        raise PlanMismatchError(f"plan of {graph}: manifest entry lacks {', '.join(missing)}; rebuild the plans")
    assert plan.tensorrt_version is not None and plan.compute_capability is not None  # checked just above
    built, running = plan.tensorrt_version, env.tensorrt_version
    rebuild = "rebuild with `mindhier-rt build --engine BUNDLE` on this machine"
    if env.lean and not plan.version_compatible:
        raise PlanMismatchError(
            f"plan of {graph} was not built version compatible; the lean TensorRT runtime {running} runs only "
            f"plans built with `mindhier-rt build --version-compatible`"
        )
    if plan.version_compatible:
        b, r = version_tuple(built), version_tuple(running)
        if b[:1] != r[:1] or r < b:
            raise PlanMismatchError(
                f"plan of {graph} was built version compatible with TensorRT {built}; it runs on later "
                f"{b[0] if b else '?'}.x runtimes, not on {running}: {rebuild}"
            )
    elif built != running:
        raise PlanMismatchError(
            f"plan of {graph} was built with TensorRT {built}, this is TensorRT {running}: {rebuild} "
            f"(or build with --version-compatible)"
        )
    if plan.compute_capability != env.compute_capability:
        raise PlanMismatchError(
            f"plan of {graph} was built for compute capability {plan.compute_capability} ({plan.gpu}), "
            f"this GPU is {env.compute_capability} ({env.gpu}): {rebuild}"
        )
    if plan.gpu != env.gpu:
        return [
            f"plan of {graph} was built and timed on {plan.gpu}, running on {env.gpu} (same architecture): "
            f"it runs, but a rebuild here may pick faster kernels"
        ]
    return []
