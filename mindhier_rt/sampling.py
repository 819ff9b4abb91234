"""Token sampling shared by every backend: CFG combine and ramp, top-k, top-p, a portable seeded draw.

Every backend (PyTorch, ONNX Runtime, TensorRT, the C++ host) must turn the same logits into the same
tokens, so the draw does not use torch's RNG. Each token position gets its own uniform from a
counter-based hash of (seed, scan, sample, scale, token) that any language reproduces with 32-bit
unsigned arithmetic, and the selection rule (stable descending order, top-k, float64 softmax, top-p
prefix, inverse CDF) is fixed exactly. ``docs/sampling.md`` is the full specification, with reference
values. The hash and the inverse-CDF pick live in ``mindhier_rt.seeded_draw`` (shared with the Triton draw
kernel, ``mindhier_rt.kernels.token_draw``); this module re-exports them.

Rows of a batch are (scan, sample) pairs whose ids come from the caller, so how rows are batched never
changes the tokens drawn for a row.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mindhier_rt.errors import ConfigError
from mindhier_rt.seeded_draw import (
    U_SCALE,
    check_word,
    draw_from_sorted,
    hash_grid,
    hash_key,
    ids_tensor,
    is_int,
    seed_hash,
    uniforms,
)

__all__ = [
    "SamplingConfig",
    "cfg_combine",
    "choose_tokens",
    "draw_from_sorted",
    "guidance_active",
    "guidance_weight",
    "hash_key",
    "sample_tokens",
    "seed_hash",
    "uniforms",
]

CFG_SCALE_MAX = 1000.0  # far above useful guidance (papers use up to ~10-20); finite in float32 / float16 math


# ---- config ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingConfig:
    """How logits become tokens. Validated on construction; raises ConfigError."""

    cfg_scale: float = 6.0  # guidance weight at the last scale; 0 disables guidance
    cfg_stop: int | None = None  # first 0-indexed scale with guidance off (None: all scales guided)
    top_k: int = 400  # keep the k most likely tokens; 0 = no top-k; clamped to V
    top_p: float = 0.95  # nucleus mass in (0, 1]; 1.0 = no top-p
    greedy: bool = False  # argmax (lowest index on ties); ignores seed, top_k and top_p
    seed: int = 0  # 0 <= seed < 2**64

    def __post_init__(self) -> None:
        cfg_scale = _as_float("cfg_scale", self.cfg_scale)
        # the loop computes in float32 (float16 in half bundles): a float64-finite 1e39 would be inf there
        if not (math.isfinite(cfg_scale) and 0.0 <= cfg_scale <= CFG_SCALE_MAX):
            raise ConfigError(
                f"cfg_scale must be a finite float in [0, {CFG_SCALE_MAX:g}] (0 = no guidance), got {self.cfg_scale!r}"
            )
        object.__setattr__(self, "cfg_scale", cfg_scale)
        if self.cfg_stop is not None and not (is_int(self.cfg_stop) and self.cfg_stop >= 0):
            raise ConfigError(f"cfg_stop must be None or an int >= 0 (a 0-indexed scale), got {self.cfg_stop!r}")
        if not (is_int(self.top_k) and self.top_k >= 0):
            raise ConfigError(f"top_k must be an int >= 0 (0 = no top-k), got {self.top_k!r}")
        top_p = _as_float("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:  # also rejects NaN
            raise ConfigError(f"top_p must be a float in (0, 1] (1.0 = no top-p), got {self.top_p!r}")
        object.__setattr__(self, "top_p", top_p)
        if not isinstance(self.greedy, bool):
            raise ConfigError(f"greedy must be a bool, got {self.greedy!r}")
        if not (is_int(self.seed) and 0 <= self.seed < 2**64):
            raise ConfigError(f"seed must be an int with 0 <= seed < 2**64, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingConfig:
        """Inverse of ``to_dict``; missing keys take their defaults, unknown keys raise ConfigError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown sampling config keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)


def recorded_sampling(backend: object) -> SamplingConfig:
    """The sampling settings a backend's model was exported with (an engine bundle's manifest records them), or
    the defaults of ``SamplingConfig`` for a checkpoint."""
    bundle = getattr(backend, "bundle", None)
    spec = getattr(bundle, "spec", None)
    return spec.sampling if spec is not None else SamplingConfig()


def with_overrides(base: SamplingConfig, **overrides: object) -> tuple[SamplingConfig, dict[str, str]]:
    """``base`` with the settings a user gave (None: not given; ``cfg_stop`` < 0: guidance on at every scale),
    and where each field of the result came from: ``"flag"`` or ``"recorded"`` (the base)."""
    fields = base.to_dict()
    source = dict.fromkeys(fields, "recorded")
    for name, value in overrides.items():
        if name not in fields:
            raise ConfigError(f"unknown sampling setting {name!r}; expected one of {sorted(fields)}")
        if value is None:
            continue
        fields[name] = None if name == "cfg_stop" and is_int(value) and value < 0 else value
        source[name] = "flag"
    return SamplingConfig(**fields), source


def _as_float(name: str, x: object) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ConfigError(f"{name} must be a float, got {x!r}")
    return float(x)


# ---- classifier-free guidance ---------------------------------------------------------------------
def guidance_active(scfg: SamplingConfig, scale: int) -> bool:
    """Whether scale ``scale`` (0-indexed) runs the unconditional pass and combines: cfg_scale > 0 and
    (cfg_stop is None or scale < cfg_stop)."""
    return scfg.cfg_scale > 0.0 and (scfg.cfg_stop is None or scale < scfg.cfg_stop)


def guidance_weight(scfg: SamplingConfig, scale: int, n_scales: int) -> float:
    """Ramped guidance weight t_i = (cfg_scale * i) / (K - 1) in float64; 0.0 where guidance is off.

    t_0 = 0 and t_{K-1} = cfg_scale. Scale 0 still counts as guided for ``guidance_active`` (its
    unconditional pass runs, e.g. to fill the unconditional KV cache), it just gets weight 0.
    """
    if not (is_int(n_scales) and n_scales >= 2):
        raise ConfigError(f"n_scales must be an int >= 2, got {n_scales!r}")
    if not (is_int(scale) and 0 <= scale < n_scales):
        raise ConfigError(f"scale must be an int in 0..{n_scales - 1}, got {scale!r}")
    if not guidance_active(scfg, scale):
        return 0.0
    return scfg.cfg_scale * scale / (n_scales - 1)


def cfg_combine(cond_NlV: torch.Tensor, uncond_NlV: torch.Tensor, t: float) -> torch.Tensor:
    """(1 + t) * cond - t * uncond in float32: w_c = fp32(1 + t), w_u = fp32(t), two fp32 products and
    one fp32 difference (no fused multiply-add). Returns float32 of the inputs' shape."""
    if cond_NlV.shape != uncond_NlV.shape:
        raise ConfigError(
            f"cond and uncond logits must have the same shape, got {tuple(cond_NlV.shape)} "
            f"and {tuple(uncond_NlV.shape)}"
        )
    t = float(t)
    # torch.full, not torch.tensor: a fill on the device, no host-to-device copy (so a CUDA graph can hold it)
    w_cond = torch.full((), 1.0 + t, dtype=torch.float32, device=cond_NlV.device)
    w_uncond = torch.full((), t, dtype=torch.float32, device=cond_NlV.device)
    return cond_NlV.float() * w_cond - uncond_NlV.float() * w_uncond


# ---- selection ------------------------------------------------------------------------------------
def stable_top_k(x_NlV: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k entries of a stable descending sort of the last axis (ties by ascending index): values, indices.

    ``torch.topk`` is much faster than a full sort for k << V (CPU, ``benchmarks/results/topk_cpu.md``: 2.85x at
    k = 400 of 4096, no gain at k = 900; taken here for k <= V / 8) but does not say which of several equal
    values at the k-th place it keeps. So: take topk, order the k kept entries stably (by index, then by
    value), and redo with the full stable sort only the rows where the k-th value also occurs outside the
    kept set (a tie across the cut, rare for real logits). The result equals the full sort's exactly.
    Off the CPU the full sort is taken always, because the repair's check is a host sync, which a CUDA graph
    cannot hold (the cost of the full sort there has not been timed against topk).
    """
    V = x_NlV.shape[-1]
    if 8 * k > V or x_NlV.device.type != "cpu":
        vals_NlV, idx_NlV = torch.sort(x_NlV, dim=-1, descending=True, stable=True)
        return vals_NlV[..., :k], idx_NlV[..., :k]
    vals_Nlk, idx_Nlk = torch.topk(x_NlV, k, dim=-1)
    idx_Nlk, by_index = idx_Nlk.sort(dim=-1)
    vals_Nlk, by_value = torch.sort(vals_Nlk.gather(-1, by_index), dim=-1, descending=True, stable=True)
    idx_Nlk = idx_Nlk.gather(-1, by_value)
    kth_Nl1 = vals_Nlk[..., -1:]
    cut_tie_Nl = (x_NlV == kth_Nl1).sum(dim=-1) != (vals_Nlk == kth_Nl1).sum(dim=-1)
    if bool(cut_tie_Nl.any()):
        full_vals, full_idx = torch.sort(x_NlV[cut_tie_Nl], dim=-1, descending=True, stable=True)
        vals_Nlk[cut_tie_Nl], idx_Nlk[cut_tie_Nl] = full_vals[..., :k], full_idx[..., :k]
    return vals_Nlk, idx_Nlk


def sample_tokens(
    logits_NlV: torch.Tensor,
    scfg: SamplingConfig,
    scale: int,
    scan_ids: torch.Tensor | Sequence[int],
    sample_ids: torch.Tensor | Sequence[int],
    fused: bool = False,
) -> torch.Tensor:
    """Int64 [N, l] token indices drawn from (already CFG-combined) logits [N, l, V], on their device.

    Greedy: argmax, lowest index on ties. Otherwise: stable descending sort (ties by ascending index),
    keep the first min(top_k, V) (all if top_k = 0), float64 softmax over those, keep the shortest prefix
    whose mass reaches top_p (position j kept iff the mass before j is < top_p), then pick the first kept
    position whose cumulative mass exceeds u * (kept mass). docs/sampling.md has the exact arithmetic.
    Logits must be finite (-inf is allowed where each row keeps one finite value).

    ``fused=True`` draws from the sorted values with one Triton kernel per scale
    (``mindhier_rt.kernels.token_draw.draw_sorted``: the same rule, about 110 fewer kernels per scale);
    greedy decoding, k > ``MAX_K`` and float64 logits keep the PyTorch code.
    """
    if logits_NlV.dim() != 3:
        raise ConfigError(f"logits must be [N, l, V], got shape {tuple(logits_NlV.shape)}")
    if not logits_NlV.dtype.is_floating_point:
        raise ConfigError(f"logits must be a floating-point tensor, got dtype {logits_NlV.dtype}")
    N, n_tok, V = logits_NlV.shape
    if V < 1:
        raise ConfigError(f"logits need a vocabulary of at least 1, got V = {V}")
    device = logits_NlV.device
    check_word("scale", scale)
    scan_N = ids_tensor("scan_ids", scan_ids, device)
    sample_N = ids_tensor("sample_ids", sample_ids, device)
    if scan_N.numel() != N or sample_N.numel() != N:
        raise ConfigError(
            f"scan_ids and sample_ids need one id per row: expected {N}, got {scan_N.numel()} and {sample_N.numel()}"
        )

    if scfg.greedy:
        return logits_NlV.argmax(dim=-1)  # first maximal index on ties

    # Sorting in float32 (float64 for float64 input) is exact for every float input, so order and ties
    # are those of the given logits.
    x_NlV = logits_NlV if logits_NlV.dtype == torch.float64 else logits_NlV.float()
    k = V if scfg.top_k == 0 else min(scfg.top_k, V)
    top_Nlk, order_Nlk = stable_top_k(x_NlV, k)
    if fused:
        from mindhier_rt.kernels.token_draw import MAX_K, draw_sorted

        if k <= MAX_K and top_Nlk.dtype == torch.float32:
            return draw_sorted(top_Nlk, order_Nlk, scfg.top_p, scfg.seed, scan_N, sample_N, scale)
    u_Nl = hash_grid(scfg.seed, scan_N, sample_N, scale, n_tok).to(torch.float64) * U_SCALE
    return draw_from_sorted(top_Nlk, order_Nlk, scfg.top_p, u_Nl)


def choose_tokens(
    logits_BlV: torch.Tensor,
    scfg: SamplingConfig,
    scale: int,
    guidance: float | None,
    scan_ids: torch.Tensor,
    sample_ids: torch.Tensor,
    fused: bool = False,
) -> torch.Tensor:
    """One scale's tokens from the generator's logits: with ``guidance`` (the weight t of ``guidance_weight``)
    the rows are [conditional; unconditional] halves, combined by ``cfg_combine`` first; then ``sample_tokens``.

    The decode loop calls this (or a backend's own ``choose_tokens`` with the same signature and results, e.g.
    the fast backend's replay of it as a CUDA graph). ``fused`` as in ``sample_tokens``. Returns int64 [N, l] on
    the logits' device.
    """
    if guidance is not None:
        half = logits_BlV.shape[0] // 2
        logits_BlV = cfg_combine(logits_BlV[:half], logits_BlV[half:], guidance)
    return sample_tokens(logits_BlV, scfg, scale, scan_ids, sample_ids, fused)
