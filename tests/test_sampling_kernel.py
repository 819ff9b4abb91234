"""The token-draw kernel (``kernels/token_draw.py``) against its PyTorch reference and the sampling rule.

Without CUDA the kernel runs under Triton's interpreter (conftest sets ``TRITON_INTERPRET=1``). Tokens must be
identical: the uniforms are bit-exact and the float64 sums agree to the last bits, far from any draw boundary
on random inputs.
"""

from __future__ import annotations

import pytest
import torch

from mindhier_rt import sampling as S
from mindhier_rt.errors import ConfigError

ks = pytest.importorskip("mindhier_rt.kernels.token_draw")
if not ks.HAS_TRITON:
    pytest.skip("Triton is not installed", allow_module_level=True)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def sorted_logits(N: int, l: int, V: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, l, V, generator=g) * 3
    x[0, 0, : V // 4] = x[0, 0, 0]  # a tie across the top-k cut, resolved by index
    x[-1, -1, V // 2 :] = float("-inf")  # tokens of probability 0
    vals, order = torch.sort(x.to(DEV), dim=-1, descending=True, stable=True)
    return vals, order


@pytest.mark.parametrize(("k", "top_p"), [(40, 0.9), (300, 1.0), (1, 0.5), (257, 0.05)])
def test_draw_matches_the_reference(k, top_p):
    vals, order = sorted_logits(3, 17, 300, seed=k)
    scan = torch.tensor([5, 2**32 - 1, 0], device=DEV)
    sample = torch.tensor([0, 3, 2**31 + 7], device=DEV)
    for seed, scale in ((0, 0), (12345, 7), (2**64 - 1, 2**32 - 1), (2**33 + 5, 1)):
        got = ks.draw_sorted(vals[..., :k], order[..., :k], top_p, seed, scan, sample, scale)
        want = ks.draw_sorted_ref(vals[..., :k], order[..., :k], top_p, seed, scan, sample, scale)
        assert got.dtype == torch.int64 and torch.equal(got, want), (seed, scale, (got != want).sum())


@pytest.mark.parametrize("guided", [False, True])
def test_fused_choose_tokens_gives_the_reference_tokens(guided):
    """Through the public entry point: CFG combine, sort (top-k path on the CPU), then the kernel."""
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(4 if guided else 2, 25, 512, generator=g) * 2).to(DEV)
    ids, samples = torch.tensor([9, 4], device=DEV), torch.tensor([0, 1], device=DEV)
    for scfg in (S.SamplingConfig(seed=1), S.SamplingConfig(top_k=0, top_p=0.8, seed=2), S.SamplingConfig(greedy=True)):
        args = (logits, scfg, 3, 2.5 if guided else None, ids, samples)
        assert torch.equal(S.choose_tokens(*args, fused=True), S.choose_tokens(*args))


def test_draw_follows_the_rule_on_a_hand_made_case():
    """Two tokens of equal mass: with top_p = 0.4 the first alone reaches it and is kept, whatever the uniform."""
    vals = torch.tensor([[[1.0, 1.0, -20.0]]], device=DEV)
    order = torch.tensor([[[2, 0, 1]]], device=DEV)
    ids = torch.tensor([0], device=DEV)
    for seed in range(5):
        assert ks.draw_sorted(vals, order, 0.4, seed, ids, ids, 0).item() == 2
    drawn = {ks.draw_sorted(vals, order, 1.0, seed, ids, ids, 0).item() for seed in range(40)}
    assert drawn == {2, 0}  # the third token's mass (~4e-10) is never drawn in 40 tries


def test_bad_arguments_raise():
    vals, order = sorted_logits(1, 2, 8, seed=0)
    ids = torch.tensor([0], device=DEV)
    with pytest.raises(ConfigError, match="int64 indices"):
        ks.draw_sorted(vals, order.int(), 0.9, 0, ids, ids, 0)
    with pytest.raises(ConfigError, match=r"\[N, l, k\]"):
        ks.draw_sorted(vals, order[..., :4], 0.9, 0, ids, ids, 0)
    with pytest.raises(ConfigError, match="ids must be"):
        ks.draw_sorted(vals, order, 0.9, 0, torch.tensor([0, 1], device=DEV), ids, 0)
    with pytest.raises(ConfigError, match="seed"):
        ks.draw_sorted(vals, order, 0.9, -1, ids, ids, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_draw_at_mindhier_512_size():
    """The last scale of mindhier-512 with guidance: 1024 positions, V = 4096, k = 400."""
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(2, 1024, 4096, device="cuda", generator=g) * 4
    ids = torch.tensor([0], device="cuda")
    for seed in range(3):
        scfg = S.SamplingConfig(cfg_scale=4.0, seed=seed)
        args = (logits, scfg, 9, 4.0, ids, ids)
        assert torch.equal(S.choose_tokens(*args, fused=True), S.choose_tokens(*args))
