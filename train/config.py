"""The settings of one training run (``train_loop``): its length, optimiser, schedule, logging and precision."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 20
    save_every: int = 100  # steps between state saves (and at the end, and on SIGINT / SIGTERM)
    amp: str = "off"  # autocast dtype of the loss computation: off, bf16 or fp16 (with gradient scaling)
