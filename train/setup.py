"""What a training stage needs before it runs, from a command's options: the data set and the models to start from,
a checked ``TrainConfig``, this process's place in a torchrun launch, and stage 1's teachers and their targets."""

from __future__ import annotations

import atexit
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mindhier_rt.config import ModelConfig, preset
from mindhier_rt.data import BrainDataset, MindEye2Dataset, dataset_id, open_dataset
from mindhier_rt.errors import InputError
from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.train.distributed import DistContext, init_distributed
from mindhier_rt.train.loop import TrainConfig, amp_dtype
from mindhier_rt.train.stages import TrialSet

if TYPE_CHECKING:
    from mindhier_rt.train.feature_cache import CachedColumn

TEACHERS = ("random-vit", "clip")
Dataset = BrainDataset | MindEye2Dataset


def open_training_run(
    data_dir: Path, preset_name: str, init: Path | None, need: tuple[str, ...]
) -> tuple[Dataset, MindHier]:
    """The data set of ``data_dir`` and the models to train: loaded from ``init`` (which must hold the trained
    parts ``need`` names) or new from ``preset_name``; InputError if a subject's voxel count disagrees."""
    data = open_dataset(data_dir)
    if init is not None:
        models = MindHier.load(init, require=need)
    else:
        if need:
            raise InputError(f"this stage needs trained {', '.join(need)}: pass --init CKPT from the earlier stages")
        models = MindHier.from_config(preset(preset_name), seed=0)
    encoder = models.cfg.encoder
    if encoder is None:
        raise InputError(f"model {models.cfg.name} has no fMRI encoder: these stages train fMRI models")
    for subject, n in data.subjects.items():
        if subject in dict(encoder.subjects) and encoder.voxel_count(subject) != n:
            raise InputError(f"{data_dir}: {subject} has {n} voxels, the model expects {encoder.voxel_count(subject)}")
    return data, models


def train_config(
    steps: int, batch_size: int, lr: float, seed: int, amp: str = "off", save_every: int = 100
) -> TrainConfig:
    """A ``TrainConfig`` whose ``amp`` is known (ConfigError otherwise)."""
    amp_dtype(amp)
    return TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, amp=amp, save_every=save_every)


def distributed_for_batch(batch_size: int) -> DistContext:
    """This process's place in a torchrun launch (a plain single process without one); the process group is
    closed at exit. The global batch must split evenly over the processes."""
    ctx = init_distributed()
    atexit.register(ctx.close)
    if batch_size % ctx.world_size:
        raise InputError(f"--batch-size {batch_size} (the global batch) must divide by {ctx.world_size} processes")
    return ctx


def stage1_teachers(cfg: ModelConfig, teacher: str, seed: int, clip_weights: Path | None) -> tuple[Any, Any]:
    """(image teacher, text teacher): the frozen random ViT of the synthetic benchmark, or CLIP ViT-L/14 from a
    local file (which needs a 768-wide, 257-token config with 77 text tokens)."""
    assert cfg.encoder is not None  # open_training_run refuses models without one
    if teacher == "clip":
        from mindhier_rt.train.clip_teacher import ClipTeacher

        text_tokens = cfg.encoder.text_tokens
        if (cfg.context_dim, cfg.context_tokens, text_tokens) != (768, 257, 77):
            raise InputError(
                f"the CLIP teacher gives 257 x 768 image and 77 x 768 text tokens; preset {cfg.name} expects "
                f"{cfg.context_tokens} x {cfg.context_dim} and {text_tokens} text tokens"
            )
        clip = ClipTeacher(cfg.schedule.clip_layers, clip_weights)
        return clip, clip
    if teacher == "random-vit":
        from mindhier_rt.train.teacher import HashTextTeacher, RandomViTTeacher

        return RandomViTTeacher(cfg, seed=seed), HashTextTeacher(cfg, seed=seed)
    raise InputError(f"unknown teacher {teacher!r}; choose {' or '.join(TEACHERS)}")


@dataclass
class TeacherTargets:
    levels: Tensor | CachedColumn  # [images, M, tokens, D]: the teacher's layer taps, indexed by image
    text: Tensor | CachedColumn  # [images, text tokens, D]


@contextlib.contextmanager
def teacher_targets(
    data: Dataset,
    trials: list[TrialSet],
    cfg: ModelConfig,
    teacher: str,
    image_teacher: Any,
    text_teacher: Any,
    feature_cache: Path | None,
    ctx: DistContext,
) -> Iterator[TeacherTargets]:
    """Stage 1's targets: computed in memory, or with ``feature_cache`` read from (and first written to) a folder
    keyed by teacher, its weights and the data set; under torchrun rank 0 fills the cache, the others then read
    it. The cached columns stay open for the length of the block."""
    if feature_cache is None:
        images = torch.from_numpy(data.images())
        levels = torch.cat([image_teacher.image_levels(images[i : i + 256]) for i in range(0, len(images), 256)])
        yield TeacherTargets(levels, text_teacher.text_tokens(data.captions()))
        return
    from mindhier_rt.train.feature_cache import FeatureCache, teacher_features, weights_hash

    assert cfg.encoder is not None
    taps = ".".join(map(str, cfg.schedule.clip_layers))
    cache = FeatureCache(
        feature_cache, f"{teacher}-L{taps}-t{cfg.encoder.text_tokens}",
        weights_hash(*dict.fromkeys((image_teacher, text_teacher))), dataset_id(data),
    )  # fmt: skip
    needed = torch.unique(torch.cat([t.image_index_n for t in trials])).numpy()
    with ctx.main_first():
        cached = teacher_features(cache, needed, data.images, data.captions, image_teacher, text_teacher)
    try:
        yield TeacherTargets(cached.levels, cached.text)
    finally:
        cached.close()
