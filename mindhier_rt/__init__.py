"""mindhier-rt: MindHier fMRI-to-image reconstruction, from reference models to fast engines."""

from mindhier_rt.config import ModelConfig, preset
from mindhier_rt.errors import MindhierError
from mindhier_rt.schedule import Schedule

__version__ = "0.1.0"
__all__ = ["MindhierError", "ModelConfig", "Schedule", "__version__", "preset"]
