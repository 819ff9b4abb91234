"""How big a model a config read from a file may ask for, checked before anything is allocated.

A checkpoint's config comes from its header: a file of a kilobyte can ask for a model of terabytes. Before
building from such a config, ``models.mindhier.planned_state`` checks here the fields that cost time or memory even
when the model is built on the ``meta`` device (module counts, token counts), builds it there (shapes, no
storage) and refuses a model whose parameters and buffers exceed :data:`MAX_MODEL_ELEMENTS`. Its state-dict shapes
are what the checkpoint's listed tensors are compared with.
"""

from __future__ import annotations

from mindhier_rt.config import ModelConfig
from mindhier_rt.errors import ConfigError

# mindhier-512, the largest preset, holds 3.15e9 parameters: room for models about 2.7 times its size
MAX_MODEL_ELEMENTS = 2**33
# the sizes that set how many modules and schedule entries are built, even on the meta device
MAX_DEPTH = 256
MAX_SCALES = 64
MAX_TOKENS = 16_384  # pyramid tokens L: the self-attention mask is L x L
MAX_CONTEXT = 16_384  # context tokens over all levels: the cross-attention mask is L x S
MAX_SUBJECTS = 256
MAX_MLP_LAYERS = 16
MAX_VQ_STAGES = 12
MAX_RES_BLOCKS = 16


def _int(name: str, value: object, limit: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"expected an integer {name}, found {value!r:.40}")
    if not 0 <= value <= limit:
        raise ConfigError(f"expected {name} in 0..{limit}, found {value}")
    return value


def check_config_limits(cfg: ModelConfig) -> None:
    """ConfigError when a config asks for more modules or tokens than :mod:`mindhier_rt.models.limits` allows."""
    g, vq = cfg.generator, cfg.vqvae
    _int("generator depth", g.depth, MAX_DEPTH)
    _int("the number of scales (len(patch_nums))", len(cfg.patch_nums), MAX_SCALES)
    for p in cfg.patch_nums:
        _int("a patch_num", p, MAX_TOKENS)
    _int("pyramid tokens (sum of patch_num^2)", sum(p * p for p in cfg.patch_nums), MAX_TOKENS)
    _int("context_tokens", cfg.context_tokens, MAX_CONTEXT)
    _int("n_levels", cfg.n_levels, MAX_SCALES)
    _int("context tokens over all levels", cfg.context_tokens * cfg.n_levels, MAX_CONTEXT)
    _int("VQ-VAE stages (len(ch_mult))", len(vq.ch_mult), MAX_VQ_STAGES)
    _int("VQ-VAE num_res_blocks", vq.num_res_blocks, MAX_RES_BLOCKS)
    if cfg.encoder is not None:
        _int("encoder subjects", len(cfg.encoder.subjects), MAX_SUBJECTS)
        _int("encoder MLP layers", len(cfg.encoder.mlp_dims), MAX_MLP_LAYERS)
