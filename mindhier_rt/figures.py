"""Pictures a person wants to look at, drawn with Pillow alone: labelled reconstruction grids, the coarse-to-fine
progression of a decode, a metrics panel and training-loss curves.

Images are [3, H, W] tensors or arrays in [0, 1]; they are upscaled with nearest-neighbour sampling (no
smoothing hides what the model drew). Every figure is returned as a ``PIL.Image`` and saved with ``save_figure``
(atomically, deterministic PNG bytes).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mindhier_rt.io import PathLike, atomic_write_bytes, to_uint8_hwc

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (110, 110, 110)
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _tile(img: object, scale: int) -> Image.Image:
    hwc = to_uint8_hwc(img)
    tile = Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc).convert("RGB")
    return tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST)


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def save_figure(path: PathLike, image: Image.Image) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    atomic_write_bytes(path, buf.getvalue())


def pairs_grid(
    truth: Sequence[object],
    recon: Sequence[object],
    columns: int = 8,
    scale: int = 3,
    title: str = "",
    subtitle: str = "",
    labels: Sequence[str] | None = None,
) -> Image.Image:
    """Ground truth above its reconstruction, ``columns`` pairs per row, each pair labelled (``labels``, default
    the test index); a title and subtitle above."""
    if len(truth) != len(recon) or not truth:
        raise ValueError(
            f"expected as many reconstructions as ground-truth images (> 0), got {len(recon)}, {len(truth)}"
        )
    tiles = [(_tile(t, scale), _tile(r, scale)) for t, r in zip(truth, recon, strict=True)]
    w, h = tiles[0][0].size
    pad, label_h, row_label_w = 6, 16, 96
    head = 44 if title else 8
    rows = math.ceil(len(tiles) / columns)
    width = row_label_w + columns * (w + pad) + pad
    height = head + rows * (2 * h + label_h + 3 * pad)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font, small = _font(14), _font(11)
    if title:
        draw.text((pad, 6), title, fill=INK, font=font)
        draw.text((pad, 25), subtitle, fill=MUTED, font=small)
    for k, (t, r) in enumerate(tiles):
        row, col = divmod(k, columns)
        x = row_label_w + pad + col * (w + pad)
        y = head + row * (2 * h + label_h + 3 * pad)
        canvas.paste(t, (x, y))
        canvas.paste(r, (x, y + h + pad))
        label = labels[k] if labels is not None else f"#{k}"
        draw.text((x, y + 2 * h + pad + 2), label, fill=MUTED, font=small)
        if col == 0:
            draw.text((pad, y + h // 2 - 6), "seen", fill=INK, font=small)
            draw.text((pad, y + h + pad + h // 2 - 6), "reconstructed", fill=INK, font=small)
    return canvas


def progression_grid(
    steps: Sequence[Sequence[object]], truth: Sequence[object], step_labels: Sequence[str], scale: int = 3
) -> Image.Image:
    """One row per decode: the image decoded after each scale (coarse to fine), then the ground truth."""
    if not steps or len(steps) != len(truth):
        raise ValueError(f"expected one row of steps per ground-truth image, got {len(steps)} and {len(truth)}")
    rows = [[_tile(img, scale) for img in row] + [_tile(t, scale)] for row, t in zip(steps, truth, strict=True)]
    w, h = rows[0][0].size
    n = len(rows[0])
    pad, head = 6, 40
    canvas = Image.new("RGB", (pad + n * (w + pad) + 12, head + len(rows) * (h + pad) + pad), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font, small = _font(14), _font(11)
    draw.text((pad, 4), "coarse to fine: the image after each scale of the token pyramid", fill=INK, font=font)
    for j, label in enumerate([*step_labels, "seen"]):
        x = pad + j * (w + pad) + (12 if j == n - 1 else 0)
        draw.text((x, 22), label, fill=MUTED if j < n - 1 else INK, font=small)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            x = pad + j * (w + pad) + (12 if j == n - 1 else 0)
            canvas.paste(tile, (x, head + i * (h + pad)))
    return canvas


def metrics_panel(rows: Sequence[tuple[str, float, float | None]], title: str) -> Image.Image:
    """A bar per metric (value in [0, 1]) with its chance level marked: (name, value, chance or None)."""
    bar_w, bar_h, pad, name_w = 300, 18, 10, 150
    canvas = Image.new("RGB", (name_w + bar_w + 120, 40 + len(rows) * (bar_h + pad) + pad), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font, small = _font(14), _font(11)
    draw.text((pad, 8), title, fill=INK, font=font)
    for i, (name, value, chance) in enumerate(rows):
        y = 40 + i * (bar_h + pad)
        draw.text((pad, y + 3), name, fill=INK, font=small)
        x0 = name_w
        draw.rectangle([x0, y, x0 + bar_w, y + bar_h], outline=MUTED)
        v = min(max(value, 0.0), 1.0)
        draw.rectangle([x0, y, x0 + int(v * bar_w), y + bar_h], fill=COLOURS[0])
        if chance is not None:
            xc = x0 + int(chance * bar_w)
            draw.line([xc, y - 3, xc, y + bar_h + 3], fill=COLOURS[1], width=2)
        text = f"{value:.3f}" + (f" (chance {chance:.2f})" if chance is not None else "")
        draw.text((x0 + bar_w + 6, y + 3), text, fill=INK, font=small)
    return canvas


def loss_plot(series: dict[str, Sequence[tuple[float, float]]], title: str = "training loss") -> Image.Image:
    """Each series' (step, loss) points, one panel per series (scales differ), log-scaled loss when it spans more
    than a factor of 20."""
    names = [k for k, v in series.items() if len(v) >= 1]
    if not names:
        raise ValueError("expected at least one loss series with points")
    pw, ph, pad, left = 300, 170, 12, 52
    canvas = Image.new("RGB", (len(names) * (pw + left + pad) + pad, ph + 70), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font, small = _font(14), _font(10)
    draw.text((pad, 6), title, fill=INK, font=font)
    for k, name in enumerate(names):
        steps = np.array([p[0] for p in series[name]], dtype=float)
        loss = np.array([p[1] for p in series[name]], dtype=float)
        ok = np.isfinite(loss) & (loss > 0)
        steps, loss = steps[ok], loss[ok]
        x0, y0 = pad + k * (pw + left + pad) + left, 40
        draw.rectangle([x0, y0, x0 + pw, y0 + ph], outline=MUTED)
        draw.text((x0, y0 + ph + 4), f"{name} (step)", fill=INK, font=small)
        if len(loss) == 0:
            continue
        log_scale = loss.max() / loss.min() > 20
        ys = np.log10(loss) if log_scale else loss
        lo, hi = float(ys.min()), float(ys.max())
        hi = hi if hi > lo else lo + 1.0
        smax = max(float(steps.max()), 1.0)
        pts = [(x0 + pw * s / smax, y0 + ph - ph * (y - lo) / (hi - lo)) for s, y in zip(steps, ys, strict=True)]
        if len(pts) > 1:
            draw.line(pts, fill=COLOURS[k % len(COLOURS)], width=2)
        else:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=COLOURS[0])
        last = f"{int(smax)}"
        draw.text((x0 + pw - _text_width(draw, last, small), y0 + ph + 4), last, fill=MUTED, font=small)
        for value, y in ((hi, y0), (lo, y0 + ph)):
            text = f"{10**value:.3g}" if log_scale else f"{value:.3g}"
            draw.text((x0 - _text_width(draw, text, small) - 4, y - 6), text, fill=MUTED, font=small)
    return canvas
