"""The three models of one MindHier setup, built from one config and saved/loaded as one checkpoint.

Class-conditional models (VAR) and imported generators have no fMRI encoder: ``encoder`` is None for a
config whose ``encoder`` is None, and such a checkpoint holds only the generator and the VQ-VAE.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mindhier_rt.checkpoint import (
    PARTS,
    check_header_shapes,
    load_part,
    read_checkpoint,
    read_checkpoint_header,
    save_checkpoint,
)
from mindhier_rt.config import ModelConfig
from mindhier_rt.errors import CheckpointError, ConfigError, MindhierError
from mindhier_rt.models.encoder import HierarchicalEncoder
from mindhier_rt.models.generator import ScaleGenerator
from mindhier_rt.models.limits import MAX_MODEL_ELEMENTS, check_config_limits
from mindhier_rt.models.vqvae import MultiScaleVQVAE


def model_parts(cfg: ModelConfig) -> tuple[str, ...]:
    """The parts a config builds: all three, or generator and VQ-VAE when it has no encoder."""
    return tuple(p for p in PARTS if p != "encoder" or cfg.encoder is not None)


@dataclass
class MindHier:
    cfg: ModelConfig
    encoder: HierarchicalEncoder | None
    generator: ScaleGenerator
    vqvae: MultiScaleVQVAE

    @classmethod
    def from_config(cls, cfg: ModelConfig, device: torch.device | str = "cpu", seed: int | None = None) -> MindHier:
        """Randomly initialised models (``seed`` makes the weights reproducible)."""
        if seed is not None:
            torch.manual_seed(seed)
        with torch.device(device):
            encoder = HierarchicalEncoder(cfg) if cfg.encoder is not None else None
            return cls(cfg, encoder, ScaleGenerator(cfg), MultiScaleVQVAE(cfg))

    @classmethod
    def load(
        cls, path: str | Path, device: torch.device | str = "cpu", require: tuple[str, ...] | None = None
    ) -> MindHier:
        """Load every part a checkpoint holds (parts it lacks keep their random init).

        ``require`` names the parts that must be present (default: every part the config builds); every
        tensor is checked by name and shape against the config in the file's header, and the config against
        ``models.limits``, before anything is allocated; NaN or inf weights are refused.
        """
        header = read_checkpoint_header(path)
        require = model_parts(header.cfg) if require is None else require
        missing = [p for p in require if p not in header.parts]
        if missing:
            raise CheckpointError(
                f"{path}: checkpoint lacks {', '.join(missing)} (it holds {', '.join(header.parts) or 'nothing'})"
            )
        parts = model_parts(header.cfg)
        extra = [p for p in header.parts if p not in parts]
        if extra:
            raise CheckpointError(f"{path}: checkpoint holds {', '.join(extra)}, which its config has no model for")
        # the config comes from the file: check its size and the listed shapes before allocating anything
        try:
            planned = planned_state(header.cfg)
        except ConfigError as e:
            raise CheckpointError(f"{path}: {e}") from e
        check_header_shapes(header, planned)
        ckpt = read_checkpoint(path, header)
        models = cls.from_config(ckpt.cfg, device=device)
        for name in parts:
            if name in ckpt.parts:
                load_part(getattr(models, name), ckpt, name)
        return models.eval()

    def with_context_map(self, context_map: str) -> MindHier:
        """The same weights under another context map (``schedule.py``): a new generator (its masks are derived
        from the config), the encoder and VQ-VAE shared with this object."""
        cfg = self.cfg.replace(context_map=context_map)
        if cfg.context_map == self.cfg.context_map:
            return self
        param = next(self.generator.parameters())
        with torch.device(param.device):
            generator = ScaleGenerator(cfg).to(param.dtype)
        generator.load_state_dict(self.generator.state_dict())
        generator.train(self.generator.training)
        return MindHier(cfg, self.encoder, generator, self.vqvae)

    def modules(self) -> dict[str, nn.Module]:
        """The models this setup has, by part name (no encoder for class-conditional models)."""
        return {name: getattr(self, name) for name in PARTS if getattr(self, name) is not None}

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        save_checkpoint(path, self.cfg, self.modules(), extra=extra)

    def eval(self) -> MindHier:
        for m in self.modules().values():
            m.eval()
        return self

    def param_counts(self, subject: str | None = None) -> dict[str, int]:
        """Parameters per model; the encoder counts the shared part plus one subject's input layer."""
        counts = {}
        if self.encoder is not None:
            counts["encoder"] = self.encoder.param_count(subject or self.cfg.encoder.subjects[0][0])
        counts["generator"] = sum(p.numel() for p in self.generator.parameters())
        counts["vqvae"] = sum(p.numel() for p in self.vqvae.parameters())
        return counts


def planned_state(cfg: ModelConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """The state-dict shapes of every part ``cfg`` builds, from a build on the meta device (no storage).

    Raises ConfigError for a config beyond the limits of ``models.limits``, for one that cannot be built, and for a
    model of more than ``MAX_MODEL_ELEMENTS`` parameter and buffer elements.
    """
    check_config_limits(cfg)
    try:
        models = MindHier.from_config(cfg, device="meta")
    except MindhierError:
        raise
    except (TypeError, ValueError, RuntimeError, ZeroDivisionError, OverflowError) as e:
        raise ConfigError(f"expected a config that builds the models, found one that does not ({e})") from e
    modules = models.modules()
    elements = sum(t.numel() for m in modules.values() for t in (*m.parameters(), *m.buffers()))
    if elements > MAX_MODEL_ELEMENTS:
        sizes = ", ".join(f"{n} {sum(p.numel() for p in m.parameters()):,}" for n, m in modules.items())
        raise ConfigError(
            f"expected a model of at most {MAX_MODEL_ELEMENTS:,} elements ({MAX_MODEL_ELEMENTS * 4 / 2**30:.0f} GiB "
            f"in float32), found a config asking for {elements:,} ({elements * 4 / 2**40:.1f} TiB; parameters: {sizes})"
        )
    return {name: {k: tuple(v.shape) for k, v in m.state_dict().items()} for name, m in modules.items()}
