"""Importers for public checkpoints: VAR, Switti and MindHier files become mindhier-rt models, loaded strictly.

Layouts (REFERENCE §6), detected from the tensor names of the file:

========== ============================================================ ===========================================
layout     public files                                                 becomes
========== ============================================================ ===========================================
var        ``var_d{16,20,24,30}.pth`` (a ``torch.save`` state dict)     generator, ``block="var"``, class labels
switti     ``config.json`` + ``model.safetensors`` (``text_pooler.*``)  generator, Switti block, context width 2048
mindhier   ``config.json`` + ``model.safetensors`` (``fmri_pooler.*``)  generator, Switti block, context width 768
vqvae      ``vae_ch160v4096z32.pth``; the Switti VQ-VAE folder          VQ-VAE
========== ============================================================ ===========================================

A mindhier-rt checkpoint (``.safetensors`` with our metadata) is read by ``MindHier.load`` directly.

Strict loading. Every tensor of the file is either mapped to exactly one of ours by an explicit table
(``generator_key_map`` / ``vqvae_key_map``: source name -> our name, with the source shape where the two
differ), or is a buffer the reference stores and mindhier-rt derives from the schedule (level indices
``lvl_1L``, the training mask ``attn_bias_for_masking``, VAR's ``zero_k_bias``, the VQ-VAE's code-usage
statistics ``ema_vocab_hit_SV``): those are checked for consistency with the config and dropped. Anything
else, anything missing and every shape that does not fit are listed together in one ``CheckpointError``.

Sizes come from the tensors (depth, width, vocabulary, latent width, classes, context and pooled widths,
VQ-VAE channels) and from the schedule buffers (``lvl_1L`` gives patch_nums exactly); a ``config.json``
beside the weights is cross-checked, and keys of it that this module does not know are refused rather
than ignored. ``.pth`` files are read with ``torch.load(weights_only=True)``: no code in them runs.

Not importable: MindHier's reference fMRI encoder (``fMRI2CLIP``: post-norm ``nn.TransformerDecoder``
branches, an MLP without LayerNorms, unprojected levels) is a different architecture from mindhier-rt's
``HierarchicalEncoder``; such a file is refused with that explanation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mindhier_rt.errors import CheckpointError, ConfigError
from mindhier_rt.importers.configs import generator_config, vqvae_config
from mindhier_rt.importers.key_maps import generator_key_map, load_strict, vqvae_key_map
from mindhier_rt.importers.sources import (
    LAYOUTS,
    SourceFile,
    detect_layout,
    is_mindhier_rt_checkpoint,
    read_source,
    tensor_file,
)

if TYPE_CHECKING:
    from mindhier_rt.models.mindhier import MindHier

log = logging.getLogger(__name__)

__all__ = [
    "LAYOUTS",
    "Imported",
    "SourceFile",
    "detect_layout",
    "generator_config",
    "generator_key_map",
    "import_models",
    "load_models",
    "read_source",
    "vqvae_config",
    "vqvae_key_map",
]


@dataclass
class Imported:
    """What ``import_models`` read: the models and, per part, the file and layout it came from."""

    models: MindHier
    sources: dict[str, tuple[str, str]]  # part -> (path, layout)


def import_models(
    ckpt: str | Path,
    vae: str | Path | None = None,
    device: torch.device | str = "cpu",
    context_map: str | None = None,
) -> Imported:
    """Models from a public generator file (+ its VQ-VAE) or a mindhier-rt checkpoint (+ optionally a VQ-VAE).

    ``ckpt``: ``var_d16.pth``, a Switti / MindHier folder (``config.json`` + ``model.safetensors``), or a
    mindhier-rt ``.safetensors`` checkpoint. ``vae``: ``vae_ch160v4096z32.pth`` or the Switti VQ-VAE folder;
    required with a public generator (it holds no VQ-VAE), optional with our checkpoints (it replaces the
    checkpoint's VQ-VAE weights and must have the same shapes).
    ``context_map`` overrides the context map (``schedule.py``): by default MindHier generators get
    ``reference-pipeline`` (the map their published images were made with), every other file its config's
    (``training`` for VAR, Switti and, unless they say otherwise, mindhier-rt checkpoints).
    """
    from mindhier_rt.models.mindhier import MindHier
    from mindhier_rt.schedule import CONTEXT_MAPS

    if context_map is not None and context_map not in CONTEXT_MAPS:
        raise ConfigError(f"context map must be one of {', '.join(CONTEXT_MAPS)}, got {context_map!r}")

    ckpt = Path(ckpt)
    vae_src = vq_info = None
    if vae is not None:
        vae_src = read_source(vae)
        if (vae_layout := detect_layout(vae_src)) != "vqvae":
            raise CheckpointError(f"{vae_src.path}: --vae expects a VQ-VAE, found a {vae_layout} generator")
        vq_info = vqvae_config(vae_src)
    if is_mindhier_rt_checkpoint(tensor_file(ckpt)):
        models = MindHier.load(tensor_file(ckpt), device=device)
        sources = {part: (str(ckpt), "mindhier-rt") for part in models.modules()}
    else:
        src = read_source(ckpt)
        layout = detect_layout(src)
        if layout == "vqvae":
            raise CheckpointError(f"{src.path}: this is a VQ-VAE; pass the generator as --ckpt and this as --vae")
        if vae_src is None:
            raise CheckpointError(
                f"{src.path}: a {layout} file holds only the generator; pass its VQ-VAE too "
                "(--vae vae_ch160v4096z32.pth for VAR, the Switti VQ-VAE folder for Switti / MindHier)"
            )
        cfg = generator_config(layout, src, vq_info[0])
        models = MindHier.from_config(cfg, device=device)
        load_strict(models.generator, src, generator_key_map(layout, cfg), f"{layout} generator")
        sources = {"generator": (str(src.path), layout)}
    if vae_src is not None:
        vq, vocab, latent, v_pn = vq_info
        cfg = models.cfg
        if (vocab, latent) != (cfg.vocab_size, cfg.latent_dim):
            raise CheckpointError(
                f"{vae_src.path}: the VQ-VAE has {vocab} codes of width {latent}; the generator expects "
                f"{cfg.vocab_size} codes of width {cfg.latent_dim}"
            )
        if vq != cfg.vqvae:
            raise CheckpointError(f"{vae_src.path}: the VQ-VAE is {vq}; the checkpoint's config has {cfg.vqvae}")
        if v_pn is not None and v_pn != cfg.patch_nums:
            # VQVAEHF's schedule only sizes its training statistics (ema_vocab_hit_SV): decoding quantises and
            # accumulates on the generator's schedule, as the reference pipelines do (Switti's VQ-VAE folder
            # says reso=1024 by default and serves the 512 px generators too)
            log.info(
                "%s: the VQ-VAE was trained on scales %s; it decodes on the generator's %s",
                vae_src.path, v_pn, cfg.patch_nums,
            )  # fmt: skip
        load_strict(models.vqvae, vae_src, vqvae_key_map(models.vqvae, vocab), "VQ-VAE")
        sources["vqvae"] = (str(vae_src.path), "vqvae")
    if context_map is not None:
        models = models.with_context_map(context_map)
    return Imported(models.eval(), sources)


def load_models(
    ckpt: str | Path, vae: str | Path | None = None, device: torch.device | str = "cpu", context_map: str | None = None
) -> MindHier:
    """``import_models(...).models``: what the CLI's ``--ckpt`` (and ``--vae``, ``--context-map``) load."""
    return import_models(ckpt, vae, device, context_map).models
