"""Hierarchical fMRI Encoder: shapes, output conventions, batch independence, errors, size, gradients."""

from __future__ import annotations

import pytest
import torch

from mindhier_rt.config import preset
from mindhier_rt.errors import ConfigError, InputError
from mindhier_rt.models.encoder import EncoderOutput, HierarchicalEncoder


@pytest.fixture(scope="module")
def tiny_encoder() -> HierarchicalEncoder:
    torch.manual_seed(0)
    return HierarchicalEncoder(preset("tiny")).eval()


@pytest.mark.parametrize("subject", ["subj01", "subj02"])
def test_output_shapes(tiny_encoder: HierarchicalEncoder, subject: str) -> None:
    cfg = tiny_encoder.cfg
    count = cfg.encoder.voxel_count(subject)
    batch, m, t, d = 3, cfg.n_levels, cfg.context_tokens, cfg.context_dim
    with torch.no_grad():
        out = tiny_encoder(torch.randn(batch, count), subject)
    assert isinstance(out, EncoderOutput)
    assert out.levels_BMTD.shape == (batch, m, t, d)
    assert out.text_BtD.shape == (batch, cfg.encoder.text_tokens, d)
    assert out.pooled_BD.shape == (batch, d)
    assert out.context_BSD().shape == (batch, cfg.schedule.context_length, d)
    assert out.levels_BMTD.dtype == torch.float32


def test_pooled_is_mean_of_last_level(tiny_encoder: HierarchicalEncoder) -> None:
    with torch.no_grad():
        out = tiny_encoder(torch.randn(2, 96), "subj01")
    torch.testing.assert_close(out.pooled_BD, out.levels_BMTD[:, -1].mean(dim=1))


def test_context_is_deep_first(tiny_encoder: HierarchicalEncoder) -> None:
    cfg = tiny_encoder.cfg
    m, t = cfg.n_levels, cfg.context_tokens
    with torch.no_grad():
        out = tiny_encoder(torch.randn(2, 96), "subj01")
    ctx_BSD = out.context_BSD()
    for seg in range(m):
        # segment 0 is e_M (index M-1), the last segment is e_1 (index 0)
        torch.testing.assert_close(ctx_BSD[:, seg * t : (seg + 1) * t], out.levels_BMTD[:, m - 1 - seg])
    # the levels really differ, so the order check is meaningful
    assert not torch.allclose(out.levels_BMTD[:, 0], out.levels_BMTD[:, -1])


def test_batch_independence(tiny_encoder: HierarchicalEncoder) -> None:
    voxels_BV = torch.randn(4, 80)
    with torch.no_grad():
        full = tiny_encoder(voxels_BV, "subj02")
        for i in range(voxels_BV.shape[0]):
            one = tiny_encoder(voxels_BV[i : i + 1], "subj02")
            torch.testing.assert_close(one.levels_BMTD[0], full.levels_BMTD[i], atol=1e-5, rtol=0)
            torch.testing.assert_close(one.text_BtD[0], full.text_BtD[i], atol=1e-5, rtol=0)
            torch.testing.assert_close(one.pooled_BD[0], full.pooled_BD[i], atol=1e-5, rtol=0)


def test_null_voxels(tiny_encoder: HierarchicalEncoder) -> None:
    null_BV = tiny_encoder.null_voxels("subj02", 3)
    assert null_BV.shape == (3, 80) and null_BV.dtype == torch.float32
    assert torch.count_nonzero(null_BV) == 0
    assert tiny_encoder.null_voxels("subj01", 2, dtype=torch.float64).dtype == torch.float64
    with torch.no_grad():
        out = tiny_encoder(null_BV, "subj02")
    assert torch.isfinite(out.levels_BMTD).all()
    with pytest.raises(ConfigError, match="subj01"):
        tiny_encoder.null_voxels("subj09", 1)


def test_unknown_subject(tiny_encoder: HierarchicalEncoder) -> None:
    with pytest.raises(ConfigError, match=r"subj09.*subj01, subj02"):
        tiny_encoder(torch.randn(1, 96), "subj09")


def test_wrong_voxel_count(tiny_encoder: HierarchicalEncoder) -> None:
    with pytest.raises(InputError, match="subject subj01 expects 96 voxels per scan, got 80"):
        tiny_encoder(torch.randn(2, 80), "subj01")


def test_wrong_rank(tiny_encoder: HierarchicalEncoder) -> None:
    with pytest.raises(InputError, match=r"\[batch, 96\].*\(96,\)"):
        tiny_encoder(torch.randn(96), "subj01")
    with pytest.raises(InputError, match=r"\(1, 2, 96\)"):
        tiny_encoder(torch.randn(1, 2, 96), "subj01")


def test_non_finite_rows(tiny_encoder: HierarchicalEncoder) -> None:
    voxels_BV = torch.randn(5, 96)
    voxels_BV[1, 3] = float("nan")
    voxels_BV[3, 0] = float("inf")
    voxels_BV[3, 7] = float("nan")
    with pytest.raises(InputError, match="2 of 5 voxel rows"):
        tiny_encoder(voxels_BV, "subj01")


def test_full_size_param_count() -> None:
    with torch.device("meta"):
        enc = HierarchicalEncoder(preset("mindhier-512"))
    n = enc.param_count("subj01")
    assert abs(n - 307e6) / 307e6 < 0.015, n
    per_subject = {name: count for name, count in enc.cfg.encoder.subjects}
    assert n == enc.param_count() - sum((c + 1) * 4096 for s, c in per_subject.items() if s != "subj01")
    with pytest.raises(ConfigError):
        enc.param_count("subj42")


def test_gradient_reaches_every_used_parameter() -> None:
    torch.manual_seed(1)
    enc = HierarchicalEncoder(preset("tiny"))
    out = enc(torch.randn(2, 96), "subj01")
    (out.levels_BMTD.sum() + out.text_BtD.sum()).backward()
    for name, p in enc.named_parameters():
        if name.startswith("subject_in.subj02."):
            assert p.grad is None, name
            continue
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
