"""The scale schedule: the one place that knows the patch_nums arithmetic.

Everything derived from ``patch_nums`` (the side of each scale's token grid), the number of encoder
levels M and the tokens per level lives here: token counts, offsets, cached lengths, the scale ->
context-segment map (coarse-to-fine or fine-to-coarse guidance), the CLIP layer map g_m, the attention
masks of both attention modes, the cross-attention mask and the Phi index of each scale. Models,
exporters, kernels, runtimes and the manifest read it; none re-derives it.

Indexing: scales are 0-indexed here (``i`` in 0..K-1). The paper's 1-indexed scale k = i + 1 attends to
level h_k = M - floor(M (k-1) / K); in the deep-first context [e_M, ..., e_1] that level is segment
``floor(i * M / K)``.

Context maps (which context segment each query token reads), ``context_map``:
- ``training`` (default): every token of scale i reads segment ``segment_of_scale[i]``, the map above, in
  training and decoding alike.
- ``reference-pipeline``: the map of MindHier's reference inference pipeline, for checkpoints trained by the
  reference code whose published images were made with it (REFERENCE §9). That pipeline builds the training
  cross-attention mask once for the whole pyramid, gives scale i the first ``pn_i ** 2`` rows of it and
  concatenates the context levels in reverse order. Token j of scale i therefore reads segment
  ``M - 1 - segment_of_scale[scale_of_token[j]]``: the training segment of the scale that *pyramid position j*
  belongs to, mirrored. One scale's tokens can read several segments (at 512 px scales 3..9 read 2-4 of them).
Both maps are per token (``segment_of_token``) and, for kernels, runs of tokens reading one segment
(``cross_runs``, ``key_ranges("cross")``).

Axis letters used in this package: B batch, L all tokens of the pyramid, l tokens of one scale,
C generator width, D encoder/context width, T tokens per context level, S context tokens (M * T),
H heads, V vocabulary, E VQ latent channels (Cvae), h/w spatial grid sides.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch

from mindhier_rt.errors import ScheduleError

Guidance = Literal["coarse_to_fine", "fine_to_coarse"]
AttnMode = Literal["scale_local", "block_causal"]
ContextMap = Literal["training", "reference-pipeline"]
GUIDANCE_MODES: tuple[str, ...] = ("coarse_to_fine", "fine_to_coarse")
ATTN_MODES: tuple[str, ...] = ("scale_local", "block_causal")
CONTEXT_MAPS: tuple[str, ...] = ("training", "reference-pipeline")

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


@dataclass(frozen=True)
class Schedule:
    """Scale schedule of one model. Construct once from the config and pass it around."""

    patch_nums: tuple[int, ...]
    n_levels: int  # M, encoder levels e_1..e_M
    context_tokens: int  # T, tokens per level (257 for CLIP ViT-L/14)
    guidance: Guidance = "coarse_to_fine"
    clip_layer_base: int = 8  # g_m = base + stride * m  (paper: 8 + 4m -> 12, 16, 20, 24)
    clip_layer_stride: int = 4
    phi_count: int = 4  # shared Phi convolutions of the VQ-VAE
    context_map: ContextMap = "training"  # which segment each query token reads (module docstring)

    def __post_init__(self) -> None:
        pn = tuple(int(p) for p in self.patch_nums)
        object.__setattr__(self, "patch_nums", pn)
        if len(pn) < 2:
            raise ScheduleError(f"patch_nums needs at least 2 scales, got {pn}")
        if pn[0] != 1:
            raise ScheduleError(f"patch_nums must start at 1 (the start token), got {pn}")
        if any(b <= a for a, b in itertools.pairwise(pn)):
            raise ScheduleError(f"patch_nums must be strictly increasing, got {pn}")
        if not 1 <= self.n_levels <= len(pn):
            raise ScheduleError(
                f"n_levels must be in 1..{len(pn)} (one level per group of scales), got {self.n_levels}"
            )
        if self.context_tokens < 1:
            raise ScheduleError(f"context_tokens must be >= 1, got {self.context_tokens}")
        if self.guidance not in GUIDANCE_MODES:
            raise ScheduleError(f"guidance must be one of {GUIDANCE_MODES}, got {self.guidance!r}")
        if self.phi_count < 1:
            raise ScheduleError(f"phi_count must be >= 1, got {self.phi_count}")
        if self.context_map not in CONTEXT_MAPS:
            raise ScheduleError(f"context_map must be one of {CONTEXT_MAPS}, got {self.context_map!r}")

    # ---- token layout -------------------------------------------------------------------------
    @property
    def n_scales(self) -> int:
        return len(self.patch_nums)

    @cached_property
    def token_counts(self) -> tuple[int, ...]:
        """n_i = pn_i ** 2 tokens at scale i."""
        return tuple(p * p for p in self.patch_nums)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Start of each scale in the flattened pyramid, plus the total at the end (length K + 1)."""
        out = [0]
        for n in self.token_counts:
            out.append(out[-1] + n)
        return tuple(out)

    @property
    def total_tokens(self) -> int:
        return self.offsets[-1]

    @property
    def cached_lengths(self) -> tuple[int, ...]:
        """Self-attention cache length before scale i in block-causal mode (= its offset)."""
        return self.offsets[:-1]

    @property
    def last_side(self) -> int:
        """Side of the finest token grid = side of the VQ latent."""
        return self.patch_nums[-1]

    def scale_slice(self, i: int) -> slice:
        return slice(self.offsets[i], self.offsets[i + 1])

    @cached_property
    def scale_of_token(self) -> tuple[int, ...]:
        """Scale index of every position of the flattened pyramid (length L)."""
        return tuple(i for i, n in enumerate(self.token_counts) for _ in range(n))

    # ---- guidance: scale -> context segment -----------------------------------------------------
    @property
    def context_length(self) -> int:
        """S = M * T tokens in the deep-first context [e_M, ..., e_1]."""
        return self.n_levels * self.context_tokens

    @cached_property
    def segment_of_scale(self) -> tuple[int, ...]:
        """Index of the deep-first context segment that scale i cross-attends to under the training map."""
        k, m = self.n_scales, self.n_levels
        c2f = tuple(i * m // k for i in range(k))
        if self.guidance == "coarse_to_fine":
            return c2f
        return tuple(m - 1 - s for s in c2f)

    @cached_property
    def level_of_scale(self) -> tuple[int, ...]:
        """1-indexed encoder level (e_1 shallow .. e_M deep) that scale i reads under the training map: h_k."""
        return tuple(self.n_levels - s for s in self.segment_of_scale)

    @cached_property
    def segment_of_token(self) -> tuple[int, ...]:
        """Context segment every pyramid token reads under ``context_map`` (length L): the per-token map."""
        if self.context_map == "training":
            return tuple(self.segment_of_scale[i] for i in self.scale_of_token)
        # reference pipeline: rows [:n_i] of the training mask for scale i, context levels reversed
        row_segment = [self.segment_of_scale[i] for i in self.scale_of_token]
        last = self.n_levels - 1
        return tuple(last - row_segment[j] for n in self.token_counts for j in range(n))

    @cached_property
    def cross_runs(self) -> tuple[tuple[tuple[int, int, int], ...], ...]:
        """Per scale i, the runs ``(j0, j1, segment)`` of its tokens (0..n_i, ends exclusive) that read one
        context segment, in token order. The training map has one run per scale."""
        out = []
        for i in range(self.n_scales):
            seg = self.segment_of_token[self.scale_slice(i)]
            runs: list[tuple[int, int, int]] = []
            for j, s in enumerate(seg):
                if runs and runs[-1][2] == s:
                    runs[-1] = (runs[-1][0], j + 1, s)
                else:
                    runs.append((j, j + 1, s))
            out.append(tuple(runs))
        return tuple(out)

    @cached_property
    def segments_of_scale(self) -> tuple[tuple[int, ...], ...]:
        """The distinct context segments the tokens of scale i read, ascending."""
        return tuple(tuple(sorted({s for _, _, s in runs})) for runs in self.cross_runs)

    @property
    def single_segment(self) -> bool:
        """Whether every scale reads one context segment (always so with the training map)."""
        return all(len(runs) == 1 for runs in self.cross_runs)

    def context_slice(self, i: int) -> slice:
        """Token range of the one segment scale i reads inside the deep-first context.

        Raises ScheduleError where the scale's tokens read several segments (``reference-pipeline``): use the
        per-token map (``segment_of_token``, ``step_cross_ranges``) there.
        """
        runs = self.cross_runs[i]
        if len(runs) != 1:
            raise ScheduleError(
                f"scale {i} reads context segments {self.segments_of_scale[i]} under context map "
                f"{self.context_map!r}: there is no single context slice"
            )
        s = runs[0][2]
        return slice(s * self.context_tokens, (s + 1) * self.context_tokens)

    def step_cross_ranges(self, i: int) -> tuple[tuple[int, int, int, int], ...]:
        """Cross-attention ranges of decode step i: (query start, query end, key start, key end) with queries
        0..n_i of the scale and keys in the full deep-first context (0..S); one per run of ``cross_runs``."""
        T = self.context_tokens
        return tuple((j0, j1, s * T, (s + 1) * T) for j0, j1, s in self.cross_runs[i])

    def step_cross_mask(self, i: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool [n_i, S] cross-attention mask of decode step i (rows of ``cross_attn_mask``)."""
        seg_l = torch.tensor(self.segment_of_token[self.scale_slice(i)], device=device)
        seg_S = torch.arange(self.context_length, device=device) // self.context_tokens
        return seg_l[:, None] == seg_S[None, :]

    @cached_property
    def clip_layers(self) -> tuple[int, ...]:
        """CLIP layer g_m aligned to encoder level e_m, m = 1..M."""
        return tuple(self.clip_layer_base + self.clip_layer_stride * m for m in range(1, self.n_levels + 1))

    # ---- VQ-VAE Phi index -----------------------------------------------------------------------
    @cached_property
    def phi_ticks(self) -> tuple[float, ...]:
        """Positions in [0, 1] of the shared Phi convs: evenly spaced from 1/(3P) to 1 - 1/(3P).

        Computed as start + j * step with the last tick set to the end point exactly, so that the
        ties of the nearest-tick rule (e.g. scale 2 of 10 lies exactly between ticks 0 and 1) resolve
        the way the VAR reference does.
        """
        p = self.phi_count
        start, stop = 1 / 3 / p, 1 - 1 / 3 / p
        if p == 1:
            return (start,)
        step = (stop - start) / (p - 1)
        ticks = [j * step + start for j in range(p)]
        ticks[-1] = stop
        return tuple(ticks)

    @cached_property
    def phi_index(self) -> tuple[int, ...]:
        """Which shared Phi conv scale i uses: the tick nearest i / (K - 1) (first on exact ties)."""
        k = self.n_scales
        out = []
        for i in range(k):
            at = i / (k - 1)
            dists = [abs(t - at) for t in self.phi_ticks]
            out.append(dists.index(min(dists)))
        return tuple(out)

    # ---- masks (True = may attend) --------------------------------------------------------------
    def self_attn_mask(self, mode: AttnMode, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool [L, L] mask of the teacher-forced self-attention.

        scale_local: a token sees only tokens of its own scale. block_causal: its own and all earlier scales.
        """
        if mode not in ATTN_MODES:
            raise ScheduleError(f"attention mode must be one of {ATTN_MODES}, got {mode!r}")
        scale_L = torch.tensor(self.scale_of_token, device=device)
        q, kv = scale_L[:, None], scale_L[None, :]
        return kv == q if mode == "scale_local" else kv <= q

    def cross_attn_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool [L, S] mask: each token sees only the context segment ``segment_of_token`` gives it."""
        seg_L = torch.tensor(self.segment_of_token, device=device)
        seg_S = torch.arange(self.context_length, device=device) // self.context_tokens
        return seg_L[:, None] == seg_S[None, :]

    def key_ranges(self, kind: AttnMode | Literal["cross"]) -> tuple[tuple[int, int, int, int], ...]:
        """The masks as ranges (query start, query end, key start, key end), ends exclusive, in pyramid order.

        The self-attention masks give one range per scale: its own scale (``scale_local``) or the pyramid up to
        and including it (``block_causal``). ``cross`` gives one range per run of ``cross_runs``: a run of a
        scale's tokens and the context segment they read (one per scale with the training map). The query
        ranges partition 0..L. Block-sparse kernels read these instead of the dense masks above.
        """
        if kind not in (*ATTN_MODES, "cross"):
            raise ScheduleError(f"key ranges are for {(*ATTN_MODES, 'cross')}, got {kind!r}")
        out = []
        for i in range(self.n_scales):
            q0, q1 = self.offsets[i], self.offsets[i + 1]
            if kind == "cross":
                out.extend((q0 + j0, q0 + j1, k0, k1) for j0, j1, k0, k1 in self.step_cross_ranges(i))
            else:
                out.append((q0, q1, q0 if kind == "scale_local" else 0, q1))
        return tuple(out)

    # ---- summary -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Everything a host needs to run the loop; written into `info` output and bundle manifests."""
        return {
            "patch_nums": list(self.patch_nums),
            "n_scales": self.n_scales,
            "n_levels": self.n_levels,
            "context_tokens": self.context_tokens,
            "context_length": self.context_length,
            "guidance": self.guidance,
            "context_map": self.context_map,
            "token_counts": list(self.token_counts),
            "offsets": list(self.offsets),
            "total_tokens": self.total_tokens,
            "cached_lengths": list(self.cached_lengths),
            "segment_of_scale": list(self.segment_of_scale),
            "level_of_scale": list(self.level_of_scale),
            "segments_of_scale": [list(s) for s in self.segments_of_scale],
            "clip_layers": list(self.clip_layers),
            "phi_index": list(self.phi_index),
        }
