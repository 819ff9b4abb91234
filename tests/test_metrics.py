"""Tests for the NSD reconstruction metrics, including an independent brute-force SSIM reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mindhier_rt.metrics import (
    LUMA_BT601,
    LUMA_BT709,
    correlation_distance,
    gaussian_kernel_1d,
    pixcorr,
    resize,
    retrieval_accuracy,
    ssim,
    two_way_identification,
)


def _images(n: int = 4, size: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def _brute_force_ssim(x: np.ndarray, y: np.ndarray, luma: tuple[float, float, float] = LUMA_BT601) -> float:
    """SSIM of two [3, H, W] images with explicit per-pixel loops over the valid (unpadded) region.

    Written from the definition, independent of the module: 11 x 11 window from exp(-d^2 / (2 sigma^2))
    for d in -5..5 (sigma 1.5), normalised to sum 1; weighted means, variances and covariance without
    sample correction; K1 = 0.01, K2 = 0.03, L = 1; mean over every pixel whose window fits the image.
    """
    sigma, radius = 1.5, 5
    d = np.arange(-radius, radius + 1, dtype=np.float64)
    w2 = np.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / (2 * sigma**2))
    w2 /= w2.sum()
    wr, wg, wb = luma
    gx = wr * x[0] + wg * x[1] + wb * x[2]
    gy = wr * y[0] + wg * y[1] + wb * y[2]
    c1, c2 = (0.01 * 1.0) ** 2, (0.03 * 1.0) ** 2
    h, w = gx.shape
    vals = []
    for i in range(radius, h - radius):
        for j in range(radius, w - radius):
            px = gx[i - radius : i + radius + 1, j - radius : j + radius + 1]
            py = gy[i - radius : i + radius + 1, j - radius : j + radius + 1]
            mx = float((w2 * px).sum())
            my = float((w2 * py).sum())
            vx = float((w2 * (px - mx) ** 2).sum())
            vy = float((w2 * (py - my) ** 2).sum())
            cxy = float((w2 * (px - mx) * (py - my)).sum())
            vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


# ---------------------------------------------------------------- identical inputs


def test_identical_images_score_perfectly() -> None:
    x = _images()
    assert pixcorr(x, x) == pytest.approx(1.0, abs=1e-12)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    feats = torch.randn(10, 32, generator=torch.Generator().manual_seed(1))
    assert two_way_identification(feats, feats) == 1.0
    assert correlation_distance(feats, feats) == pytest.approx(0.0, abs=1e-12)
    assert retrieval_accuracy(feats, feats) == 1.0


# ---------------------------------------------------------------- pixcorr


def test_pixcorr_invariant_to_offset_and_positive_scale() -> None:
    x = _images() * 0.5
    assert pixcorr(x + 0.3, x) == pytest.approx(1.0, abs=1e-12)
    assert pixcorr(2.0 * x + 0.1, x) == pytest.approx(1.0, abs=1e-12)
    assert pixcorr(1.0 - x, x) == pytest.approx(-1.0, abs=1e-12)


def test_pixcorr_matches_numpy_corrcoef_per_image() -> None:
    a, b = _images(seed=2).numpy(), _images(seed=3).numpy()
    b = 0.6 * a + 0.4 * b  # correlated
    expected = np.mean([np.corrcoef(a[i].ravel(), b[i].ravel())[0, 1] for i in range(len(a))])
    assert pixcorr(a, b) == pytest.approx(expected, abs=1e-12)


def test_pixcorr_constant_image_raises() -> None:
    x = _images(n=2)
    y = x.clone()
    y[1] = 0.5
    with pytest.raises(ValueError, match="zero variance"):
        pixcorr(y, x)


# ---------------------------------------------------------------- ssim


def test_gaussian_kernel_is_11_taps_sigma_1_5() -> None:
    k = gaussian_kernel_1d()
    assert k.numel() == 11
    assert float(k.sum()) == pytest.approx(1.0, abs=1e-15)
    assert float(k[6] / k[5]) == pytest.approx(math.exp(-0.5 / 1.5**2), rel=1e-12)


@pytest.mark.parametrize("luma", [LUMA_BT601, LUMA_BT709])
def test_ssim_matches_brute_force_loop(luma: tuple[float, float, float]) -> None:
    gt = _images(n=2, size=16, seed=4)
    recon = (0.7 * gt + 0.3 * _images(n=2, size=16, seed=5)).clamp(0, 1)
    expected = np.mean([_brute_force_ssim(recon[i].numpy(), gt[i].numpy(), luma) for i in range(2)])
    assert ssim(recon, gt, luma=luma) == pytest.approx(expected, abs=1e-6)


def test_ssim_non_square_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(6)
    gt = torch.rand(1, 3, 13, 17, generator=g)
    recon = torch.rand(1, 3, 13, 17, generator=g)
    expected = _brute_force_ssim(recon[0].numpy(), gt[0].numpy())
    assert ssim(recon, gt) == pytest.approx(expected, abs=1e-6)


def test_gaussian_filter_equals_symmetric_pad_then_filter() -> None:
    from mindhier_rt.metrics import _gaussian_filter

    g = torch.Generator().manual_seed(16)
    x = torch.rand(2, 12, 15, dtype=torch.float64, generator=g)
    k = gaussian_kernel_1d().numpy()
    xp = np.pad(x.numpy(), ((0, 0), (5, 5), (5, 5)), mode="symmetric")  # scipy's mode="reflect"
    expected = np.zeros(x.shape)
    for b in range(2):
        for i in range(12):
            for j in range(15):
                expected[b, i, j] = (np.outer(k, k) * xp[b, i : i + 11, j : j + 11]).sum()
    np.testing.assert_allclose(_gaussian_filter(x, gaussian_kernel_1d()).numpy(), expected, atol=1e-14, rtol=0)


def test_ssim_symmetric_and_lower_for_noisier_images() -> None:
    gt = _images(n=3, size=32, seed=7)
    g = torch.Generator().manual_seed(8)
    noise = torch.randn(gt.shape, generator=g)
    mild = (gt + 0.05 * noise).clamp(0, 1)
    heavy = (gt + 0.3 * noise).clamp(0, 1)
    assert ssim(mild, gt) == pytest.approx(ssim(gt, mild), abs=1e-12)
    assert 1.0 > ssim(mild, gt) > ssim(heavy, gt)


def test_ssim_accepts_numpy_and_float32() -> None:
    gt = _images(n=2, seed=9)
    recon = _images(n=2, seed=10)
    assert ssim(recon.numpy(), gt.numpy()) == pytest.approx(ssim(recon.double(), gt.double()), abs=1e-12)


def test_ssim_too_small_image_raises() -> None:
    x = _images(n=1, size=10)
    with pytest.raises(ValueError, match="at least 11"):
        ssim(x, x)


# ---------------------------------------------------------------- two-way identification


def test_two_way_hand_computed_3x3() -> None:
    # gt: one-hot rows. Pearson of one-hot vectors of length 3: 1 on the diagonal, -0.5 elsewhere.
    gt = np.eye(3)
    pred = np.array(
        [
            [1.0, 0.0, 0.0],  # r with gt rows: (1, -.5, -.5)       -> beats both others: 2/2
            [0.0, 0.0, 1.0],  # r: (-.5, -.5, 1); own = -.5         -> tie with gt_0 fails, loses to gt_2: 0/2
            [0.0, 2.0, 1.0],  # r: (-.866, .866, 0); own = 0        -> beats gt_0, loses to gt_1: 1/2
        ]
    )
    assert two_way_identification(pred, gt) == pytest.approx((1.0 + 0.0 + 0.5) / 3, abs=1e-12)


def test_two_way_matches_mindeye_formulation() -> None:
    g = torch.Generator().manual_seed(11)
    gt = torch.randn(30, 16, generator=g)
    pred = gt + 1.5 * torch.randn(30, 16, generator=g)
    n = len(gt)
    r = np.corrcoef(gt.numpy(), pred.numpy())[:n, n:]
    expected = np.mean(np.sum(r < np.diag(r), 0)) / (n - 1)
    assert two_way_identification(pred, gt) == pytest.approx(expected, abs=1e-12)


def test_two_way_random_features_near_chance() -> None:
    g = torch.Generator().manual_seed(12)
    pred = torch.randn(200, 64, generator=g)
    gt = torch.randn(200, 64, generator=g)
    assert abs(two_way_identification(pred, gt) - 0.5) < 0.05


def test_two_way_shuffled_correlated_features_near_chance() -> None:
    g = torch.Generator().manual_seed(13)
    gt = torch.randn(200, 64, generator=g)
    perm = torch.roll(torch.arange(200), 1)  # a derangement: no image keeps its own features
    pred = gt[perm] + 0.3 * torch.randn(200, 64, generator=g)
    assert two_way_identification(gt + 0.3 * torch.randn(200, 64, generator=g), gt) > 0.99
    assert abs(two_way_identification(pred, gt) - 0.5) < 0.05


def test_two_way_needs_two_items() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        two_way_identification(np.ones((1, 4)), np.ones((1, 4)))


# ---------------------------------------------------------------- correlation distance / retrieval


def test_correlation_distance_values() -> None:
    g = torch.Generator().manual_seed(14)
    a = torch.randn(100, 512, generator=g)
    b = torch.randn(100, 512, generator=g)
    assert correlation_distance(a, a) == pytest.approx(0.0, abs=1e-12)
    assert correlation_distance(a, b) == pytest.approx(1.0, abs=0.02)
    assert correlation_distance(-a, a) == pytest.approx(2.0, abs=1e-12)
    # scipy.spatial.distance.correlation, written out: 1 - centered cosine
    ac, bc = a[0].numpy() - a[0].numpy().mean(), b[0].numpy() - b[0].numpy().mean()
    expected = 1 - ac @ bc / (np.linalg.norm(ac) * np.linalg.norm(bc))
    assert correlation_distance(a[:1], b[:1]) == pytest.approx(expected, abs=1e-6)


def test_retrieval_accuracy() -> None:
    g = torch.Generator().manual_seed(15)
    gt = torch.randn(50, 32, generator=g)
    assert retrieval_accuracy(gt, gt) == 1.0
    assert retrieval_accuracy(3.0 * gt, gt) == 1.0  # cosine ignores scale
    # pred_i points exactly at gt_{i+1}: never a top-1 hit, always a hit when every item counts
    shifted = torch.roll(gt, -1, dims=0)
    assert retrieval_accuracy(shifted, gt) == 0.0
    assert retrieval_accuracy(shifted, gt, top_k=50) == 1.0
    # hand example: pred_0 retrieves gt_0, pred_1 retrieves gt_0 too -> 1/2
    assert retrieval_accuracy(np.array([[1.0, 0.1], [1.0, 0.2]]), np.array([[1.0, 0.15], [0.0, 1.0]])) == 0.5
    with pytest.raises(ValueError, match="top_k"):
        retrieval_accuracy(gt, gt, top_k=0)


# ---------------------------------------------------------------- resize


def test_resize_shape_kind_and_values() -> None:
    x = _images(n=2, size=40)
    out = resize(x, 17)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 17, 17) and out.dtype == x.dtype
    expected = F.interpolate(x, size=(17, 17), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(out, expected)
    out_np = resize(x.numpy(), (20, 30))
    assert isinstance(out_np, np.ndarray) and out_np.shape == (2, 3, 20, 30) and out_np.dtype == np.float32
    const = torch.full((1, 3, 40, 40), 0.25, dtype=torch.float64)
    torch.testing.assert_close(resize(const, 13), torch.full((1, 3, 13, 13), 0.25, dtype=torch.float64))
    with pytest.raises(ValueError):
        resize(x, 0)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("metric", [pixcorr, ssim])
def test_image_shape_errors(metric) -> None:
    x = _images(n=2, size=16)
    with pytest.raises(ValueError, match="same shape"):
        metric(x, _images(n=3, size=16))
    with pytest.raises(ValueError, match="same shape"):
        metric(x, _images(n=2, size=18))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        metric(x[:, :1], x[:, :1])
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        metric(x[0], x[0])
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        metric(bad, x)


@pytest.mark.parametrize("metric", [two_way_identification, correlation_distance, retrieval_accuracy])
def test_feature_shape_errors(metric) -> None:
    a = torch.randn(5, 8)
    with pytest.raises(ValueError, match="same shape"):
        metric(a, torch.randn(5, 9))
    with pytest.raises(ValueError, match="same shape"):
        metric(a, torch.randn(6, 8))
    with pytest.raises(ValueError, match=r"\[N, F\]"):
        metric(torch.randn(8), torch.randn(8))
