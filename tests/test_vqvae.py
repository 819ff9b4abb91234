"""Multi-scale VQ-VAE and its resampling matrices (tiny preset; a few seconds on a CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mindhier_rt.config import preset
from mindhier_rt.errors import InputError
from mindhier_rt.models.resample import area_matrix, bicubic_matrix, resample, resize_area, resize_bicubic
from mindhier_rt.models.vqvae import MultiScaleVQVAE

SIZE_PAIRS = [(16, 13), (16, 10), (16, 6), (16, 5), (16, 3), (16, 1), (1, 16), (2, 16), (3, 16), (13, 16)]
SIZE_PAIRS += [(32, 24), (32, 18), (32, 9), (4, 3), (5, 7)]


# ---- resample.py ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("n_in", "n_out"), SIZE_PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matrices_match_interpolate(n_in: int, n_out: int, dtype: torch.dtype) -> None:
    torch.manual_seed(n_in * 100 + n_out)
    x_BEhw = torch.randn(2, 3, n_in, n_in, dtype=dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    want_area = F.interpolate(x_BEhw, size=(n_out, n_out), mode="area")
    want_cubic = F.interpolate(x_BEhw, size=(n_out, n_out), mode="bicubic", align_corners=False)
    torch.testing.assert_close(resize_area(x_BEhw, n_out), want_area, atol=tol, rtol=0)
    torch.testing.assert_close(resize_bicubic(x_BEhw, n_out), want_cubic, atol=tol, rtol=0)
    # the float64 matrices, applied directly, agree too (up to the float32 weight rounding)
    m_area, m_cubic = area_matrix(n_in, n_out), bicubic_matrix(n_in, n_out)
    assert m_area.shape == m_cubic.shape == (n_out, n_in)
    torch.testing.assert_close(resample(x_BEhw, m_area, m_area), want_area, atol=1e-5, rtol=0)
    torch.testing.assert_close(resample(x_BEhw, m_cubic, m_cubic), want_cubic, atol=1e-5, rtol=0)


def test_resample_non_square_and_row_sums() -> None:
    x_BEhw = torch.randn(2, 3, 16, 32, dtype=torch.float64)
    out = resample(x_BEhw, area_matrix(16, 13), bicubic_matrix(32, 9))
    ref = F.interpolate(F.interpolate(x_BEhw, size=(13, 32), mode="area"), size=(13, 9), mode="bicubic")
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    for n_in, n_out in SIZE_PAIRS:
        torch.testing.assert_close(area_matrix(n_in, n_out).sum(1), torch.ones(n_out, dtype=torch.float64))
        torch.testing.assert_close(bicubic_matrix(n_in, n_out).sum(1), torch.ones(n_out, dtype=torch.float64))


def test_matrices_built_in_inference_mode_support_autograd() -> None:
    with torch.inference_mode():
        m_Hh = bicubic_matrix(7, 11, torch.float32)
    assert not m_Hh.is_inference()
    x_BEhw = torch.randn(1, 2, 7, 7, requires_grad=True)
    resize_bicubic(x_BEhw, 11).sum().backward()
    assert x_BEhw.grad is not None


# ---- the VQ-VAE -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vq() -> MultiScaleVQVAE:
    torch.manual_seed(0)
    return MultiScaleVQVAE(preset("tiny")).eval()


@pytest.fixture(scope="module")
def img() -> Tensor:
    torch.manual_seed(1)
    return torch.rand(2, 3, 64, 64)


def _random_idx(vq: MultiScaleVQVAE, batch: int, seed: int = 2) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vq.vocab_size, (batch, n), generator=g) for n in vq.schedule.token_counts]


def _reference_quantise(vq: MultiScaleVQVAE, f_BEhw: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The recipe written out with F.interpolate, brute-force argmin and the Phi formula by hand."""
    sched, n = vq.schedule, vq.schedule.last_side
    book_VE = vq.quantize.embedding.weight
    r = vq.cfg.vqvae.phi_ratio
    f_rest, f_hat = f_BEhw.clone(), torch.zeros_like(f_BEhw)
    idx_list = []
    for i, pn in enumerate(sched.patch_nums):
        last = i == sched.n_scales - 1
        rest = f_rest if last else F.interpolate(f_rest, size=(pn, pn), mode="area")
        rest_NE = rest.permute(0, 2, 3, 1).reshape(-1, vq.latent_dim)
        dist_NV = ((rest_NE[:, None, :] - book_VE[None, :, :]) ** 2).sum(-1)
        idx_Bl = dist_NV.argmin(1).reshape(f_BEhw.shape[0], pn * pn)
        h = book_VE[idx_Bl].reshape(-1, pn, pn, vq.latent_dim).permute(0, 3, 1, 2)
        if not last:
            h = F.interpolate(h, size=(n, n), mode="bicubic", align_corners=False)
        phi = vq.quantize.quant_resi.qresi_ls[sched.phi_index[i]]
        h = (1 - r) * h + r * F.conv2d(h, phi.weight, phi.bias, padding=1)
        f_hat, f_rest = f_hat + h, f_rest - h
        idx_list.append(idx_Bl)
    return f_hat, idx_list


@torch.no_grad()
def test_update_fhat_matches_idx_to_fhat_and_teacher_inputs(vq: MultiScaleVQVAE) -> None:
    sched = vq.schedule
    idx_list = _random_idx(vq, batch=3)
    f_hat = vq.empty_fhat(3)
    assert f_hat.shape == (3, vq.latent_dim, sched.last_side, sched.last_side)
    nexts = []
    for i, idx_Bl in enumerate(idx_list):
        f_hat, next_BlE = vq.update_fhat(i, f_hat, idx_Bl)
        if i == sched.n_scales - 1:
            assert next_BlE is None
        else:
            assert next_BlE is not None
            assert next_BlE.shape == (3, sched.token_counts[i + 1], vq.latent_dim)
            nexts.append(next_BlE)
    assert (f_hat - vq.idx_to_fhat(idx_list)).abs().max() < 1e-5
    teacher_BLE = vq.teacher_inputs(idx_list)
    assert teacher_BLE.shape == (3, sched.total_tokens - 1, vq.latent_dim)
    assert (teacher_BLE - torch.cat(nexts, 1)).abs().max() < 1e-6
    # next input = f_hat so far, area-downsampled and flattened row-major
    partial = vq.update_fhat(0, vq.empty_fhat(3), idx_list[0])[0]
    pn1 = sched.patch_nums[1]
    want = F.interpolate(partial, size=(pn1, pn1), mode="area").flatten(2).transpose(1, 2)
    assert (teacher_BLE[:, : sched.token_counts[1]] - want).abs().max() < 1e-5


@torch.no_grad()
def test_quantiser_matches_reference_recipe(vq: MultiScaleVQVAE, img: Tensor) -> None:
    f_BEhw = vq.encode_latent(img)
    n = vq.schedule.last_side
    assert f_BEhw.shape == (2, vq.latent_dim, n, n)
    ref_fhat, ref_idx = _reference_quantise(vq, f_BEhw)
    idx_list = vq.img_to_idx(img)
    assert [tuple(t.shape) for t in idx_list] == [(2, c) for c in vq.schedule.token_counts]
    assert all(t.dtype == torch.int64 for t in idx_list)
    for got, want in zip(idx_list, ref_idx, strict=True):
        assert torch.equal(got, want)
    assert (vq.idx_to_fhat(idx_list) - ref_fhat).abs().max() < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(vq(img).idx, idx_list, strict=True))


@torch.no_grad()
def test_decoded_images_in_unit_range(vq: MultiScaleVQVAE, img: Tensor) -> None:
    out = vq.fhat_to_img(vq.idx_to_fhat(vq.img_to_idx(img)))
    assert out.shape == (2, 3, vq.image_size, vq.image_size)
    assert out.min() >= 0.0 and out.max() <= 1.0
    pushed = copy.deepcopy(vq)  # push two channels far outside [-1, 1]: the clamp must hold them at 0 and 1
    pushed.decoder.conv_out.bias.copy_(torch.tensor([10.0, -10.0, 0.0]))
    out = pushed.fhat_to_img(pushed.idx_to_fhat(pushed.img_to_idx(img)))
    assert torch.all(out[:, 0] == 1.0) and torch.all(out[:, 1] == 0.0)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_user_errors(vq: MultiScaleVQVAE, img: Tensor) -> None:
    with pytest.raises(InputError):
        vq.img_to_idx(img[:, :, :32, :32])
    idx_list = _random_idx(vq, batch=2)
    with pytest.raises(InputError):
        vq.idx_to_fhat(idx_list[:-1])
    with pytest.raises(InputError):
        vq.update_fhat(1, vq.empty_fhat(2), idx_list[2])
    with pytest.raises(InputError):
        vq.update_fhat(len(idx_list), vq.empty_fhat(2), idx_list[-1])


def test_full_size_parameter_counts_on_meta() -> None:
    with torch.device("meta"):
        m = MultiScaleVQVAE(preset("mindhier-512"))

    def count(*mods: torch.nn.Module) -> int:
        return sum(p.numel() for mod in mods for p in mod.parameters())

    assert m.quantize.embedding.weight.is_meta
    assert count(m) == pytest.approx(108.9e6, rel=0.015)
    assert count(m.encoder, m.quant_conv) == pytest.approx(44.1e6, rel=0.015)
    assert count(m.decoder, m.post_quant_conv) == pytest.approx(64.7e6, rel=0.015)
    assert len(m.quantize.quant_resi.qresi_ls) == m.schedule.phi_count


def test_training_steps_lower_the_loss(img: Tensor) -> None:
    torch.manual_seed(4)
    m = MultiScaleVQVAE(preset("tiny")).train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)

    def losses() -> tuple[Tensor, Tensor]:
        out = m(img)
        recon = F.mse_loss(out.recon, img)
        return recon + out.vq_loss, recon

    first_total, first_recon = (t.item() for t in losses())
    for _ in range(6):
        total, _ = losses()
        assert torch.isfinite(total)
        opt.zero_grad()
        total.backward()
        opt.step()
    assert m.quantize.embedding.weight.grad is not None and m.encoder.conv_in.weight.grad is not None
    assert m.quantize.quant_resi.qresi_ls[0].weight.grad is not None
    with torch.no_grad():
        final_total, final_recon = (t.item() for t in losses())
    assert final_total < first_total
    assert final_recon < 0.9 * first_recon
