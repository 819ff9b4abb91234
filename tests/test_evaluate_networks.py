"""The full NSD metric suite on random-weight networks at the protocol's sizes: identical images score perfectly,
shuffled ones near chance. (The networks run at 256-425 px: this file takes most of the evaluation test time.)"""

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("open_clip")

from test_evaluate import TINY_CLIP, register_tiny_clip, save_random_weights

from mindhier_rt.evaluate import METRICS, EvalSuite


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    register_tiny_clip(tmp_path_factory.mktemp("clip_cfg"))
    d = tmp_path_factory.mktemp("weights")
    save_random_weights(d, ["alexnet", "inception", "effnet", "swav", "clip"])
    return d


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Distinct images with structure at two scales: upsampled coarse noise plus fine noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=size, mode="bilinear")
    return (0.5 * coarse + 0.5 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)


def test_identical_images_are_perfect_and_shuffled_ones_near_chance(weights_dir):
    suite = EvalSuite(weights_dir, clip_model=TINY_CLIP, batch=8)
    assert suite.metrics == tuple(METRICS)
    feats = suite.features(_images(6))  # every network once; the comparisons below reuse the features
    same = suite.compare(feats, feats)
    assert list(same) == ["pixcorr", "ssim", "alexnet2", "alexnet5", "inception", "clip", "effnet", "swav"]
    assert same["pixcorr"] == pytest.approx(1.0, abs=1e-9) and same["ssim"] == pytest.approx(1.0, abs=1e-9)
    for m in ("alexnet2", "alexnet5", "inception", "clip"):
        assert same[m] == 1.0, m
    for m in ("effnet", "swav"):
        assert same[m] == pytest.approx(0.0, abs=1e-6), m
    perm = torch.tensor([1, 2, 3, 4, 5, 0])  # every image replaced by another one
    shuffled = suite.compare({k: v[perm] for k, v in feats.items()}, feats)
    # upsampled 32 px images are smooth at 425 px, so unrelated ones keep a fair SSIM (the field's floor is ~0.3)
    assert abs(shuffled["pixcorr"]) < 0.3 and shuffled["ssim"] < 0.8, shuffled
    # chance for a derangement: the true partner of pred_i always wins, the other N - 2 are coin flips: 2/5
    for m in ("alexnet2", "alexnet5", "inception", "clip"):
        assert 0.1 <= shuffled[m] <= 0.7, (m, shuffled[m])
    for m in ("effnet", "swav"):
        assert shuffled[m] > 1e-4, (m, shuffled[m])
