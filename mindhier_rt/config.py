"""Model configuration: one frozen dataclass per model, a top-level ``ModelConfig`` and named presets.

Values shared by several models (vocabulary, VQ latent width, context width, levels, patch_nums) live
once, on ``ModelConfig``; the sub-configs hold only what is private to their model. The schedule is
derived here once (``cfg.schedule``) and handed to everyone else.

Two generator families share one generator class (``GeneratorConfig.block`` / ``.condition``):
``switti`` blocks conditioned on fMRI (MindHier: a pooled feature plus the hierarchical cross-attention
context from the encoder) and ``var`` blocks conditioned on class labels (VAR checkpoints: no encoder,
``ModelConfig.encoder`` is None, the class embedding is start token and AdaLN condition).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from mindhier_rt.errors import ConfigError
from mindhier_rt.schedule import (
    ATTN_MODES,
    PATCH_NUMS_256,
    PATCH_NUMS_512,
    AttnMode,
    ContextMap,
    Guidance,
    Schedule,
)

BlockKind = Literal["switti", "var"]
ConditionKind = Literal["fmri", "class"]
RopeLayout = Literal["rows_first", "switti"]
# The (block, condition) pairs a generator can be built as.
GENERATOR_KINDS: tuple[tuple[str, str], ...] = (("switti", "fmri"), ("var", "class"))
ROPE_LAYOUTS: tuple[str, ...] = ("rows_first", "switti")

# nsdgeneral voxel counts of the eight NSD subjects (REFERENCE §2).
NSD_SUBJECTS: tuple[tuple[str, int], ...] = (
    ("subj01", 15724),
    ("subj02", 14278),
    ("subj03", 15226),
    ("subj04", 13153),
    ("subj05", 13039),
    ("subj06", 17907),
    ("subj07", 12682),
    ("subj08", 14386),
)


@dataclass(frozen=True)
class EncoderConfig:
    """Hierarchical fMRI Encoder: per-subject input layer, shared voxel MLP, M cascaded decoder layers."""

    subjects: tuple[tuple[str, int], ...]  # (subject id, voxel count); one input Linear each
    mlp_dims: tuple[int, ...] = (4096, 2048)  # hidden widths after the subject layer
    voxel_tokens: int = 100  # the MLP's output is reshaped to voxel_tokens x D
    heads: int = 8
    ffn_dim: int = 3072
    text_tokens: int = 77  # the text branch predicts this many CLIP text tokens

    def voxel_count(self, subject: str) -> int:
        for name, n in self.subjects:
            if name == subject:
                return n
        known = ", ".join(name for name, _ in self.subjects)
        raise ConfigError(f"unknown subject {subject!r}; this model knows: {known}")


@dataclass(frozen=True)
class GeneratorConfig:
    """Scale-wise autoregressive transformer: Switti-style blocks (default) or VAR blocks."""

    depth: int
    width: int  # C
    heads: int
    attn_mode: AttnMode = "scale_local"
    mlp_ratio: float = 8 / 3  # FFN hidden = int(C * mlp_ratio): SwiGLU (switti), GELU-tanh MLP (var, 4.0)
    rope_theta: float = 10000.0
    rope_grid: float = 128.0  # grid positions are scaled to 0..rope_grid on every scale
    crop_cond: bool = False  # Switti's crop conditioning (orig_h, orig_w, crop_top, crop_left)
    crop_freqs: int = 64  # Gaussian Fourier frequencies per crop scalar
    norm_eps: float = 1e-6
    # "switti": AdaLN self-attention (qk LayerNorm, 2D RoPE) + cross-attention + SwiGLU, sandwich RMSNorms.
    # "var": AdaLN self-attention (L2-normalised q/k, learned per-head scale) + GELU MLP, absolute positions.
    block: BlockKind = "switti"
    # "fmri": pooled feature [B, pooled_dim] + cross-attention context from the encoder; "class": labels [B].
    condition: ConditionKind = "fmri"
    num_classes: int = 1000  # class condition: labels 0..num_classes-1; num_classes itself is the null label
    pooled_dim: int | None = None  # width of the pooled condition vector (None: the context width D)
    # "rows_first": mindhier-rt's RoPE (first half of the rotary pairs turns with the row, float64 tables);
    # "switti": Switti's table (first half turns with the column, computed in float32), for imported weights.
    rope_layout: RopeLayout = "rows_first"
    crop_unit: float = 1.0  # the uncropped crop condition is (crop_unit, crop_unit, 0, 0); Switti: 512 (pixels)
    # learned absolute positions pos_1LC on switti blocks as well (var blocks always have them). RoPE only turns
    # self-attention, so without them a token cannot tell where it is when it reads the cross-attention context
    abs_pos: bool = False

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def ffn_dim(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def cross_attention(self) -> bool:
        """Whether the blocks cross-attend to an encoder context (switti blocks) or not (var blocks)."""
        return self.block == "switti"

    @property
    def rope(self) -> bool:
        """Rotary positions in self-attention (switti blocks)."""
        return self.block == "switti"

    @property
    def absolute_positions(self) -> bool:
        """Learned absolute positions ``pos_1LC`` added to every token's input (var blocks, or ``abs_pos``)."""
        return self.block == "var" or self.abs_pos


@dataclass(frozen=True)
class VQVAEConfig:
    """VAR-compatible multi-scale VQ-VAE (ch160 v4096 z32 at full size)."""

    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    phi_ratio: float = 0.5  # Phi(h) = (1 - r) h + r conv(h)
    beta: float = 0.25  # commitment weight

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class ModelConfig:
    """All three models of one MindHier setup plus the values they share."""

    name: str
    image_size: int
    patch_nums: tuple[int, ...]
    encoder: EncoderConfig | None  # None: no fMRI encoder (class-conditional models, imported generators)
    generator: GeneratorConfig
    vqvae: VQVAEConfig = field(default_factory=VQVAEConfig)
    n_levels: int = 4  # M
    context_tokens: int = 257  # T
    context_dim: int = 768  # D: encoder width = teacher (CLIP) width = cross-attention input width
    vocab_size: int = 4096  # V
    latent_dim: int = 32  # E (Cvae)
    guidance: Guidance = "coarse_to_fine"
    # which context segment each query token reads: "training" (the schedule's map, in training and decoding) or
    # "reference-pipeline" (MindHier's reference inference map, for its checkpoints; schedule.py, REFERENCE §9)
    context_map: ContextMap = "training"
    conditioning: Literal["hierarchical", "single"] = "hierarchical"  # "single": ablation, e_M everywhere
    clip_layer_base: int = 8
    clip_layer_stride: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_nums", tuple(self.patch_nums))
        self.schedule  # noqa: B018  (validates the schedule fields)
        g = self.generator
        if g.width % g.heads:
            raise ConfigError(f"generator width {g.width} is not divisible by heads {g.heads}")
        if (g.block, g.condition) not in GENERATOR_KINDS:
            known = ", ".join(f"block={b!r} with condition={c!r}" for b, c in GENERATOR_KINDS)
            raise ConfigError(
                f"generator block {g.block!r} with condition {g.condition!r} is not supported; use {known}"
            )
        if g.rope and g.head_dim % 4:
            raise ConfigError(f"generator head dim {g.head_dim} must be divisible by 4 (2D RoPE pairs)")
        if g.rope_layout not in ROPE_LAYOUTS:
            raise ConfigError(f"rope_layout must be one of {ROPE_LAYOUTS}, got {g.rope_layout!r}")
        if g.attn_mode not in ATTN_MODES:
            raise ConfigError(f"attn_mode must be one of {ATTN_MODES}, got {g.attn_mode!r}")
        if g.condition == "class":
            if self.encoder is not None:
                raise ConfigError("a class-conditional generator takes labels, not fMRI: its config has no encoder")
            if g.num_classes < 1:
                raise ConfigError(f"num_classes must be >= 1, got {g.num_classes}")
            if g.crop_cond:
                raise ConfigError("crop conditioning is a Switti-block option; VAR blocks have none")
        if self.encoder is not None and self.context_dim % self.encoder.heads:
            raise ConfigError(f"context_dim {self.context_dim} is not divisible by encoder heads {self.encoder.heads}")
        expected = self.patch_nums[-1] * self.vqvae.downsample
        if self.image_size != expected:
            raise ConfigError(
                f"image_size {self.image_size} != last patch_num {self.patch_nums[-1]} x VQ downsampling "
                f"{self.vqvae.downsample} = {expected}"
            )
        if self.conditioning not in ("hierarchical", "single"):
            raise ConfigError(f"conditioning must be 'hierarchical' or 'single', got {self.conditioning!r}")
        if self.encoder is not None and not self.encoder.subjects:
            raise ConfigError("the encoder needs at least one subject")

    @cached_property
    def schedule(self) -> Schedule:
        return Schedule(
            patch_nums=self.patch_nums,
            n_levels=self.n_levels,
            context_tokens=self.context_tokens,
            guidance=self.guidance,
            context_map=self.context_map,
            clip_layer_base=self.clip_layer_base,
            clip_layer_stride=self.clip_layer_stride,
        )

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with top-level fields or, by their names, generator fields changed (e.g. attn_mode)."""
        gen_fields = {f.name for f in dataclasses.fields(GeneratorConfig)}
        gen_changes = {k: changes.pop(k) for k in list(changes) if k in gen_fields}
        if gen_changes:
            changes["generator"] = dataclasses.replace(self.generator, **gen_changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.encoder is not None:
            d["encoder"]["subjects"] = [list(s) for s in self.encoder.subjects]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        try:
            d = dict(d)
            encoder = None
            if d.get("encoder") is not None:
                enc = dict(d.pop("encoder"))
                enc["subjects"] = tuple((str(n), int(v)) for n, v in enc["subjects"])
                enc["mlp_dims"] = tuple(enc["mlp_dims"])
                encoder = EncoderConfig(**enc)
            d.pop("encoder", None)
            vq = dict(d.pop("vqvae"))
            vq["ch_mult"] = tuple(vq["ch_mult"])
            return cls(
                encoder=encoder,
                generator=GeneratorConfig(**d.pop("generator")),
                vqvae=VQVAEConfig(**vq),
                **{**d, "patch_nums": tuple(d["patch_nums"])},
            )
        except (KeyError, TypeError) as e:
            raise ConfigError(f"malformed model config: {e}") from e


def _tiny() -> ModelConfig:
    """Seconds on a CPU: for unit tests."""
    return ModelConfig(
        name="tiny",
        image_size=64,
        patch_nums=(1, 2, 3, 4),
        n_levels=2,
        context_tokens=5,
        context_dim=32,
        vocab_size=64,
        latent_dim=8,
        encoder=EncoderConfig(
            subjects=(("subj01", 96), ("subj02", 80)),
            mlp_dims=(64,),
            voxel_tokens=4,
            heads=2,
            ffn_dim=64,
            text_tokens=3,
        ),
        generator=GeneratorConfig(depth=2, width=64, heads=2, crop_cond=True, crop_freqs=4),
        vqvae=VQVAEConfig(ch=16, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, norm_groups=8),
    )


def _small() -> ModelConfig:
    """CPU benchmarks and the demo's upper end: a few million parameters, 128 px."""
    return ModelConfig(
        name="small",
        image_size=128,
        patch_nums=(1, 2, 3, 4, 5, 6, 8),
        n_levels=4,
        context_tokens=17,
        context_dim=128,
        vocab_size=512,
        latent_dim=16,
        encoder=EncoderConfig(
            subjects=(("subj01", 2000), ("subj02", 1800)),
            mlp_dims=(512, 256),
            voxel_tokens=16,
            heads=4,
            ffn_dim=512,
            text_tokens=8,
        ),
        generator=GeneratorConfig(depth=6, width=256, heads=4),
        vqvae=VQVAEConfig(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, norm_groups=8),
    )


def _demo() -> ModelConfig:
    """`mindhier-rt demo`: 32 px synthetic stimuli, trains all three models in minutes on 2 CPU cores."""
    return ModelConfig(
        name="demo",
        image_size=32,
        patch_nums=(1, 2, 3, 4, 6, 8),
        n_levels=4,
        context_tokens=17,
        context_dim=64,
        vocab_size=256,
        latent_dim=16,
        encoder=EncoderConfig(
            subjects=(("subj01", 600), ("subj02", 500)),
            mlp_dims=(256,),
            voxel_tokens=8,
            heads=4,
            ffn_dim=128,
            text_tokens=4,
        ),
        generator=GeneratorConfig(depth=3, width=96, heads=2, abs_pos=True),
        vqvae=VQVAEConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8),
    )


def _mindhier(name: str, image_size: int, patch_nums: tuple[int, ...], depth: int, width: int) -> ModelConfig:
    """Reference sizes: CLIP ViT-L/14 levels (4 x 257 x 768), VAR's VQ-VAE, Switti-style generator."""
    return ModelConfig(
        name=name,
        image_size=image_size,
        patch_nums=patch_nums,
        encoder=EncoderConfig(subjects=NSD_SUBJECTS),
        generator=GeneratorConfig(depth=depth, width=width, heads=width // 64, crop_cond=True),
    )


def var_config(
    depth: int, patch_nums: tuple[int, ...] = PATCH_NUMS_256, num_classes: int = 1000, name: str | None = None
) -> ModelConfig:
    """VAR's published sizes (REFERENCE §3/§5): width 64 * depth, heads = depth, GELU MLP ratio 4, block-causal,
    class-conditional, VAR's VQ-VAE (ch160 v4096 z32). No encoder; the context fields are unused."""
    width = 64 * depth
    return ModelConfig(
        name=name or f"var-d{depth}",
        image_size=patch_nums[-1] * VQVAEConfig().downsample,
        patch_nums=patch_nums,
        encoder=None,
        generator=GeneratorConfig(
            depth=depth,
            width=width,
            heads=depth,
            attn_mode="block_causal",
            mlp_ratio=4.0,
            block="var",
            condition="class",
            num_classes=num_classes,
        ),
        n_levels=1,
        context_tokens=1,
        context_dim=width,  # VAR's condition width D equals its width C
    )


PRESETS = {
    "tiny": _tiny,
    "small": _small,
    "demo": _demo,
    "mindhier-256": lambda: _mindhier("mindhier-256", 256, PATCH_NUMS_256, depth=16, width=1024),
    "mindhier-512": lambda: _mindhier("mindhier-512", 512, PATCH_NUMS_512, depth=30, width=1920),
}


def preset(name: str) -> ModelConfig:
    """The named preset's config. Raises ConfigError listing the known names."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
