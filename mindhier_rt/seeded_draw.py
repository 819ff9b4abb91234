"""The portable seeded draw: a counter-based uniform per token position and the inverse-CDF pick from sorted values.

The primitives every implementation of the token draw shares: ``mindhier_rt.sampling`` (the PyTorch selection
rule) and the Triton kernel of ``mindhier_rt.kernels.token_draw`` both import them, and this module imports
neither. Each position's uniform comes from a hash of (seed, scan, sample, scale, token) in 32-bit unsigned
arithmetic (MurmurHash3's fmix32 finaliser chained over the key's words), so any language reproduces it;
``docs/sampling.md`` is the specification, with reference values.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from mindhier_rt.errors import ConfigError

MASK32 = 0xFFFFFFFF
HASH_IV = 0x243F6A88  # first 32 bits of the fractional part of pi
FMIX_C1 = 0x85EBCA6B  # MurmurHash3 fmix32 constants
FMIX_C2 = 0xC2B2AE35
U_SCALE = 2.0**-32  # u = h * 2**-32: exact in float64, 0 <= u <= 1 - 2**-32


def is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _fmix32_int(x: int) -> int:
    """MurmurHash3's 32-bit finaliser on a Python int in [0, 2**32)."""
    x ^= x >> 16
    x = (x * FMIX_C1) & MASK32
    x ^= x >> 13
    x = (x * FMIX_C2) & MASK32
    x ^= x >> 16
    return x


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32) without int64 overflow: x split into 16-bit halves."""
    lo = x & 0xFFFF
    hi = x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & MASK32  # lo * c < 2**48, sum < 2**49


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """fmix32 elementwise on an int64 tensor holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, FMIX_C1)
    x = x ^ (x >> 13)
    x = _mul32(x, FMIX_C2)
    return x ^ (x >> 16)


def hash_key(seed: int, scan: int, sample: int, scale: int, token: int) -> int:
    """The 32-bit hash h of one key, in plain Python ints (reference for one position)."""
    _check_seed(seed)
    h = HASH_IV
    for name, w in (("scan", scan), ("sample", sample), ("scale", scale), ("token", token)):
        check_word(name, w)
    for w in (seed & MASK32, seed >> 32, scan, sample, scale, token):
        h = _fmix32_int(h ^ w)
    return h


def _check_seed(seed: int) -> None:
    if not (is_int(seed) and 0 <= seed < 2**64):
        raise ConfigError(f"seed must be an int with 0 <= seed < 2**64, got {seed!r}")


def check_word(name: str, w: object) -> None:
    if not (is_int(w) and 0 <= w <= MASK32):
        raise ConfigError(f"{name} must be an int with 0 <= {name} < 2**32, got {w!r}")


def ids_tensor(name: str, ids: torch.Tensor | Sequence[int], device: torch.device | None) -> torch.Tensor:
    """Ids as a 1-D int64 tensor. Values are range-checked where that costs no device sync (CPU)."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ConfigError(f"{name} must be an integer tensor, got dtype {ids.dtype}")
        ids_N = ids.to(torch.int64)
    else:
        try:
            vals = [operator.index(w) for w in ids]
        except TypeError as e:
            raise ConfigError(f"{name} must be a 1-D sequence of ints, got {ids!r}") from e
        for w in vals:
            check_word(name, w)
        ids_N = torch.tensor(vals, dtype=torch.int64)
    if ids_N.dim() != 1:
        raise ConfigError(f"{name} must be 1-D [N], got shape {tuple(ids_N.shape)}")
    if ids_N.device.type == "cpu" and ids_N.numel() and bool(((ids_N < 0) | (ids_N > MASK32)).any()):
        raise ConfigError(f"{name} must hold ints in [0, 2**32), got min {int(ids_N.min())} max {int(ids_N.max())}")
    return ids_N if device is None else ids_N.to(device)


def seed_hash(seed: int) -> int:
    """The hash state after the two seed words: the same for every position of a stream, so computed once on the
    host (by ``uniforms`` and by the draw kernel of ``kernels/token_draw.py``)."""
    _check_seed(seed)
    return _fmix32_int(_fmix32_int(HASH_IV ^ (seed & MASK32)) ^ (seed >> 32))


def hash_grid(seed: int, scan_N: torch.Tensor, sample_N: torch.Tensor, scale: int, n_tokens: int) -> torch.Tensor:
    """int64 [N, n_tokens] hashes h in [0, 2**32) of keys (seed, scan_N, sample_N, scale, 0..n_tokens-1)."""
    h_N = _fmix32(seed_hash(seed) ^ scan_N)
    h_N = _fmix32(h_N ^ sample_N)
    h_N = _fmix32(h_N ^ scale)
    token_l = torch.arange(n_tokens, dtype=torch.int64, device=scan_N.device)
    return _fmix32(h_N[:, None] ^ token_l[None, :])


def uniforms(
    seed: int,
    scan_ids: torch.Tensor | Sequence[int],
    sample_ids: torch.Tensor | Sequence[int],
    scale: int,
    n_tokens: int,
) -> torch.Tensor:
    """Float64 [N, n_tokens] uniforms u = h * 2**-32 in [0, 1), on the ids' device.

    Row r, column j is keyed by (seed, scan_ids[r], sample_ids[r], scale, j). Id values are checked on
    CPU tensors and sequences; on other devices the check would need a sync, so there they are trusted.
    """
    _check_seed(seed)
    check_word("scale", scale)
    if not (is_int(n_tokens) and 0 <= n_tokens <= MASK32 + 1):
        raise ConfigError(f"n_tokens must be an int in [0, 2**32], got {n_tokens!r}")
    scan_N = ids_tensor("scan_ids", scan_ids, None)
    sample_N = ids_tensor("sample_ids", sample_ids, scan_N.device)
    if scan_N.shape != sample_N.shape:
        raise ConfigError(
            f"scan_ids and sample_ids must have the same length, got {scan_N.numel()} and {sample_N.numel()}"
        )
    return hash_grid(seed, scan_N, sample_N, scale, n_tokens).to(torch.float64) * U_SCALE


# ---- the pick --------------------------------------------------------------------------------------
def draw_from_sorted(top_Nlk: torch.Tensor, order_Nlk: torch.Tensor, top_p: float, u_Nl: torch.Tensor) -> torch.Tensor:
    """Steps 3-6 of the selection rule (docs/sampling.md): from the first k values of each position's stable
    descending order (``top_Nlk``, any float dtype) and their token indices (``order_Nlk``), the float64 softmax,
    the top-p prefix and the inverse-CDF draw with the uniforms ``u_Nl`` (float64). Returns int64 [N, l]."""
    top_Nlk = top_Nlk.to(torch.float64)
    # Unnormalised softmax: e_j = exp(x_j - x_0), E_j = e_0 + ... + e_j (float64, sorted order),
    # Z = E_{k-1}. Same as cumulative probabilities E_j / Z, with fewer roundings.
    e_Nlk = torch.exp(top_Nlk - top_Nlk[..., :1])  # first sorted value is the max
    cum_Nlk = torch.cumsum(e_Nlk, dim=-1)
    z_Nl = cum_Nlk[..., -1]

    # top-p: keep position j iff E_{j-1} < top_p * Z (position 0 always kept); the kept set is a prefix.
    before_Nlk = torch.cat([torch.zeros_like(cum_Nlk[..., :1]), cum_Nlk[..., :-1]], dim=-1)
    kept_Nlk = before_Nlk < (top_p * z_Nl)[..., None]
    kept_Nlk[..., 0] = True
    n_kept_Nl = kept_Nlk.sum(dim=-1)
    mass_Nl = torch.gather(cum_Nlk, -1, (n_kept_Nl - 1)[..., None]).squeeze(-1)

    # inverse CDF over the kept prefix: first kept position whose cumulative sum > u * mass.
    target_Nl = u_Nl * mass_Nl
    pos_Nl = ((cum_Nlk <= target_Nl[..., None]) & kept_Nlk).sum(dim=-1)
    pos_Nl = torch.minimum(pos_Nl, n_kept_Nl - 1)  # float edge: target >= last kept cumulative sum
    return torch.gather(order_Nlk, -1, pos_Nl[..., None]).squeeze(-1)
