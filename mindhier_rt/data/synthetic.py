r"""A seeded synthetic benchmark: stimulus images with multi-scale structure and simulated fMRI subjects.

No real brain data can be downloaded everywhere this project runs, so the demo trains on this benchmark.
Everything is drawn from NumPy generators seeded by the caller: the same arguments give the same bytes.

Stimuli
-------
Each image (float32 ``[3, S, S]`` in ``[0, 1]``, any ``S >= 16``) is described by attributes at several
scales:

* global layout: the background is a linear gradient between two colours of :data:`BG_PALETTE` in one of
  four directions (layout id 0 horizontal, 1 vertical, 2 diagonal, 3 anti-diagonal);
* object category: one of :data:`CATEGORIES` (disk, square, triangle, cross, ring, horizontal bar);
* object colour: one of the eight :data:`PALETTE` colours; centre ``(cx, cy)`` uniform in ``[0.3, 0.7]``
  and radius ``r`` uniform in ``[0.18, 0.32]`` (fractions of the image side);
* local texture on the object: flat, stripes or checker (:data:`TEXTURES`) with a phase uniform in
  ``[0, 1)`` of the pattern's period; the dark half of a pattern is the object colour times 0.3.

Simulated subjects (the forward model)
--------------------------------------
A subject with ``V`` voxels has ``V_e = round(f_e V)`` early-visual voxels (``f_e`` = ``early_fraction``,
default 0.6) followed by ``V_h = V - V_e`` higher-visual voxels. All its parameters come from its own
random stream, derived from ``(seed, crc32(name))``.

Low-level feature maps are computed from the image at full resolution and area-pooled to a
``G x G = 16 x 16`` grid: ``m_1, m_2, m_3`` = R, G, B; ``m_4`` = luminance
``L = 0.299 R + 0.587 G + 0.114 B``; ``m_5`` = edge energy ``|grad L|`` (central differences).
Early voxel ``j`` has one feature map ``k_j`` (uniform among the five), a receptive-field centre
``(x_j, y_j)`` uniform in the image and a width ``sigma_j`` uniform in ``[0.05, 0.2]`` of the image side:

.. math::

    e_j(g) = \exp\!\left(-\frac{\|p_g - (x_j, y_j)\|^2}{2\sigma_j^2}\right),
    \qquad w_j(g) = \frac{e_j(g)}{\sum_{g'} e_j(g')},
    \qquad s_j(\text{img}) = \sum_g w_j(g)\, m_{k_j}(\text{img})(g)

where ``p_g`` is the centre of grid cell ``g``. Higher voxel ``j`` is a random linear read-out of the
semantic features ``a`` (:meth:`StimulusAttributes.as_features`: one-hot category, colour, layout and
texture, then ``cx``, ``cy``, ``r`` scaled to ``[-1, 1]``; 24 values) plus a small category x colour
interaction:

.. math::

    s_j = \sum_f B_{fj}\, a_f + C_{c\,o\,j}, \qquad B_{fj} \sim N(0, 1),\quad C_{c o j} \sim N(0, 0.5^2)

with ``c`` the category and ``o`` the colour id. Each voxel's raw signal is standardised with constants
``mu_j, sd_j`` computed once (per image size) from a fixed reference batch of
:data:`REFERENCE_IMAGES` stimuli (seed :data:`REFERENCE_SEED`), so the noise-free signal has about unit
variance per voxel; a measured trial adds Gaussian noise with the subject's ``noise_sd``:

.. math::

    \hat s_j = (s_j - \mu_j) / sd_j, \qquad v_j = \hat s_j + \varepsilon_j,
    \quad \varepsilon_j \sim N(0, \text{noise\_sd}^2)

Default ``noise_sd`` is 1.0 for subj01 and 1.2 for subj02 (single-trial SNR about 1), 1.0 otherwise.

The data set (:func:`make_synthetic`) shows every train image once and every test image ``repeats`` times
(independent noise) to each subject, shuffles the trials and z-scores every voxel with the mean and
standard deviation of that subject's train trials, as NSD betas are z-scored per session.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any

import numpy as np

from mindhier_rt.errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "BG_PALETTE",
    "CATEGORIES",
    "DEFAULT_NOISE_SD",
    "EARLY_FEATURES",
    "FEATURE_NAMES",
    "LAYOUTS",
    "PALETTE",
    "TEXTURES",
    "StimulusAttributes",
    "SubjectModel",
    "SyntheticSet",
    "make_synthetic",
    "render",
    "sample_attributes",
]

# --------------------------------------------------------------------------------------------------
# vocabulary

CATEGORIES: tuple[str, ...] = ("disk", "square", "triangle", "cross", "ring", "bar")
TEXTURES: tuple[str, ...] = ("flat", "stripes", "checker")
TEXTURE_WORDS: tuple[str, ...] = ("solid", "striped", "checkered")
LAYOUTS: tuple[str, ...] = ("horizontal", "vertical", "diagonal", "anti-diagonal")

# Object colours: saturated, so they stand out against the muted backgrounds.
PALETTE: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("red", (0.90, 0.10, 0.10)),
    ("green", (0.10, 0.80, 0.15)),
    ("blue", (0.10, 0.25, 0.95)),
    ("yellow", (0.95, 0.90, 0.10)),
    ("cyan", (0.10, 0.90, 0.90)),
    ("magenta", (0.90, 0.15, 0.90)),
    ("orange", (1.00, 0.55, 0.00)),
    ("white", (1.00, 1.00, 1.00)),
)
# Background colours: muted or dark.
BG_PALETTE: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("black", (0.05, 0.05, 0.05)),
    ("grey", (0.50, 0.50, 0.50)),
    ("navy", (0.08, 0.10, 0.40)),
    ("dark green", (0.10, 0.35, 0.15)),
    ("maroon", (0.40, 0.08, 0.10)),
    ("sand", (0.80, 0.74, 0.58)),
)

_PALETTE_RGB = np.array([rgb for _, rgb in PALETTE], dtype=np.float32)
_BG_RGB = np.array([rgb for _, rgb in BG_PALETTE], dtype=np.float32)

CENTRE_RANGE = (0.3, 0.7)
RADIUS_RANGE = (0.18, 0.32)
STRIPE_PERIOD = 1.0 / 6.0  # of the image side
CHECKER_PERIOD = 1.0 / 4.0  # two cells of 1/8 image side
DARK_SHADE = 0.3
MIN_SIZE = 16

FEATURE_NAMES: tuple[str, ...] = (
    *(f"category={c}" for c in CATEGORIES),
    *(f"colour={name}" for name, _ in PALETTE),
    *(f"layout={name}" for name in LAYOUTS),
    *(f"texture={t}" for t in TEXTURES),
    "cx",
    "cy",
    "radius",
)

# Forward model constants
EARLY_FEATURES: tuple[str, ...] = ("red", "green", "blue", "luminance", "edge")
FEATURE_GRID = 16
RF_SIGMA_RANGE = (0.05, 0.2)
INTERACTION_SD = 0.5
REFERENCE_IMAGES = 1000
REFERENCE_SEED = 20_240_531
DEFAULT_NOISE_SD: dict[str, float] = {"subj01": 1.0, "subj02": 1.2}
DEFAULT_EARLY_FRACTION = 0.6


def _stream(seed: int, *key: int) -> np.random.Generator:
    """An independent generator for ``(seed, *key)``: stable across processes (no Python ``hash``)."""
    return np.random.default_rng(np.random.SeedSequence(entropy=int(seed), spawn_key=tuple(int(k) for k in key)))


def _name_key(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


# --------------------------------------------------------------------------------------------------
# attributes


@dataclass(frozen=True)
class StimulusAttributes:
    """Per-image attributes (all arrays of length N).

    ``layout`` gradient direction id (see :data:`LAYOUTS`); ``bg_start`` / ``bg_end`` the gradient's
    colour ids in :data:`BG_PALETTE`; ``category`` id in :data:`CATEGORIES`; ``colour`` id in
    :data:`PALETTE`; ``cx``, ``cy``, ``radius`` as fractions of the image side; ``texture`` id in
    :data:`TEXTURES`; ``phase`` in ``[0, 1)`` of the texture period.
    """

    layout: np.ndarray
    bg_start: np.ndarray
    bg_end: np.ndarray
    category: np.ndarray
    colour: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    radius: np.ndarray
    texture: np.ndarray
    phase: np.ndarray

    _INT_FIELDS = ("layout", "bg_start", "bg_end", "category", "colour", "texture")

    def __post_init__(self) -> None:
        n = None
        for f in fields(self):
            dtype = np.int64 if f.name in self._INT_FIELDS else np.float64
            arr = np.asarray(getattr(self, f.name))
            if arr.ndim != 1:
                raise InputError(f"expected attribute {f.name!r} to be 1-D, found shape {tuple(arr.shape)}")
            if n is None:
                n = arr.shape[0]
            elif arr.shape[0] != n:
                raise InputError(f"expected all attributes to have length {n}, found {f.name!r} of length {len(arr)}")
            object.__setattr__(self, f.name, np.ascontiguousarray(arr, dtype=dtype))
        limits = {
            "layout": len(LAYOUTS),
            "bg_start": len(BG_PALETTE),
            "bg_end": len(BG_PALETTE),
            "category": len(CATEGORIES),
            "colour": len(PALETTE),
            "texture": len(TEXTURES),
        }
        for name, hi in limits.items():
            arr = getattr(self, name)
            if arr.size and (arr.min() < 0 or arr.max() >= hi):
                raise InputError(
                    f"expected attribute {name!r} ids in [0, {hi}), found values in [{arr.min()}, {arr.max()}]"
                )

    def __len__(self) -> int:
        return int(self.layout.shape[0])

    def subset(self, index: np.ndarray | Sequence[int]) -> StimulusAttributes:
        """The attributes of images ``index`` (any integer index array, repeats allowed)."""
        idx = np.asarray(index, dtype=np.int64)
        return StimulusAttributes(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Field name -> array, e.g. for ``np.savez``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_arrays(cls, arrays: Any) -> StimulusAttributes:
        """Inverse of :meth:`to_arrays` (accepts a dict or an open ``NpzFile``)."""
        missing = [f.name for f in fields(cls) if f.name not in arrays]
        if missing:
            raise InputError(f"expected attribute arrays {[f.name for f in fields(cls)]}, missing {missing}")
        return cls(**{f.name: np.asarray(arrays[f.name]) for f in fields(cls)})

    def as_features(self) -> np.ndarray:
        """Semantic features float32 [N, 24]: one-hot category (6), colour (8), layout (4), texture (3),
        then ``cx``, ``cy``, ``radius`` linearly mapped from their sampling ranges to ``[-1, 1]``.

        Column names are :data:`FEATURE_NAMES`.
        """
        n = len(self)
        blocks = []
        for ids, k in (
            (self.category, len(CATEGORIES)),
            (self.colour, len(PALETTE)),
            (self.layout, len(LAYOUTS)),
            (self.texture, len(TEXTURES)),
        ):
            onehot = np.zeros((n, k), dtype=np.float32)
            onehot[np.arange(n), ids] = 1.0
            blocks.append(onehot)
        c_lo, c_hi = CENTRE_RANGE
        r_lo, r_hi = RADIUS_RANGE
        scalars = np.stack(
            [
                (self.cx - c_lo) / (c_hi - c_lo) * 2 - 1,
                (self.cy - c_lo) / (c_hi - c_lo) * 2 - 1,
                (self.radius - r_lo) / (r_hi - r_lo) * 2 - 1,
            ],
            axis=1,
        ).astype(np.float32)
        blocks.append(scalars)
        return np.concatenate(blocks, axis=1)

    def captions(self) -> list[str]:
        """One caption per image, e.g. ``"a red striped triangle on a navy-to-sand vertical gradient"``."""
        out = []
        for i in range(len(self)):
            colour = PALETTE[self.colour[i]][0]
            texture = TEXTURE_WORDS[self.texture[i]]
            shape = CATEGORIES[self.category[i]]
            start, end = BG_PALETTE[self.bg_start[i]][0], BG_PALETTE[self.bg_end[i]][0]
            layout = LAYOUTS[self.layout[i]]
            out.append(f"a {colour} {texture} {shape} on a {start}-to-{end} {layout} gradient")
        return out


def sample_attributes(n: int, seed: int) -> StimulusAttributes:
    """Draw ``n`` images' attributes with ``np.random.default_rng(seed)``."""
    if n < 0:
        raise InputError(f"expected a non-negative number of images, found {n}")
    rng = np.random.default_rng(seed)
    n_bg = len(BG_PALETTE)
    layout = rng.integers(0, len(LAYOUTS), n)
    bg_start = rng.integers(0, n_bg, n)
    bg_end = (bg_start + rng.integers(1, n_bg, n)) % n_bg  # always a different colour
    category = rng.integers(0, len(CATEGORIES), n)
    colour = rng.integers(0, len(PALETTE), n)
    cx = rng.uniform(*CENTRE_RANGE, n)
    cy = rng.uniform(*CENTRE_RANGE, n)
    radius = rng.uniform(*RADIUS_RANGE, n)
    texture = rng.integers(0, len(TEXTURES), n)
    phase = rng.uniform(0.0, 1.0, n)
    return StimulusAttributes(
        layout=layout,
        bg_start=bg_start,
        bg_end=bg_end,
        category=category,
        colour=colour,
        cx=cx,
        cy=cy,
        radius=radius,
        texture=texture,
        phase=phase,
    )


# --------------------------------------------------------------------------------------------------
# rendering


def _shape_mask(category: int, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Inside-mask of one shape for offsets ``dx, dy`` [n, S, S] from the centre and radius ``r`` [n, 1, 1]."""
    ax, ay = np.abs(dx), np.abs(dy)
    if category == 0:  # disk
        return dx * dx + dy * dy <= r * r
    if category == 1:  # square, about the disk's area
        return np.maximum(ax, ay) <= 0.85 * r
    if category == 2:  # upward triangle: apex at -r, base at +0.7 r, base half-width 1.1 r
        top, base = -r, 0.7 * r
        return (dy >= top) & (dy <= base) & (ax <= 1.1 * r * (dy - top) / (base - top))
    if category == 3:  # cross
        arm = 0.3 * r
        return ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    if category == 4:  # ring
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if category == 5:  # horizontal bar
        return (ax <= r) & (ay <= 0.35 * r)
    raise AssertionError(f"unknown category {category}")


def render(attrs: StimulusAttributes, size: int = 32) -> np.ndarray:
    """Render images float32 [N, 3, size, size] in [0, 1] (``size >= 16``; no anti-aliasing)."""
    if size < MIN_SIZE:
        raise InputError(f"expected an image size >= {MIN_SIZE}, found {size}")
    n = len(attrs)
    u = ((np.arange(size, dtype=np.float32) + 0.5) / size).astype(np.float32)
    xs, ys = u[None, None, :], u[None, :, None]  # [1, 1, S], [1, S, 1]

    # background gradient: t in [0, 1] along the layout's direction
    grads = np.stack(
        [
            np.broadcast_to(xs[0], (size, size)),
            np.broadcast_to(ys[0], (size, size)),
            (xs[0] + ys[0]) / 2,
            ((1 - xs[0]) + ys[0]) / 2,
        ]
    ).astype(np.float32)  # [4, S, S]
    t = grads[attrs.layout][:, None]  # [N, 1, S, S]
    c0 = _BG_RGB[attrs.bg_start][:, :, None, None]
    c1 = _BG_RGB[attrs.bg_end][:, :, None, None]
    bg = c0 + (c1 - c0) * t  # [N, 3, S, S]

    cx = attrs.cx.astype(np.float32)[:, None, None]
    cy = attrs.cy.astype(np.float32)[:, None, None]
    r = attrs.radius.astype(np.float32)[:, None, None]
    dx, dy = xs - cx, ys - cy  # [N, 1, S], [N, S, 1]
    dx = np.broadcast_to(dx, (n, size, size))
    dy = np.broadcast_to(dy, (n, size, size))
    mask = np.zeros((n, size, size), dtype=bool)
    for c in range(len(CATEGORIES)):
        sel = np.flatnonzero(attrs.category == c)
        if sel.size:
            mask[sel] = _shape_mask(c, dx[sel], dy[sel], r[sel])

    # texture: which object pixels take the dark shade
    phase = attrs.phase.astype(np.float32)[:, None, None]
    stripes = np.mod(xs / STRIPE_PERIOD + phase, 1.0) < 0.5  # [N, 1, S]
    cells = np.floor(xs / (CHECKER_PERIOD / 2) + 2 * phase) + np.floor(ys / (CHECKER_PERIOD / 2) + 2 * phase)
    checker = np.mod(cells, 2.0) < 0.5  # [N, S, S]
    tex = attrs.texture[:, None, None]
    dark = ((tex == 1) & stripes) | ((tex == 2) & checker)
    shade = np.where(dark, np.float32(DARK_SHADE), np.float32(1.0))  # [N, S, S]
    obj = _PALETTE_RGB[attrs.colour][:, :, None, None] * shade[:, None]

    images = np.where(mask[:, None], obj, bg).astype(np.float32, copy=False)
    return np.clip(images, 0.0, 1.0, out=images)


# --------------------------------------------------------------------------------------------------
# forward model


def _pool_matrix(size: int, grid: int) -> np.ndarray:
    """Area-averaging matrix [grid, size]: row g averages the pixels under grid cell g."""
    edges = np.arange(grid + 1, dtype=np.float64) * size / grid
    px = np.arange(size, dtype=np.float64)
    lo = np.maximum(edges[:-1, None], px[None])
    hi = np.minimum(edges[1:, None], px[None] + 1)
    return (np.clip(hi - lo, 0.0, None) * grid / size).astype(np.float32)


def early_feature_maps(images: np.ndarray) -> np.ndarray:
    """The five low-level maps (R, G, B, luminance, edge energy) pooled to 16 x 16: float32 [N, 5, 16, 16]."""
    images = np.asarray(images, dtype=np.float32)
    size = images.shape[-1]
    lum = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    gy, gx = np.gradient(lum, axis=(1, 2))
    edge = np.sqrt(gx * gx + gy * gy)
    maps = np.concatenate([images, lum[:, None], edge[:, None]], axis=1)  # [N, 5, S, S]
    p = _pool_matrix(size, FEATURE_GRID)
    return (p @ maps @ p.T).astype(np.float32)


@lru_cache(maxsize=4)
def _reference_batch(size: int) -> tuple[np.ndarray, StimulusAttributes]:
    attrs = sample_attributes(REFERENCE_IMAGES, REFERENCE_SEED)
    images = render(attrs, size)
    images.setflags(write=False)
    return images, attrs


class SubjectModel:
    """One simulated subject: early-visual pRF voxels then higher-visual semantic voxels (see module docs).

    Parameters are drawn from a stream derived from ``(seed, crc32(name))``, so a subject's voxels do not
    depend on which other subjects are simulated.
    """

    def __init__(
        self,
        name: str,
        n_voxels: int,
        seed: int = 0,
        noise_sd: float | None = None,
        early_fraction: float = DEFAULT_EARLY_FRACTION,
    ) -> None:
        if n_voxels < 1:
            raise InputError(f"subject {name!r}: expected at least 1 voxel, found {n_voxels}")
        if not 0.0 <= early_fraction <= 1.0:
            raise InputError(f"subject {name!r}: expected early_fraction in [0, 1], found {early_fraction}")
        noise = DEFAULT_NOISE_SD.get(name, 1.0) if noise_sd is None else float(noise_sd)
        if not (np.isfinite(noise) and noise >= 0):
            raise InputError(f"subject {name!r}: expected a finite noise_sd >= 0, found {noise_sd}")
        self.name = name
        self.n_voxels = int(n_voxels)
        self.seed = int(seed)
        self.noise_sd = noise
        self.early_fraction = float(early_fraction)
        self.n_early = round(self.early_fraction * self.n_voxels)
        self.n_higher = self.n_voxels - self.n_early

        rng = _stream(self.seed, _name_key(name), 0)
        ne, nh = self.n_early, self.n_higher
        self.early_feature = rng.integers(0, len(EARLY_FEATURES), ne)
        self.rf_x = rng.uniform(0.0, 1.0, ne)
        self.rf_y = rng.uniform(0.0, 1.0, ne)
        self.rf_sigma = rng.uniform(*RF_SIGMA_RANGE, ne)
        centres = (np.arange(FEATURE_GRID) + 0.5) / FEATURE_GRID
        d2 = (centres[None, None, :] - self.rf_x[:, None, None]) ** 2 + (
            centres[None, :, None] - self.rf_y[:, None, None]
        ) ** 2  # [ne, G(y), G(x)]
        w = np.exp(-d2 / (2 * self.rf_sigma[:, None, None] ** 2)).reshape(ne, -1)
        self.rf_weights = (w / w.sum(axis=1, keepdims=True)).astype(np.float32)  # [ne, G*G]
        n_feat = len(FEATURE_NAMES)
        self.semantic_weights = rng.standard_normal((n_feat, nh)).astype(np.float32)
        self.interaction = (INTERACTION_SD * rng.standard_normal((len(CATEGORIES) * len(PALETTE), nh))).astype(
            np.float32
        )
        self._stats: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        log.debug("subject %s: %d early + %d higher voxels, noise_sd %.2f", name, ne, nh, noise)

    @property
    def is_early(self) -> np.ndarray:
        """Boolean [V]: True for early-visual voxels (the first ``n_early``)."""
        mask = np.zeros(self.n_voxels, dtype=bool)
        mask[: self.n_early] = True
        return mask

    def params(self) -> dict[str, Any]:
        """The subject's forward-model settings (JSON-serialisable)."""
        return {
            "n_voxels": self.n_voxels,
            "n_early": self.n_early,
            "n_higher": self.n_higher,
            "noise_sd": self.noise_sd,
            "early_fraction": self.early_fraction,
        }

    def _raw(self, images: np.ndarray, attrs: StimulusAttributes) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            raise InputError(f"expected images of shape [N, 3, S, S], found {tuple(images.shape)}")
        if images.shape[0] != len(attrs):
            raise InputError(f"expected one attribute row per image ({images.shape[0]}), found {len(attrs)}")
        n = images.shape[0]
        out = np.empty((n, self.n_voxels), dtype=np.float32)
        if self.n_early:
            maps = early_feature_maps(images).reshape(n, len(EARLY_FEATURES), -1)
            for k in range(len(EARLY_FEATURES)):
                sel = np.flatnonzero(self.early_feature == k)
                if sel.size:
                    out[:, sel] = maps[:, k] @ self.rf_weights[sel].T
        if self.n_higher:
            pair = attrs.category * len(PALETTE) + attrs.colour
            out[:, self.n_early :] = attrs.as_features() @ self.semantic_weights + self.interaction[pair]
        return out

    def _standardisation(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        if size not in self._stats:
            ref_images, ref_attrs = _reference_batch(size)
            raw = self._raw(ref_images, ref_attrs).astype(np.float64)
            mean, sd = raw.mean(axis=0), raw.std(axis=0)
            sd[sd < 1e-12] = 1.0
            self._stats[size] = (mean.astype(np.float32), sd.astype(np.float32))
        return self._stats[size]

    def signal(self, images: np.ndarray, attrs: StimulusAttributes) -> np.ndarray:
        """Noise-free standardised responses float32 [N, V] to ``images`` [N, 3, S, S] with ``attrs``."""
        raw = self._raw(images, attrs)
        mean, sd = self._standardisation(int(np.asarray(images).shape[-1]))
        return ((raw - mean) / sd).astype(np.float32)

    def respond(self, images: np.ndarray, attrs: StimulusAttributes, rng: np.random.Generator) -> np.ndarray:
        """Single-trial responses float32 [N, V]: :meth:`signal` plus N(0, noise_sd^2) noise from ``rng``."""
        sig = self.signal(images, attrs)
        return (sig + self.noise_sd * rng.standard_normal(sig.shape, dtype=np.float32)).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# data set


@dataclass
class SyntheticSet:
    """Stimuli and every subject's z-scored single trials.

    ``trials[subject] = (voxels [T, V] float32, image_index [T] int64, split [T] uint8)`` with split 0 for
    train trials and 1 for test trials. ``forward_model`` records the simulation settings.
    """

    images: np.ndarray
    attrs: StimulusAttributes
    train_images: np.ndarray
    test_images: np.ndarray
    trials: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
    seed: int = 0
    forward_model: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def subjects(self) -> dict[str, int]:
        """Subject name -> voxel count, in insertion order."""
        return {name: int(vox.shape[1]) for name, (vox, _, _) in self.trials.items()}


def make_synthetic(
    subjects: Sequence[tuple[str, int]],
    n_train: int = 1200,
    n_test: int = 100,
    repeats: int = 3,
    size: int = 32,
    seed: int = 0,
    *,
    noise_sd: Mapping[str, float] | None = None,
) -> SyntheticSet:
    """Build the synthetic set: images 0..n_train-1 are train, the next n_test are test.

    Each subject sees every train image once and every test image ``repeats`` times (independent noise),
    in a shuffled order; voxels are z-scored with that subject's train-trial mean and std. ``noise_sd``
    overrides the default noise level (:data:`DEFAULT_NOISE_SD`) of the subjects it names.
    """
    if n_train < 2:
        raise InputError(f"expected n_train >= 2 (z-scoring needs two train trials), found {n_train}")
    if n_test < 1:
        raise InputError(f"expected n_test >= 1, found {n_test}")
    if repeats < 1:
        raise InputError(f"expected repeats >= 1, found {repeats}")
    if not subjects:
        raise InputError("expected at least one (subject, n_voxels) pair, found none")
    names = [str(name) for name, _ in subjects]
    if len(set(names)) != len(names):
        raise InputError(f"expected distinct subject names, found {names}")

    n_img = n_train + n_test
    attrs = sample_attributes(n_img, seed)
    images = render(attrs, size)
    train_images = np.arange(n_train, dtype=np.int64)
    test_images = np.arange(n_train, n_img, dtype=np.int64)
    shown = np.concatenate([train_images, np.repeat(test_images, repeats)])
    split_of_shown = np.concatenate([np.zeros(n_train, np.uint8), np.ones(n_test * repeats, np.uint8)])

    trials: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    params: dict[str, Any] = {}
    for name, n_vox in subjects:
        model = SubjectModel(str(name), int(n_vox), seed=seed, noise_sd=(noise_sd or {}).get(str(name)))
        sig = model.signal(images, attrs)  # [N_img, V], once per image
        rng = _stream(seed, _name_key(model.name), 1)
        order = rng.permutation(shown.shape[0])
        image_index = shown[order]
        split = split_of_shown[order]
        noise = rng.standard_normal((image_index.shape[0], model.n_voxels), dtype=np.float32)
        voxels = sig[image_index] + np.float32(model.noise_sd) * noise
        train = voxels[split == 0].astype(np.float64)
        mean, sd = train.mean(axis=0), train.std(axis=0)
        sd[sd < 1e-12] = 1.0
        voxels = ((voxels - mean) / sd).astype(np.float32)
        trials[model.name] = (voxels, image_index.astype(np.int64), split.astype(np.uint8))
        params[model.name] = model.params()
        log.info("simulated %s: %d trials x %d voxels", model.name, voxels.shape[0], model.n_voxels)

    forward_model = {
        "early_features": list(EARLY_FEATURES),
        "feature_grid": FEATURE_GRID,
        "rf_sigma_range": list(RF_SIGMA_RANGE),
        "semantic_features": list(FEATURE_NAMES),
        "semantic_weight_sd": 1.0,
        "interaction_sd": INTERACTION_SD,
        "reference_images": REFERENCE_IMAGES,
        "reference_seed": REFERENCE_SEED,
        "n_train": n_train,
        "n_test": n_test,
        "repeats": repeats,
        "zscore": "per voxel, train trials of each subject",
        "subjects": params,
    }
    return SyntheticSet(
        images=images,
        attrs=attrs,
        train_images=train_images,
        test_images=test_images,
        trials=trials,
        seed=int(seed),
        forward_model=forward_model,
    )
