"""The object read-out: attribute labels, the probe on ground truth and on uninformative images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mindhier_rt.data.synthetic import StimulusAttributes, render, sample_attributes
from mindhier_rt.object_probe import (
    ATTRIBUTE_CLASSES,
    ProbeSettings,
    _blur,
    attribute_labels,
    object_scores,
    train_probe,
)


def _attrs(cx: list[float], cy: list[float], radius: list[float]) -> StimulusAttributes:
    n = len(cx)
    zeros = np.zeros(n, dtype=np.int64)
    return StimulusAttributes(
        layout=zeros, bg_start=zeros, bg_end=zeros + 1, category=np.arange(n) % 6, colour=np.arange(n) % 8,
        cx=np.array(cx), cy=np.array(cy), radius=np.array(radius), texture=zeros, phase=np.zeros(n),
    )  # fmt: skip


def test_labels_bin_position_and_size_over_their_sampling_ranges() -> None:
    attrs = _attrs(cx=[0.30, 0.50, 0.70, 0.35], cy=[0.30, 0.65, 0.70, 0.55], radius=[0.18, 0.25, 0.32, 0.30])
    labels = attribute_labels(attrs)
    assert labels["position"].tolist() == [0, 2 * 3 + 1, 2 * 3 + 2, 1 * 3 + 0]
    assert labels["size"].tolist() == [0, 1, 2, 2]
    assert labels["category"].tolist() == [0, 1, 2, 3]
    assert labels["colour"].tolist() == [0, 1, 2, 3]


def test_labels_cover_every_class_about_uniformly() -> None:
    labels = attribute_labels(sample_attributes(6000, seed=3))
    for name, k in ATTRIBUTE_CLASSES.items():
        counts = np.bincount(labels[name], minlength=k)
        assert len(counts) == k and counts.min() > 0.6 * 6000 / k, name


def test_blur_keeps_unblurred_images_and_mean_colour() -> None:
    images = torch.from_numpy(render(sample_attributes(4, seed=1), 32))
    out = _blur(images, torch.tensor([0.0, 0.0, 1.5, 3.0]))
    torch.testing.assert_close(out[:2], images[:2], atol=1e-4, rtol=0)
    assert (out[3] - images[3]).abs().mean() > (out[2] - images[2]).abs().mean() > 0.005
    torch.testing.assert_close(out.mean((2, 3)), images.mean((2, 3)), atol=0.03, rtol=0)


@pytest.fixture(scope="module")
def probe():
    return train_probe(32, seed=0, settings=ProbeSettings(n_images=1500, steps=150))


def test_probe_reads_ground_truth_and_not_blank_images(probe) -> None:
    attrs = sample_attributes(300, seed=11)
    gt = torch.from_numpy(render(attrs, 32))
    scores = object_scores(probe, gt, gt, attrs)
    assert set(scores) == set(ATTRIBUTE_CLASSES)
    for name, k in ATTRIBUTE_CLASSES.items():
        assert scores[name]["chance"] == round(1 / k, 4)
        assert scores[name]["recon"] == scores[name]["ground_truth"]
    assert scores["category"]["ground_truth"] > 3 / 6  # well above chance after a short training
    assert scores["colour"]["ground_truth"] > 3 / 8

    grey = torch.full_like(gt, 0.5)  # one image for every stimulus: at most the most frequent class can be right
    blank = object_scores(probe, grey, gt, attrs)
    for name in ATTRIBUTE_CLASSES:
        top = np.bincount(attribute_labels(attrs)[name]).max() / len(attrs)
        assert blank[name]["recon"] <= top + 1e-9
        assert blank[name]["ground_truth"] == scores[name]["ground_truth"]


def test_object_scores_needs_one_attribute_row_per_image(probe) -> None:
    attrs = sample_attributes(5, seed=2)
    images = torch.from_numpy(render(attrs, 32))
    with pytest.raises(ValueError, match="one attribute row per image"):
        object_scores(probe, images[:4], images[:4], attrs)
