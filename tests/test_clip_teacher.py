"""The open_clip teacher on the real ViT-L/14 architecture with random weights (skipped without open_clip)."""

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from mindhier_rt.errors import ConfigError, InputError  # noqa: E402
from mindhier_rt.schedule import PATCH_NUMS_512, Schedule  # noqa: E402
from mindhier_rt.train.clip_teacher import ClipTeacher  # noqa: E402


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return ClipTeacher(Schedule(PATCH_NUMS_512, 4, 257).clip_layers, weights=None, allow_random=True)


def test_layer_taps_shapes_and_the_final_embedding(teacher):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    levels = teacher.image_levels(images)
    assert levels.shape == (2, 4, 257, 768)
    assert torch.equal(levels, teacher.image_levels(images))  # deterministic
    # the last tap (layer 24) is the final projected state: its class token is CLIP's image embedding
    x = torch.nn.functional.interpolate(images, size=(224, 224), mode="bicubic")
    embedding = teacher.model.encode_image((x.clamp(0, 1) - teacher.mean) / teacher.std)
    assert torch.allclose(levels[:, -1, 0], embedding, atol=1e-4)
    assert not torch.allclose(levels[:, 0], levels[:, -1])
    text = teacher.text_tokens(["a red disk", "a blue cross"])
    assert text.shape == (2, 77, 768)


def test_weights_must_be_a_local_file(tmp_path):
    with pytest.raises(ConfigError, match="--clip-weights"):
        ClipTeacher((12, 16, 20, 24), weights=None)
    with pytest.raises(InputError, match="does not exist"):
        ClipTeacher((12, 16, 20, 24), weights=tmp_path / "missing.bin")
