"""mindhier-rt: MindHier fMRI-to-image reconstruction, from reference models to fast engines.

The names below are imported on first use, so that ``import mindhier_rt.errors`` (and ``mindhier-rt --help``)
does not import PyTorch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["MindhierError", "ModelConfig", "Schedule", "__version__", "preset"]

_LAZY = {
    "ModelConfig": "mindhier_rt.config",
    "preset": "mindhier_rt.config",
    "MindhierError": "mindhier_rt.errors",
    "Schedule": "mindhier_rt.schedule",
}

if TYPE_CHECKING:
    from mindhier_rt.config import ModelConfig, preset
    from mindhier_rt.errors import MindhierError
    from mindhier_rt.schedule import Schedule


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mindhier_rt' has no attribute {name!r}")
