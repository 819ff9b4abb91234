"""The synthetic benchmark (mindhier_rt.data.synthetic) and the on-disk data set layout (mindhier_rt.data.nsd)."""

from __future__ import annotations

import json
import re
import shutil

import h5py
import numpy as np
import pytest

from mindhier_rt.config import preset
from mindhier_rt.data import (
    BrainDataset,
    StimulusAttributes,
    SubjectModel,
    make_synthetic,
    render,
    sample_attributes,
    synth_command_impl,
    write_dataset,
)
from mindhier_rt.data.synthetic import CATEGORIES, FEATURE_NAMES, LAYOUTS, PALETTE, TEXTURES
from mindhier_rt.errors import InputError

DEMO_SUBJECTS = (("subj01", 600), ("subj02", 500))


@pytest.fixture(scope="module")
def demo_set():
    """The demo preset's subjects at the default sizes (1200 train images, 100 test images x 3)."""
    return make_synthetic(DEMO_SUBJECTS, seed=0)


@pytest.fixture(scope="module")
def small_set():
    return make_synthetic(DEMO_SUBJECTS, n_train=40, n_test=6, repeats=3, seed=3)


@pytest.fixture()
def written(small_set, tmp_path):
    return write_dataset(small_set, tmp_path / "synth")


# --------------------------------------------------------------------------------------------------
# stimuli


def test_attributes_deterministic_and_in_range():
    a, b, c = sample_attributes(200, 1), sample_attributes(200, 1), sample_attributes(200, 2)
    for name, arr in a.to_arrays().items():
        np.testing.assert_array_equal(arr, getattr(b, name))
    assert not np.array_equal(a.category, c.category)
    assert len(a) == 200
    assert set(np.unique(a.category)) == set(range(len(CATEGORIES)))
    assert np.all(a.bg_start != a.bg_end)
    assert a.cx.min() >= 0.3 and a.cx.max() <= 0.7 and a.cy.min() >= 0.3 and a.cy.max() <= 0.7
    assert a.radius.min() >= 0.18 and a.radius.max() <= 0.32
    feats = a.as_features()
    assert feats.shape == (200, len(FEATURE_NAMES)) and feats.dtype == np.float32
    np.testing.assert_array_equal(feats[:, :21].sum(axis=1), 4.0)  # four one-hot blocks
    assert np.abs(feats[:, 21:]).max() <= 1.0


def test_captions():
    attrs = sample_attributes(30, 0)
    caps = attrs.captions()
    assert len(caps) == 30
    pattern = re.compile(r"^a [a-z ]+ (solid|striped|checkered) [a-z]+ on a [a-z ]+-to-[a-z ]+ [a-z-]+ gradient$")
    for i, cap in enumerate(caps):
        assert pattern.match(cap), cap
        assert CATEGORIES[attrs.category[i]] in cap and PALETTE[attrs.colour[i]][0] in cap
        assert cap.endswith(f"{LAYOUTS[attrs.layout[i]]} gradient")


@pytest.mark.parametrize("size", [16, 32, 48])
def test_render_shape_and_range(size):
    images = render(sample_attributes(20, 0), size)
    assert images.shape == (20, 3, size, size) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert np.isfinite(images).all()


def test_render_rejects_tiny_size():
    with pytest.raises(InputError, match="16"):
        render(sample_attributes(2, 0), 15)


def _with(attrs: StimulusAttributes, **changes) -> StimulusAttributes:
    arrays = attrs.to_arrays()
    for k, v in changes.items():
        arrays[k] = np.full(len(attrs), v, dtype=arrays[k].dtype)
    return StimulusAttributes(**arrays)


def test_attributes_change_images():
    base = _with(sample_attributes(1, 5), texture=0, cx=0.5, cy=0.5, radius=0.3, colour=0, layout=0)
    img = render(base)[0]
    red = np.array(PALETTE[0][1], dtype=np.float32)[:, None, None]

    def obj_mask(im):
        return np.all(np.abs(im - red) < 1e-6, axis=0)

    masks = [obj_mask(render(_with(base, category=c))[0]) for c in range(len(CATEGORIES))]
    for i in range(len(masks)):
        assert masks[i].sum() > 20, CATEGORIES[i]
        for j in range(i):
            assert (masks[i] != masks[j]).sum() > 10, (CATEGORIES[i], CATEGORIES[j])
    # colour: only object pixels change; texture: some object pixels darken; layout: background changes
    other = render(_with(base, colour=2))[0]
    changed = np.any(other != img, axis=0)
    np.testing.assert_array_equal(changed, obj_mask(img))
    for tex in (1, 2):
        textured = render(_with(base, texture=tex))[0]
        dark = np.any(textured != img, axis=0)
        assert 10 < dark.sum() < obj_mask(img).sum(), TEXTURES[tex]
    assert np.any(render(_with(base, layout=1))[0][:, ~obj_mask(img)] != img[:, ~obj_mask(img)])
    # position moves the object
    moved = obj_mask(render(_with(base, cx=0.35))[0])
    assert moved.sum() > 20 and not np.array_equal(moved, obj_mask(img))


# --------------------------------------------------------------------------------------------------
# subjects


def test_subject_model_signal_and_noise():
    attrs = sample_attributes(600, 11)
    images = render(attrs)
    model = SubjectModel("subj02", 500, seed=0)
    assert model.noise_sd == 1.2 and model.n_early == 300 and model.n_higher == 200
    sig = model.signal(images, attrs)
    assert sig.shape == (600, 500) and sig.dtype == np.float32
    sd = sig.std(axis=0)
    assert 0.85 < sd.mean() < 1.15 and np.abs(sig.mean(axis=0)).mean() < 0.2  # unit variance, fresh batch
    np.testing.assert_array_equal(sig, SubjectModel("subj02", 500, seed=0).signal(images, attrs))
    noisy = model.respond(images, attrs, np.random.default_rng(0))
    assert abs(float((noisy - sig).std()) - 1.2) < 0.02
    assert not np.array_equal(sig, SubjectModel("subj02", 500, seed=1).signal(images, attrs))
    assert not np.array_equal(sig[:, :100], SubjectModel("subj01", 500, seed=0).signal(images, attrs)[:, :100])
    with pytest.raises(InputError, match="early_fraction"):
        SubjectModel("s", 10, early_fraction=1.5)


def test_make_synthetic_deterministic(small_set):
    again = make_synthetic(DEMO_SUBJECTS, n_train=40, n_test=6, repeats=3, seed=3)
    other = make_synthetic(DEMO_SUBJECTS, n_train=40, n_test=6, repeats=3, seed=4)
    np.testing.assert_array_equal(small_set.images, again.images)
    assert not np.array_equal(small_set.images, other.images)
    for name in ("subj01", "subj02"):
        for x, y in zip(small_set.trials[name], again.trials[name], strict=True):
            np.testing.assert_array_equal(x, y)
        assert not np.array_equal(small_set.trials[name][0], other.trials[name][0])
    # a subject's data do not depend on the other subjects simulated alongside it
    alone = make_synthetic([("subj02", 500)], n_train=40, n_test=6, repeats=3, seed=3)
    for x, y in zip(small_set.trials["subj02"], alone.trials["subj02"], strict=True):
        np.testing.assert_array_equal(x, y)


def test_make_synthetic_trials(small_set):
    ds = small_set
    assert ds.images.shape == (46, 3, 32, 32) and ds.subjects == dict(DEMO_SUBJECTS)
    np.testing.assert_array_equal(ds.train_images, np.arange(40))
    np.testing.assert_array_equal(ds.test_images, np.arange(40, 46))
    for name, n_vox in DEMO_SUBJECTS:
        voxels, index, split = ds.trials[name]
        assert voxels.shape == (40 + 6 * 3, n_vox) and voxels.dtype == np.float32
        assert index.dtype == np.int64 and split.dtype == np.uint8
        np.testing.assert_array_equal(np.sort(index[split == 0]), ds.train_images)
        np.testing.assert_array_equal(np.bincount(index[split == 1], minlength=46)[40:], 3)
        assert not np.array_equal(split, np.sort(split))  # shuffled
        train = voxels[split == 0]
        np.testing.assert_allclose(train.mean(axis=0), 0.0, atol=1e-5)
        np.testing.assert_allclose(train.std(axis=0), 1.0, atol=1e-4)
    with pytest.raises(InputError, match="n_train"):
        make_synthetic(DEMO_SUBJECTS, n_train=1)


# --------------------------------------------------------------------------------------------------
# the forward model is informative: ridge regression from voxels to image features


def _ridge(x: np.ndarray, y: np.ndarray, n_val: int) -> np.ndarray:
    """Closed-form ridge with an intercept; lambda picked on the last ``n_val`` rows, then refit on all."""

    def fit(xx: np.ndarray, yy: np.ndarray, lam: float) -> np.ndarray:
        xa = np.c_[xx, np.ones(len(xx))]
        reg = lam * np.eye(xa.shape[1])
        reg[-1, -1] = 0.0
        return np.linalg.solve(xa.T @ xa + reg, xa.T @ yy)

    lams = 10.0 ** np.arange(0, 6)
    errs = [
        np.mean((np.c_[x[-n_val:], np.ones(n_val)] @ fit(x[:-n_val], y[:-n_val], lam) - y[-n_val:]) ** 2)
        for lam in lams
    ]
    return fit(x, y, float(lams[int(np.argmin(errs))]))


def _predict(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.c_[x, np.ones(len(x))] @ w


def _mean_corr(pred: np.ndarray, true: np.ndarray) -> float:
    p, t = pred - pred.mean(0), true - true.mean(0)
    denom = np.sqrt((p * p).sum(0) * (t * t).sum(0))
    ok = denom > 1e-12
    return float(((p * t).sum(0)[ok] / denom[ok]).mean())


def test_ridge_decoding_is_far_above_chance(demo_set):
    ds = demo_set
    s = ds.image_size
    pixels = ds.images.reshape(len(ds.images), 3, 8, s // 8, 8, s // 8).mean(axis=(3, 5)).reshape(len(ds.images), -1)
    semantic = ds.attrs.as_features()
    n_cat = len(CATEGORIES)
    for name, _ in DEMO_SUBJECTS:
        voxels, index, split = ds.trials[name]
        x_train, i_train = voxels[split == 0], index[split == 0]
        test_rows = np.flatnonzero(split == 1)
        test_ids = np.unique(index[test_rows])
        averaged = np.stack([voxels[test_rows[index[test_rows] == i]].mean(axis=0) for i in test_ids])
        single = np.stack([voxels[test_rows[index[test_rows] == i][0]] for i in test_ids])

        w_pix = _ridge(x_train, pixels[i_train], n_val=200)
        r_avg = _mean_corr(_predict(w_pix, averaged), pixels[test_ids])
        r_single = _mean_corr(_predict(w_pix, single), pixels[test_ids])

        w_sem = _ridge(x_train, semantic[i_train], n_val=200)
        pred_avg, pred_single = _predict(w_sem, averaged), _predict(w_sem, single)
        onehots = np.eye(n_cat)  # nearest class in the category block of the predicted features
        dist = ((pred_avg[:, None, :n_cat] - onehots[None]) ** 2).sum(-1)
        acc = float((dist.argmin(1) == ds.attrs.category[test_ids]).mean())
        r_sem_avg = _mean_corr(pred_avg, semantic[test_ids])
        r_sem_single = _mean_corr(pred_single, semantic[test_ids])

        assert r_avg > 0.3, (name, r_avg)
        assert acc > 2.0 / n_cat, (name, acc)
        assert r_avg > r_single, (name, r_avg, r_single)
        assert r_sem_avg > r_sem_single, (name, r_sem_avg, r_sem_single)


# --------------------------------------------------------------------------------------------------
# on-disk layout


def test_write_and_read_round_trip(small_set, written):
    ds = small_set
    root = written
    for rel in ("stimuli.h5", "captions.json", "attributes.npz", "dataset.json"):
        assert (root / rel).is_file(), rel
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["layout_version"] == 1 and meta["kind"] == "synthetic"
    assert meta["subjects"] == dict(DEMO_SUBJECTS) and meta["image_size"] == 32 and meta["n_images"] == 46
    assert meta["seed"] == 3 and meta["forward_model"]["subjects"]["subj02"]["noise_sd"] == 1.2
    with h5py.File(root / "stimuli.h5") as f:
        assert f["images"].dtype == np.uint8 and f["images"].shape == (46, 32, 32, 3)
    assert not list(root.rglob(".*.tmp*"))  # no temporary files left behind

    bd = BrainDataset(root)
    assert bd.subjects == dict(DEMO_SUBJECTS) and bd.image_size == 32
    images = bd.images()
    assert images.shape == ds.images.shape and images.dtype == np.float32
    np.testing.assert_allclose(images, ds.images, atol=0.5 / 255 + 1e-6)
    idx = np.array([5, 1, 5, 44])
    np.testing.assert_array_equal(bd.images(idx), images[idx])
    assert bd.captions() == ds.attrs.captions()
    attrs = bd.attributes()
    assert attrs is not None
    np.testing.assert_array_equal(attrs.as_features(), ds.attrs.as_features())

    for name, n_vox in DEMO_SUBJECTS:
        voxels, index, split = ds.trials[name]
        tr_vox, tr_idx = bd.split(name, "train")
        np.testing.assert_array_equal(tr_vox, voxels[split == 0])
        np.testing.assert_array_equal(tr_idx, index[split == 0])
        te_vox, te_idx = bd.split(name, "test")
        np.testing.assert_array_equal(te_idx, ds.test_images)
        assert te_vox.shape == (6, n_vox)
        for row, img in enumerate(te_idx):
            expected = voxels[(split == 1) & (index == img)]
            assert expected.shape[0] == 3
            np.testing.assert_allclose(te_vox[row], expected.mean(axis=0), rtol=1e-5, atol=1e-6)
        single_vox, single_idx = bd.split(name, "test", average_repeats=False)
        np.testing.assert_array_equal(single_vox, voxels[split == 1])
        np.testing.assert_array_equal(single_idx, index[split == 1])


def test_synth_command_impl(tmp_path):
    root = synth_command_impl(tmp_path / "demo", "demo", n_train=12, n_test=3, repeats=2, seed=1)
    bd = BrainDataset(root)
    cfg = preset("demo")
    assert bd.subjects == dict(cfg.encoder.subjects) and bd.image_size == cfg.image_size
    vox, idx = bd.split("subj01", "test")
    assert vox.shape == (3, 600) and idx.tolist() == [12, 13, 14]


def test_missing_folder_and_description(tmp_path, written):
    with pytest.raises(InputError, match=re.escape(str(tmp_path / "nope"))):
        BrainDataset(tmp_path / "nope")
    (written / "dataset.json").unlink()
    with pytest.raises(InputError, match=re.escape(str(written / "dataset.json"))):
        BrainDataset(written)


def test_unknown_layout_version(written):
    meta_path = written / "dataset.json"
    meta = json.loads(meta_path.read_text())
    meta["layout_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"dataset\.json.*expected layout_version 1, found 99"):
        BrainDataset(written)


def test_unknown_subject_and_split(written):
    bd = BrainDataset(written)
    with pytest.raises(InputError, match=r"subj01, subj02.*'subj09'") as err:
        bd.split("subj09", "train")
    assert str(written) in str(err.value)
    with pytest.raises(InputError, match="'val'"):
        bd.split("subj01", "val")


def test_voxel_count_mismatch(written):
    path = written / "betas" / "subj01.h5"
    with h5py.File(path, "r+") as f:
        data = f["betas"][()]
        del f["betas"]
        f.create_dataset("betas", data=data[:, :-1])
    with pytest.raises(InputError, match=re.escape(str(path)) + ".*600.*599"):
        BrainDataset(written).split("subj01", "train")


def test_truncated_h5(written):
    for path, call in (
        (written / "betas" / "subj02.h5", lambda bd: bd.split("subj02", "test")),
        (written / "stimuli.h5", lambda bd: bd.images()),
    ):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
        with pytest.raises(InputError, match=re.escape(str(path))):
            call(BrainDataset(written))


def test_trials_and_betas_length_mismatch(written):
    path = written / "trials" / "subj01.npz"
    with np.load(path) as npz:
        image_index, split = npz["image_index"], npz["split"]
    np.savez(path, image_index=image_index[:-2], split=split[:-2])
    with pytest.raises(InputError, match=re.escape(str(written / "betas" / "subj01.h5")) + ".*56 trials.*58"):
        BrainDataset(written).split("subj01", "train")


def test_missing_betas(written, tmp_path):
    shutil.rmtree(written / "betas")
    with pytest.raises(InputError, match=re.escape(str(written / "betas" / "subj01.h5"))):
        BrainDataset(written).split("subj01", "train")


def test_write_dataset_refuses_a_file(small_set, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(InputError, match=re.escape(str(target))):
        write_dataset(small_set, target)
