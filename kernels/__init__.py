"""Triton kernels and their pure-PyTorch references (imported as mindhier_rt.kernels): scale-masked attention
(``scale_attention``), the Switti block's fused norm chains (``fused_norm``) and the token draw (``token_draw``)."""

from __future__ import annotations

from typing import Any

import torch

from mindhier_rt.errors import BackendError


def import_triton() -> tuple[Any, Any, bool, str]:
    """``(triton, triton.language, has_triton, why_missing)``: Triton is optional, detected once per kernel module
    at its import (called there, not here, so that a module re-imported without Triton sees it missing)."""
    try:
        import triton
        import triton.language as tl
    except ImportError as e:
        return None, None, False, f"{type(e).__name__}: {e}"
    return triton, tl, True, ""


def require_runnable(t: torch.Tensor, has_triton: bool, interpreted: bool, missing: str, module: str) -> None:
    """Raise BackendError unless a kernel of ``module`` can run on ``t``: Triton imported, and either a CUDA
    tensor or a float32 CPU tensor under Triton's interpreter (``TRITON_INTERPRET=1`` before the import)."""
    if not has_triton:
        raise BackendError(
            f"the kernels of {module} need Triton, which did not import ({missing}): install it with "
            "`pip install 'mindhier-rt[gpu]'` (or `pip install triton`), or use their *_ref references"
        )
    if t.device.type == "cuda":
        return
    if t.device.type != "cpu" or not interpreted:
        raise BackendError(
            f"Triton needs a CUDA GPU or TRITON_INTERPRET=1 (set before importing {module}); "
            f"got tensors on {t.device} with the interpreter {'on' if interpreted else 'off'}"
        )
    if t.dtype != torch.float32:
        raise BackendError(f"Triton's CPU interpreter runs float32 only, got {t.dtype}")
