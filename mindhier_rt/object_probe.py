"""Was the object seen? Attribute read-out of reconstructions of the synthetic benchmark.

Pixel and feature scores say how close a reconstruction is to its stimulus, not whether the object in it
can be recognised. The synthetic set knows every stimulus' attributes, so a small classifier (the probe)
is trained on freshly rendered ground-truth stimuli, never on reconstructions nor on the test images, and
then asked what it sees in each reconstruction:

* ``category``: the object's shape (:data:`~mindhier_rt.data.synthetic.CATEGORIES`, 6 classes);
* ``colour``: the object's colour (:data:`~mindhier_rt.data.synthetic.PALETTE`, 8 classes);
* ``position``: which cell of a 3 x 3 grid over the centre's sampling range holds the centre (9 classes);
* ``size``: which third of the radius' sampling range the radius falls in (3 classes).

Every attribute is drawn uniformly, so chance is 1 / classes. The probe's accuracy on the ground-truth
test stimuli themselves is reported next to it: the ceiling a perfect reconstruction would reach.
The probe trains on stimuli blurred by a random amount (none up to a few pixels), so that it reads the
object's shape, colour, place and size rather than the sharpness of its edges.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mindhier_rt.data.synthetic import (
    CATEGORIES,
    CENTRE_RANGE,
    PALETTE,
    RADIUS_RANGE,
    StimulusAttributes,
    render,
    sample_attributes,
)

__all__ = ["ATTRIBUTE_CLASSES", "AttributeProbe", "ProbeSettings", "attribute_labels", "object_scores", "train_probe"]

POSITION_BINS = 3
SIZE_BINS = 3
ATTRIBUTE_CLASSES: dict[str, int] = {
    "category": len(CATEGORIES),
    "colour": len(PALETTE),
    "position": POSITION_BINS * POSITION_BINS,
    "size": SIZE_BINS,
}
PROBE_SEED_OFFSET = 7_919  # the probe's stimuli come from a stream no data set of the same seed uses
MAX_BLUR_SIGMA = 1.5  # of the augmentation, in pixels at 32 px (scaled with the image size)


def _bin(values: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    return np.clip(((values - lo) / (hi - lo) * bins).astype(np.int64), 0, bins - 1)


def attribute_labels(attrs: StimulusAttributes) -> dict[str, np.ndarray]:
    """Class ids int64 [N] of every attribute in :data:`ATTRIBUTE_CLASSES`."""
    col = _bin(attrs.cx, *CENTRE_RANGE, POSITION_BINS)
    row = _bin(attrs.cy, *CENTRE_RANGE, POSITION_BINS)
    return {
        "category": attrs.category.copy(),
        "colour": attrs.colour.copy(),
        "position": row * POSITION_BINS + col,
        "size": _bin(attrs.radius, *RADIUS_RANGE, SIZE_BINS),
    }


class AttributeProbe(nn.Module):
    """A small CNN with one linear head per attribute; images [B, 3, S, S] in [0, 1]."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        # position needs where the object is: the trunk keeps a 4 x 4 map and the heads read all of it
        self.trunk = nn.Sequential(
            block(3, width), nn.MaxPool2d(2), block(width, 2 * width), nn.MaxPool2d(2),
            block(2 * width, 2 * width), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )  # fmt: skip
        self.heads = nn.ModuleDict({name: nn.Linear(2 * width * 16, k) for name, k in ATTRIBUTE_CLASSES.items()})

    def forward(self, images_B3HW: Tensor) -> dict[str, Tensor]:
        h = self.trunk(images_B3HW * 2 - 1)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images_B3HW: Tensor, batch: int = 256) -> dict[str, Tensor]:
        """Class ids [B] of every attribute."""
        was_training = self.training
        self.eval()
        parts = [self(images_B3HW[i : i + batch].float()) for i in range(0, len(images_B3HW), batch)]
        self.train(was_training)
        return {name: torch.cat([p[name] for p in parts]).argmax(-1) for name in ATTRIBUTE_CLASSES}


def _blur(images_B3HW: Tensor, sigma_B: Tensor) -> Tensor:
    """Gaussian blur with a per-image sigma (pixels; 0 leaves an image as it is), reflect padding."""
    radius = max(1, int(3 * float(sigma_B.max()) + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=images_B3HW.dtype)
    k_BK = torch.exp(-(x[None] ** 2) / (2 * sigma_B[:, None].clamp_min(1e-3) ** 2))
    k_BK = k_BK / k_BK.sum(-1, keepdim=True)
    B, C, H, W = images_B3HW.shape
    pad = F.pad(images_B3HW, (radius,) * 4, mode="reflect").reshape(1, B * C, H + 2 * radius, W + 2 * radius)
    k = k_BK.repeat_interleave(C, 0)  # [B*C, K]
    pad = F.conv2d(pad, k[:, None, None, :], groups=B * C)
    return F.conv2d(pad, k[:, None, :, None], groups=B * C).reshape(B, C, H, W)


@dataclass(frozen=True)
class ProbeSettings:
    n_images: int = 3000
    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    width: int = 32


def train_probe(size: int, seed: int = 0, settings: ProbeSettings | None = None) -> AttributeProbe:
    """Train the probe on ``settings.n_images`` stimuli of side ``size`` rendered from the probe's own stream
    (seed ``seed + PROBE_SEED_OFFSET``), each batch blurred by a random sigma in [0, MAX_BLUR_SIGMA * size / 32]."""
    p = settings or ProbeSettings()
    attrs = sample_attributes(p.n_images, seed + PROBE_SEED_OFFSET)
    images = torch.from_numpy(render(attrs, size))
    labels = {name: torch.from_numpy(v) for name, v in attribute_labels(attrs).items()}
    rng = np.random.default_rng(seed + PROBE_SEED_OFFSET)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + PROBE_SEED_OFFSET)
        probe = AttributeProbe(p.width)
    opt = torch.optim.AdamW(probe.parameters(), lr=p.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.lr, total_steps=p.steps, pct_start=0.1)
    probe.train()
    max_sigma = MAX_BLUR_SIGMA * size / 32
    for _ in range(p.steps):
        b = torch.from_numpy(rng.choice(p.n_images, size=p.batch_size, replace=False))
        sigma = torch.from_numpy(rng.uniform(0.0, max_sigma, p.batch_size).astype(np.float32))
        logits = probe(_blur(images[b], sigma))
        loss = functools.reduce(
            operator.add, [F.cross_entropy(logits[name], labels[name][b]) for name in ATTRIBUTE_CLASSES]
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return probe.eval()


def object_scores(probe: AttributeProbe, recon_N3HW: Tensor, gt_N3HW: Tensor, attrs: StimulusAttributes) -> dict:
    """Per attribute: the fraction of reconstructions whose probe read-out is the stimulus' true class
    (``recon``), the same for the ground-truth images (``ground_truth``, the ceiling) and ``chance``."""
    if len(recon_N3HW) != len(attrs) or len(gt_N3HW) != len(attrs):
        raise ValueError(
            f"expected one attribute row per image, found {len(recon_N3HW)} reconstructions, "
            f"{len(gt_N3HW)} stimuli and {len(attrs)} attribute rows"
        )
    truth = attribute_labels(attrs)
    seen, shown = probe.predict(recon_N3HW), probe.predict(gt_N3HW)
    return {
        name: {
            "recon": round(float((seen[name].numpy() == truth[name]).mean()), 4),
            "ground_truth": round(float((shown[name].numpy() == truth[name]).mean()), 4),
            "chance": round(1.0 / k, 4),
        }
        for name, k in ATTRIBUTE_CLASSES.items()
    }
