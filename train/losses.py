"""Training losses of the two MindHier stages (REFERENCE §2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def l2_flat(x_B: Tensor) -> Tensor:
    """Flatten all but the batch axis and L2-normalise each row."""
    return F.normalize(x_B.flatten(1).float(), dim=-1)


def hierarchical_mse(levels_BMTD: Tensor, targets_BMTD: Tensor, level_weights: Tensor | None = None) -> Tensor:
    """sum_m || l2(e_m) - l2(v_{g_m}) ||^2, averaged over the batch.

    The reference weighs the element-wise mean by 2e5; over 257 x 768 features that is ~1.01 x this
    sum of squares, so the sum form keeps the same strength at any feature size. ``level_weights``
    (length M) switches levels off for ablations (e.g. terminal-only supervision).
    """
    M = levels_BMTD.shape[1]
    per_level = torch.stack(
        [(l2_flat(levels_BMTD[:, m]) - l2_flat(targets_BMTD[:, m])).pow(2).sum(-1).mean() for m in range(M)]
    )
    if level_weights is not None:
        per_level = per_level * level_weights.to(per_level)
    return per_level.sum()


def soft_clip_loss(preds_B: Tensor, targets_B: Tensor, tau: float = 0.005) -> Tensor:
    """SoftCLIP: contrastive loss whose targets are the softmax of the targets' own similarities.

    p, t = l2(preds), l2(targets)  (flattened)
    Q = softmax(t t^T / tau)   (row-wise soft targets)
    L = 0.5 * [ CE(Q, log_softmax(p t^T / tau)) + CE(Q, log_softmax(t p^T / tau)) ]
    with CE(q, log r) = -mean_i sum_j q_ij log r_ij.
    """
    p, t = l2_flat(preds_B), l2_flat(targets_B)
    soft_targets = torch.softmax(t @ t.T / tau, dim=-1)
    loss_p = -(soft_targets * torch.log_softmax(p @ t.T / tau, dim=-1)).sum(-1).mean()
    loss_t = -(soft_targets * torch.log_softmax(t @ p.T / tau, dim=-1)).sum(-1).mean()
    return 0.5 * (loss_p + loss_t)


def token_cross_entropy(logits_BLV: Tensor, idx_BL: Tensor) -> Tensor:
    """Mean next-scale cross-entropy over every token of the pyramid."""
    return F.cross_entropy(logits_BLV.flatten(0, 1).float(), idx_BL.flatten())
