"""Brain data: the seeded synthetic benchmark and the on-disk layout shared with NSD."""

from mindhier_rt.data.nsd import BrainDataset, synth_command_impl, write_dataset
from mindhier_rt.data.synthetic import (
    StimulusAttributes,
    SubjectModel,
    SyntheticSet,
    make_synthetic,
    render,
    sample_attributes,
)

__all__ = [
    "BrainDataset",
    "StimulusAttributes",
    "SubjectModel",
    "SyntheticSet",
    "make_synthetic",
    "render",
    "sample_attributes",
    "synth_command_impl",
    "write_dataset",
]
