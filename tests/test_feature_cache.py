"""Teacher features cached on disk: a second run reads them and never calls the teacher; another key misses."""

import numpy as np
import pytest
import torch
from torch import nn

from mindhier_rt.errors import InputError
from mindhier_rt.train.feature_cache import FeatureCache, teacher_features, weights_hash

N_IMAGES = 10


class CountingTeacher(nn.Module):
    """Levels [B, 2, 3, 3] and text [B, 2, 3] that depend on the image / caption; records every call."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))
        self.image_calls: list[int] = []
        self.text_calls: list[int] = []

    def image_levels(self, images_B3HW):
        self.image_calls.append(len(images_B3HW))
        mean_B3 = images_B3HW.mean(dim=(2, 3)) * self.scale
        return torch.stack([mean_B3, 2 * mean_B3], dim=1)[:, :, None, :].expand(-1, 2, 3, 3)

    def text_tokens(self, captions):
        self.text_calls.append(len(captions))
        lengths = torch.tensor([float(len(c)) for c in captions])
        return lengths[:, None, None].expand(-1, 2, 3) * self.scale


@pytest.fixture()
def data():
    images = np.random.default_rng(0).random((N_IMAGES, 3, 4, 4)).astype(np.float32)
    captions = [f"caption {'x' * i}" for i in range(N_IMAGES)]
    loads: list[list[int]] = []

    def load_images(idx):
        loads.append(list(idx))
        return images[idx]

    return images, captions, load_images, loads


def _features(cache, teacher, data, index, **kw):
    _, captions, load_images, _ = data
    return teacher_features(cache, np.asarray(index), load_images, lambda: captions, teacher, teacher, **kw)


def test_second_run_reads_the_cache_and_never_calls_the_teacher(tmp_path, data):
    images, captions, _, loads = data
    teacher = CountingTeacher()
    key = ("random-vit-L1.2", weights_hash(teacher), "data-0")
    with _features(FeatureCache(tmp_path, *key), teacher, data, [7, 2, 2, 5, 9], chunk=2) as first:
        assert teacher.image_calls == [2, 2] and teacher.text_calls == [2, 2]  # 4 distinct images, chunks of 2
        assert sorted(i for chunk in loads for i in chunk) == [2, 5, 7, 9]
        expected = teacher.image_levels(torch.from_numpy(images[[9, 2]]))
        got = first.levels[torch.tensor([9, 2])]
        assert got.dtype == torch.float32 and got.shape == (2, 2, 3, 3)
        torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)  # stored as float16
        assert first.text[[5]][0, 0, 0] == len(captions[5])
        assert first.levels[torch.tensor([[2, 5], [5, 9]])].shape == (2, 2, 2, 3, 3)  # any index shape
        with pytest.raises(InputError, match=r"cached features for images \[3\]"):
            first.levels[torch.tensor([2, 3])]
        cached_rows = first.levels[torch.tensor([2, 5, 7, 9])]

    teacher.image_calls.clear(), teacher.text_calls.clear(), loads.clear()
    with _features(FeatureCache(tmp_path, *key), teacher, data, [9, 5, 2, 7]) as second:
        assert teacher.image_calls == [] and teacher.text_calls == [] and loads == []  # read from disk only
        torch.testing.assert_close(second.levels[torch.tensor([2, 5, 7, 9])], cached_rows, atol=0, rtol=0)

    with _features(FeatureCache(tmp_path, *key), teacher, data, [2, 3]) as more:  # one new image: one new part
        assert teacher.image_calls == [1] and loads == [[3]]
        assert more.image_index().tolist() == [2, 3, 5, 7, 9]
    assert len(FeatureCache(tmp_path, *key).parts()) == 3


def test_another_teacher_weights_data_or_dtype_misses(tmp_path, data):
    teacher = CountingTeacher()
    h = weights_hash(teacher)
    _features(FeatureCache(tmp_path, "random-vit-L1.2", h, "data-0"), teacher, data, [1, 4]).close()
    assert teacher.image_calls == [2]
    other = CountingTeacher(scale=2.0)
    assert weights_hash(other) != h and weights_hash(CountingTeacher()) == h
    for key in [
        ("clip-L1.2", h, "data-0"),  # another teacher id
        ("random-vit-L1.2", weights_hash(other), "data-0"),  # other weights
        ("random-vit-L1.2", h, "data-1"),  # other data
    ]:
        teacher.image_calls.clear()
        with _features(FeatureCache(tmp_path, *key), teacher, data, [1, 4]) as f:
            assert teacher.image_calls == [2], key
            assert f.levels[[1, 4]].shape == (2, 2, 3, 3)
    teacher.image_calls.clear()
    cache32 = FeatureCache(tmp_path, "random-vit-L1.2", h, "data-0", dtype="float32")
    with _features(cache32, teacher, data, [1, 4]) as f:
        assert teacher.image_calls == [2]
        torch.testing.assert_close(f.levels[[4]], teacher.image_levels(torch.from_numpy(data[0][[4]])))  # exact
    with pytest.raises(InputError, match="cache dtype"):
        FeatureCache(tmp_path, "x", h, "data-0", dtype="int8")


def test_a_corrupt_part_is_reported(tmp_path, data):
    teacher = CountingTeacher()
    cache = FeatureCache(tmp_path, "t", weights_hash(teacher), "d")
    _features(cache, teacher, data, [0, 1]).close()
    part = cache.parts()[0]
    part.write_bytes(part.read_bytes()[:100])
    with pytest.raises(InputError, match=r"corrupt file .*; delete it"):
        _features(cache, teacher, data, [0, 1])


def test_train_stage1_command_reuses_the_cache(cli, tmp_path, monkeypatch):
    from mindhier_rt.train.teacher import RandomViTTeacher

    calls = []
    original = RandomViTTeacher.image_levels

    def counting(self, images):
        calls.append(len(images))
        return original(self, images)

    monkeypatch.setattr(RandomViTTeacher, "image_levels", counting)
    data, cache = tmp_path / "data", tmp_path / "cache"
    assert cli("synth", "--out", data, "--n-train", "12", "--n-test", "2", "--repeats", "2")[0] == 0
    run = ["train", "stage1", "--data", data, "--steps", "2", "--batch-size", "4", "--feature-cache", cache]
    code, _, err = cli(*run, "--out", tmp_path / "a")
    assert code == 0, err
    assert sum(calls) == 12  # the training images only, once
    (folder,) = cache.iterdir()
    assert folder.name.startswith("random-vit-L") and list(folder.glob("part-*.h5"))
    calls.clear()
    code, _, err = cli(*run, "--out", tmp_path / "b")
    assert code == 0, err
    assert calls == []  # the second run reads the cache
    code, _, err = cli(*run, "--out", tmp_path / "c", "--teacher-seed", "1")
    assert code == 0, err
    assert sum(calls) == 12 and len(list(cache.iterdir())) == 2  # other teacher weights: a miss
