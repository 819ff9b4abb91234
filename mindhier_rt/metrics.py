"""Image-reconstruction metrics of the NSD evaluation protocol (as used by MindEye and its successors).

Low-level metrics work on images; high-level metrics work on features that the caller extracts with
the protocol's networks (AlexNet layers 2 and 5, Inception-v3, CLIP ViT-L/14, EfficientNet-B1, SwAV),
which this module does not depend on.

* :func:`pixcorr`: per image Pearson r between the flattened RGB pixel vectors, mean over images.
* :func:`ssim`: per image SSIM on grayscale, mean over images. Conventions follow
  ``skimage.metrics.structural_similarity(gray_gt, gray_recon, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1.0)`` exactly:

  - gaussian window, sigma 1.5, truncated at 3.5 sigma (radius ``int(3.5 * 1.5 + 0.5) = 5``, so an
    11 x 11 window), built as the outer product of the normalised 1-D kernel (what scipy's separable
    ``gaussian_filter`` applies);
  - local moments are the gaussian-weighted mean, variance and covariance, *without* the
    ``N / (N - 1)`` sample-covariance correction (``use_sample_covariance=False``);
  - ``K1 = 0.01``, ``K2 = 0.03``, data range 1.0, so ``C1 = 1e-4`` and ``C2 = 9e-4``;
  - the SSIM map is computed on the full image with symmetric ("reflect" in scipy's naming,
    ``d c b a | a b c d``) padding and then cropped by ``(win_size - 1) // 2 = 5`` pixels on every
    border before averaging. Because the crop equals the filter radius, the cropped map never touches
    the padding: the result is the same as a "valid" (unpadded) evaluation.

  Grayscale uses ITU-R BT.601 luma (``0.299 R + 0.587 G + 0.114 B``) by default. Note that
  ``skimage.color.rgb2gray``, which the MindEye evaluation scripts call, uses the BT.709 coefficients
  (``0.2125 R + 0.7154 G + 0.0721 B``); pass ``luma=LUMA_BT709`` to reproduce those numbers.
* :func:`two_way_identification`: the MindEye / NSD two-way comparison on feature vectors.
* :func:`correlation_distance`: mean ``1 - r`` (scipy's ``distance.correlation``) for EffNet / SwAV.
* :func:`retrieval_accuracy`: top-k cosine-similarity retrieval of ground truth from predictions.
* :func:`resize`: bilinear, antialiased resize; the protocol evaluates at fixed sizes (e.g. 425 px
  for PixCorr / SSIM).

Images are float tensors or arrays ``[N, 3, H, W]`` with values in ``[0, 1]``; reconstructions and
ground truth must have the same shape. All statistics are computed in float64. Every metric raises
:class:`ValueError` for bad shapes, non-finite values, or a Pearson correlation that is undefined
because a vector has zero variance (a constant image or feature vector).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "LUMA_BT601",
    "LUMA_BT709",
    "SSIM_C1",
    "SSIM_C2",
    "SSIM_DATA_RANGE",
    "SSIM_K1",
    "SSIM_K2",
    "SSIM_SIGMA",
    "SSIM_TRUNCATE",
    "correlation_distance",
    "gaussian_kernel_1d",
    "pixcorr",
    "resize",
    "retrieval_accuracy",
    "ssim",
    "two_way_identification",
]

ArrayLike = torch.Tensor | np.ndarray

LUMA_BT601: tuple[float, float, float] = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights for R, G, B (the default grayscale conversion)."""
LUMA_BT709: tuple[float, float, float] = (0.2125, 0.7154, 0.0721)
"""The weights of ``skimage.color.rgb2gray`` (BT.709 primaries), used by the MindEye scripts."""

SSIM_SIGMA = 1.5
"""Standard deviation of the gaussian SSIM window, in pixels."""
SSIM_TRUNCATE = 3.5
"""The gaussian is cut off at this many sigmas (skimage's default ``truncate``)."""
SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_DATA_RANGE = 1.0
SSIM_C1 = (SSIM_K1 * SSIM_DATA_RANGE) ** 2
SSIM_C2 = (SSIM_K2 * SSIM_DATA_RANGE) ** 2

_CHUNK = 32  # images per float64 working batch, bounds memory for 982 x 3 x 425 x 425 inputs


# --------------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------------


def _to_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    """View a tensor or array as a CPU torch tensor (no dtype change yet)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise ValueError(f"{name}: expected a torch.Tensor or numpy.ndarray, found {type(x).__name__}")


def _check_images(recon: ArrayLike, gt: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a pair of image batches ``[N, 3, H, W]`` of equal shape and return them as tensors."""
    r = _to_tensor(recon, "recon")
    g = _to_tensor(gt, "gt")
    for name, t in (("recon", r), ("gt", g)):
        if t.ndim != 4 or t.shape[1] != 3:
            raise ValueError(f"{name}: expected images of shape [N, 3, H, W], found {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point dtype, found {t.dtype}")
    if r.shape != g.shape:
        raise ValueError(f"recon and gt must have the same shape, found {tuple(r.shape)} and {tuple(g.shape)}")
    if r.shape[0] == 0:
        raise ValueError("expected at least one image, found N = 0")
    return r, g


def _chunks(r: torch.Tensor, g: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(start, recon_chunk, gt_chunk)`` as float64, checking that every value is finite."""
    for start in range(0, r.shape[0], _CHUNK):
        rc = r[start : start + _CHUNK].to(torch.float64)
        gc = g[start : start + _CHUNK].to(torch.float64)
        for name, t in (("recon", rc), ("gt", gc)):
            if not torch.isfinite(t).all():
                raise ValueError(f"{name}: found NaN or inf values in images {start}..{start + t.shape[0] - 1}")
        yield start, rc, gc


def _check_features(pred: ArrayLike, gt: ArrayLike, min_n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate two feature batches ``[N, F]`` (trailing dims are flattened) and return float64 tensors."""
    p = _to_tensor(pred, "pred_feats")
    g = _to_tensor(gt, "gt_feats")
    for name, t in (("pred_feats", p), ("gt_feats", g)):
        if t.ndim < 2:
            raise ValueError(f"{name}: expected features of shape [N, F], found {tuple(t.shape)}")
    if p.shape != g.shape:
        raise ValueError(
            f"pred_feats and gt_feats must have the same shape, found {tuple(p.shape)} and {tuple(g.shape)}"
        )
    n = p.shape[0]
    if n < min_n:
        raise ValueError(f"expected at least {min_n} feature vectors, found N = {n}")
    p = p.reshape(n, -1).to(torch.float64)
    g = g.reshape(n, -1).to(torch.float64)
    if p.shape[1] < 2:
        raise ValueError(f"expected feature vectors of length >= 2, found F = {p.shape[1]}")
    for name, t in (("pred_feats", p), ("gt_feats", g)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name}: found NaN or inf values")
    return p, g


def _standardize_rows(x: torch.Tensor, name: str, offset: int = 0) -> torch.Tensor:
    """Center each row and scale it to unit L2 norm, so that a dot product of two rows is Pearson r."""
    xc = x - x.mean(dim=1, keepdim=True)
    norm = torch.linalg.vector_norm(xc, dim=1, keepdim=True)
    # a row whose values are all equal (up to rounding of the mean) has no defined correlation
    scale = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    bad = (norm <= 1e-12 * scale).flatten()
    if bad.any():
        idx = int(torch.nonzero(bad)[0]) + offset
        raise ValueError(f"{name}[{idx}] has zero variance, so its Pearson correlation is undefined")
    return xc / norm


# --------------------------------------------------------------------------------------------------
# low-level image metrics
# --------------------------------------------------------------------------------------------------


def pixcorr(recon: ArrayLike, gt: ArrayLike) -> float:
    """Mean over images of the Pearson correlation between the flattened RGB pixel vectors.

    Args:
        recon: reconstructions ``[N, 3, H, W]`` in ``[0, 1]``.
        gt: ground-truth images of the same shape.

    Returns:
        The average per-image Pearson r (1.0 for images equal up to a positive affine map).

    Raises:
        ValueError: on shape mismatch, non-finite values, or a constant image.
    """
    r, g = _check_images(recon, gt)
    total = 0.0
    for start, rc, gc in _chunks(r, g):
        rs = _standardize_rows(rc.reshape(rc.shape[0], -1), "recon", start)
        gs = _standardize_rows(gc.reshape(gc.shape[0], -1), "gt", start)
        total += float((rs * gs).sum())
    return total / r.shape[0]


def gaussian_kernel_1d(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> torch.Tensor:
    """The normalised 1-D gaussian of ``scipy.ndimage.gaussian_filter`` (float64).

    The radius is ``int(truncate * sigma + 0.5)``; for the SSIM defaults that is 5 (11 taps).
    """
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _symmetric_index(n: int, pad: int) -> torch.Tensor:
    """Source index of each position of a length-``n`` axis padded by ``pad`` with ``d c b a | a b c d``.

    This is scipy's ``mode="reflect"`` (numpy's ``mode="symmetric"``), the padding skimage's SSIM uses.
    """
    i = torch.remainder(torch.arange(-pad, n + pad), 2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def _filter_matrix(n: int, kernel: torch.Tensor) -> torch.Tensor:
    """``[n, n]`` matrix of 1-D correlation with ``kernel`` on a symmetric-padded axis of length ``n``.

    Row ``i`` holds the kernel taps of output ``i``, with the taps that fall in the padding folded back
    onto the input samples they copy, so ``M @ v`` equals padding then filtering exactly.
    """
    radius = (kernel.numel() - 1) // 2
    src = _symmetric_index(n, radius).unfold(0, kernel.numel(), 1)  # [n, taps]
    rows = torch.arange(n).unsqueeze(1).expand_as(src)
    m = torch.zeros(n, n, dtype=torch.float64)
    m.index_put_((rows, src), kernel.to(torch.float64).expand(n, -1).clone(), accumulate=True)
    return m


def _gaussian_filter(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable filter of ``[..., H, W]`` float64 with symmetric padding; output has the input's size.

    Computed as ``M_h @ x @ M_w^T`` with the padding folded into the band matrices (a few times faster
    than a float64 ``conv2d`` on CPU, and the same linear operator).
    """
    h, w = x.shape[-2:]
    return _filter_matrix(h, kernel) @ x @ _filter_matrix(w, kernel).T


def _to_gray(x: torch.Tensor, luma: Sequence[float]) -> torch.Tensor:
    """``[B, 3, H, W]`` float64 -> ``[B, 1, H, W]`` luma."""
    w = torch.as_tensor(tuple(luma), dtype=torch.float64).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _ssim_per_image(
    recon_gray: torch.Tensor, gt_gray: torch.Tensor, sigma: float, truncate: float, data_range: float
) -> torch.Tensor:
    """Mean SSIM of each ``[B, 1, H, W]`` float64 grayscale pair, skimage conventions (see module doc)."""
    kernel = gaussian_kernel_1d(sigma, truncate)
    win_size = kernel.numel()
    h, w = recon_gray.shape[-2:]
    if h < win_size or w < win_size:
        raise ValueError(f"SSIM needs images of at least {win_size} x {win_size} pixels, found {h} x {w}")
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    x, y = recon_gray, gt_gray
    # one filtering pass over the five moment images
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    m = _gaussian_filter(stack, kernel)
    ux, uy, uxx, uyy, uxy = m.unbind(dim=1)
    # use_sample_covariance=False: plain weighted (co)variances, no N / (N - 1) factor
    vx = uxx - ux * ux
    vy = uyy - uy * uy
    vxy = uxy - ux * uy
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    pad = (win_size - 1) // 2
    return s[:, pad : h - pad, pad : w - pad].mean(dim=(1, 2))


def ssim(
    recon: ArrayLike,
    gt: ArrayLike,
    *,
    luma: Sequence[float] = LUMA_BT601,
    sigma: float = SSIM_SIGMA,
    truncate: float = SSIM_TRUNCATE,
    data_range: float = SSIM_DATA_RANGE,
) -> float:
    """Mean over images of the grayscale SSIM, with skimage's gaussian-window conventions.

    Equivalent to ``skimage.metrics.structural_similarity(gray(gt), gray(recon), gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1.0)`` per image (SSIM is symmetric): an 11 x 11
    gaussian window (sigma 1.5, truncated at 3.5 sigma), weighted moments without the sample-covariance
    correction, K1 = 0.01, K2 = 0.03, the map computed on the symmetric-padded full image and cropped by
    5 pixels on each border before the mean.

    Args:
        recon: reconstructions ``[N, 3, H, W]`` in ``[0, 1]``, with ``H, W >= 11``.
        gt: ground-truth images of the same shape.
        luma: RGB weights of the grayscale conversion (default BT.601; ``LUMA_BT709`` matches
            ``skimage.color.rgb2gray``).
        sigma: gaussian window standard deviation.
        truncate: window cut-off in sigmas.
        data_range: dynamic range of the pixel values.

    Returns:
        The average per-image mean SSIM (1.0 for identical images).

    Raises:
        ValueError: on shape mismatch, non-finite values, or images smaller than the window.
    """
    if len(tuple(luma)) != 3:
        raise ValueError(f"luma: expected 3 weights for R, G, B, found {len(tuple(luma))}")
    r, g = _check_images(recon, gt)
    total = 0.0
    for _, rc, gc in _chunks(r, g):
        total += float(_ssim_per_image(_to_gray(rc, luma), _to_gray(gc, luma), sigma, truncate, data_range).sum())
    return total / r.shape[0]


def resize(images: ArrayLike, size: int | tuple[int, int]) -> ArrayLike:
    """Bilinear, antialiased resize of ``[N, C, H, W]`` images (``align_corners=False``).

    Antialiasing matters when downsampling (e.g. 512 -> 425 for PixCorr / SSIM): it matches PIL's and
    torchvision's ``antialias=True`` bilinear resize rather than sampling 4 neighbours.

    Args:
        images: a float tensor or array ``[N, C, H, W]``.
        size: the output side (square) or ``(height, width)``.

    Returns:
        The resized images, of the same kind (tensor or array) and dtype as the input.
    """
    is_numpy = isinstance(images, np.ndarray)
    x = _to_tensor(images, "images")
    if x.ndim != 4:
        raise ValueError(f"images: expected shape [N, C, H, W], found {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"images: expected a floating-point dtype, found {x.dtype}")
    out_hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(out_hw) != 2 or any(int(s) <= 0 for s in out_hw):
        raise ValueError(f"size: expected a positive int or (height, width), found {size!r}")
    out_hw = (int(out_hw[0]), int(out_hw[1]))
    dtype = x.dtype
    work = x if dtype in (torch.float32, torch.float64) else x.float()
    out = F.interpolate(work, size=out_hw, mode="bilinear", align_corners=False, antialias=True).to(dtype)
    return out.numpy() if is_numpy else out


# --------------------------------------------------------------------------------------------------
# feature-space metrics
# --------------------------------------------------------------------------------------------------


def _correlation_matrix(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """``r[i, j] = Pearson(pred_i, gt_j)`` for float64 ``[N, F]`` inputs."""
    return _standardize_rows(pred, "pred_feats") @ _standardize_rows(gt, "gt_feats").T


def two_way_identification(pred_feats: ArrayLike, gt_feats: ArrayLike) -> float:
    """The MindEye / NSD two-way identification accuracy.

    For each reconstruction ``i``, the fraction of the other images ``j != i`` for which
    ``corr(pred_i, gt_i) > corr(pred_i, gt_j)`` (strictly: ties count as failures), averaged over
    ``i``. This equals MindEye's ``np.mean(np.sum(r < np.diag(r), 0)) / (N - 1)`` with
    ``r = corrcoef(gt, pred)[:N, N:]``. Chance is 0.5, perfect is 1.0.

    Args:
        pred_feats: features of the reconstructions ``[N, F]`` (trailing dims are flattened).
        gt_feats: features of the ground-truth images, same shape.

    Raises:
        ValueError: on shape mismatch, ``N < 2``, non-finite values, or a zero-variance feature vector.
    """
    p, g = _check_features(pred_feats, gt_feats, min_n=2)
    n = p.shape[0]
    r = _correlation_matrix(p, g)
    congruent = torch.diagonal(r).unsqueeze(1)  # corr(pred_i, gt_i), compared along row i
    wins = (congruent > r).sum(dim=1)  # the diagonal never beats itself
    return float(wins.to(torch.float64).mean()) / (n - 1)


def correlation_distance(pred_feats: ArrayLike, gt_feats: ArrayLike) -> float:
    """Mean over ``i`` of ``1 - Pearson(pred_i, gt_i)`` (scipy's ``distance.correlation``; lower is better).

    Used for the EfficientNet-B1 and SwAV rows of the protocol. 0 for identical features, about 1 for
    independent ones, 2 for perfectly anti-correlated ones.

    Raises:
        ValueError: on shape mismatch, non-finite values, or a zero-variance feature vector.
    """
    p, g = _check_features(pred_feats, gt_feats)
    r = (_standardize_rows(p, "pred_feats") * _standardize_rows(g, "gt_feats")).sum(dim=1)
    return float((1.0 - r).mean())


def retrieval_accuracy(pred: ArrayLike, gt: ArrayLike, top_k: int = 1) -> float:
    """Top-k accuracy of retrieving ``gt_i`` from all ground truth by cosine similarity to ``pred_i``.

    With ``top_k = 1`` (the default) this is the protocol's top-1 retrieval: ``argmax_j cos(pred_i, gt_j)
    == i``. A tie is broken in favour of the lower index, as ``argmax`` does.

    Args:
        pred: predicted embeddings ``[N, F]`` (trailing dims are flattened).
        gt: ground-truth embeddings, same shape.
        top_k: how many retrieved candidates count as a hit.

    Raises:
        ValueError: on shape mismatch, non-finite values, a zero vector, or ``top_k`` outside ``1..N``.
    """
    p, g = _check_features(pred, gt)
    n = p.shape[0]
    if not 1 <= top_k <= n:
        raise ValueError(f"top_k: expected 1..{n}, found {top_k}")
    for name, t in (("pred", p), ("gt", g)):
        zero = torch.linalg.vector_norm(t, dim=1) == 0
        if zero.any():
            raise ValueError(
                f"{name}[{int(torch.nonzero(zero)[0])}] is a zero vector, so cosine similarity is undefined"
            )
    sim = F.normalize(p, dim=1) @ F.normalize(g, dim=1).T
    target = torch.arange(n)
    if top_k == 1:
        hits = sim.argmax(dim=1) == target
    else:
        # rank of the true item: how many candidates beat it, ties resolved toward lower indices
        true_sim = sim[target, target].unsqueeze(1)
        idx = target.unsqueeze(0)
        better = (sim > true_sim) | ((sim == true_sim) & (idx < target.unsqueeze(1)))
        hits = better.sum(dim=1) < top_k
    return float(hits.to(torch.float64).mean())
