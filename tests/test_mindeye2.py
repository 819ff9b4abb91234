"""The MindEye2 NSD reader on tiny files written in the real formats, and open_dataset's detection."""

import io
import tarfile

import h5py
import numpy as np
import pytest

from mindhier_rt.config import NSD_SUBJECTS
from mindhier_rt.data import BrainDataset, MindEye2Dataset, dataset_id, make_synthetic, open_dataset, write_dataset
from mindhier_rt.errors import InputError

N_IMAGES, SIZE = 12, 8
TEST_IMAGES = (9, 10, 11)


def _behav(image: int, row: int, dtype) -> np.ndarray:
    b = np.full((1, 17), -1, dtype=dtype)
    b[0, 0], b[0, 2], b[0, 5], b[0, 16] = image, 1 + row // 10, row, int(image in TEST_IMAGES)
    return b


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _write_shard(path, trials, dtype=np.int64):
    """A webdataset shard: per trial the four behaviour members MindEye2 writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for image, row in trials:
            key = f"sample{row:09d}"
            for field in ("behav", "past_behav", "future_behav", "olds_behav"):
                arr = _behav(image, row, dtype) if field == "behav" else np.full((1, 17), -1.0)
                data = _npy(arr)
                info = tarfile.TarInfo(f"{key}.{field}.npy")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_mindeye2(root, subjects=("subj01",), voxels=None):
    """Tiny MindEye2 files: 12 images; per subject 6 train trials in two session shards (one of them shows a
    test image), and 3 test images x 3 repeats in new_test. Returns {subject: betas}."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    with h5py.File(root / "coco_images_224_float16.hdf5", "w") as f:
        f.create_dataset("images", data=rng.random((N_IMAGES, 3, SIZE, SIZE)).astype(np.float16))
    caps = np.array([[f"image {i}", "second", "", "", ""] for i in range(N_IMAGES)])
    caps[3, 0] = ""  # the first non-empty caption is used
    np.save(root / "COCO_73k_annots_curated.npy", caps)
    out = {}
    for s in subjects:
        n_vox = (voxels or {}).get(s, dict(NSD_SUBJECTS)[s])
        train = [(0, 3), (1, 5), (2, 0), (9, 7)]  # image 9 is a test image: dropped from train
        train2 = [(4, 12), (5, 13)]
        test = [(img, row) for row, img in zip((1, 2, 4, 6, 8, 9, 10, 11, 14), (9, 10, 11) * 3, strict=True)]
        betas = rng.standard_normal((15, n_vox)).astype(np.float32)
        with h5py.File(root / f"betas_all_{s}_fp32_renorm.hdf5", "w") as f:
            f.create_dataset("betas", data=betas)
        _write_shard(root / "wds" / s / "train" / "0.tar", train)
        _write_shard(root / "wds" / s / "train" / "1.tar", train2, dtype=np.float64)
        _write_shard(root / "wds" / s / "new_test" / "0.tar", test)
        _write_shard(root / "wds" / s / "test" / "0.tar", [(0, 0)])  # the pre-release split: never read
        out[s] = betas
    return out


@pytest.fixture()
def me2(tmp_path):
    root = tmp_path / "mindeye2"
    betas = write_mindeye2(root, subjects=("subj01", "subj05"))
    return root, betas


def test_open_dataset_picks_the_reader(me2, tmp_path):
    root, _ = me2
    ds = open_dataset(root)
    assert isinstance(ds, MindEye2Dataset)
    assert ds.subjects == {"subj01": 15724, "subj05": 13039}
    assert (ds.n_images, ds.image_size, ds.kind) == (N_IMAGES, SIZE, "mindeye2")
    synth = write_dataset(make_synthetic([("subj01", 20)], n_train=4, n_test=2, repeats=2, size=16), tmp_path / "s")
    assert isinstance(open_dataset(synth), BrainDataset)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"dataset.json .* or the MindEye2"):
        open_dataset(tmp_path / "empty")
    with pytest.raises(InputError, match="no such folder"):
        open_dataset(tmp_path / "missing")
    assert dataset_id(ds) == dataset_id(open_dataset(root)) and dataset_id(ds) != dataset_id(open_dataset(synth))


def test_test_split_averages_the_repeats(me2):
    root, betas = me2
    ds = open_dataset(root)
    voxels, index = ds.split("subj01", "test")
    assert index.tolist() == [9, 10, 11] and voxels.dtype == np.float32
    b = betas["subj01"]
    np.testing.assert_allclose(voxels[0], b[[1, 6, 10]].mean(0), rtol=1e-6, atol=1e-6)  # image 9: rows 1, 6, 10
    np.testing.assert_allclose(voxels[2], b[[4, 9, 14]].mean(0), rtol=1e-6, atol=1e-6)  # image 11
    single, single_index = ds.split("subj01", "test", average_repeats=False)
    assert single.shape == (9, 15724) and single_index.tolist() == [9, 10, 11] * 3
    np.testing.assert_array_equal(single, b[[1, 2, 4, 6, 8, 9, 10, 11, 14]])  # scan (row) order


def test_train_split_reads_every_shard_and_drops_test_images(me2):
    root, betas = me2
    voxels, index = open_dataset(root).split("subj05", "train")
    assert index.tolist() == [2, 0, 1, 4, 5]  # rows 0, 3, 5, 12, 13; row 7 (test image 9) dropped
    np.testing.assert_array_equal(voxels, betas["subj05"][[0, 3, 5, 12, 13]])
    assert voxels.shape[1] == 13039


def test_images_and_captions(me2):
    root, _ = me2
    ds = open_dataset(root)
    with h5py.File(root / "coco_images_224_float16.hdf5") as f:
        stored = f["images"][()].astype(np.float32)
    got = ds.images(np.array([5, 2, 5]))
    assert got.shape == (3, 3, SIZE, SIZE) and got.dtype == np.float32
    np.testing.assert_array_equal(got, stored[[5, 2, 5]])
    np.testing.assert_array_equal(ds.images(), stored)
    caps = ds.captions()
    assert len(caps) == N_IMAGES and caps[0] == "image 0" and caps[3] == "second"
    assert ds.attributes() is None
    with pytest.raises(InputError, match=r"indices in \[0, 12\)"):
        ds.images(np.array([12]))


def test_missing_subject_and_wrong_voxel_count(tmp_path):
    root = tmp_path / "me2"
    write_mindeye2(root, subjects=("subj01", "subj02"), voxels={"subj02": 100})
    ds = open_dataset(root)
    with pytest.raises(InputError, match=r"subj01, subj02, found 'subj03' \(betas_all_subj03_fp32_renorm.hdf5"):
        ds.split("subj03", "test")
    with pytest.raises(InputError, match="expected 14278 nsdgeneral voxels per trial for subj02, found 100"):
        ds.split("subj02", "train")
    assert ds.split("subj01", "train")[0].shape == (5, 15724)
    with pytest.raises(InputError, match="split 'train' or 'test'"):
        ds.split("subj01", "val")
    import shutil

    shutil.rmtree(root / "wds" / "subj01" / "new_test")
    with pytest.raises(InputError, match=r"new_test: expected the webdataset shards \(\*\.tar\) of subj01"):
        open_dataset(root).split("subj01", "test")
    (root / "betas_all_subj01_fp32_renorm.hdf5").unlink()
    (root / "betas_all_subj02_fp32_renorm.hdf5").unlink()
    with pytest.raises(InputError, match="at least one betas file"):
        MindEye2Dataset(root)


def _truncate(path, keep: float):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_files_are_reported(me2):
    root, _ = me2
    _truncate(root / "betas_all_subj01_fp32_renorm.hdf5", 0.6)
    with pytest.raises(InputError, match=r"betas_all_subj01_fp32_renorm.hdf5: .*truncated or corrupt"):
        open_dataset(root).split("subj01", "test")
    shard = root / "wds" / "subj05" / "new_test" / "0.tar"
    data = shard.read_bytes()  # members are 1024 bytes each: a 512-byte header and one block of .npy data
    # cut at a member boundary, inside a member's data, inside a header (tarfile stops quietly at the first and last)
    for cut in (1024 * 20, 1024 * 7 + 700, 1024 * 5 + 100):
        shard.write_bytes(data[:cut])
        with pytest.raises(InputError, match=r"0.tar: expected .*truncated"):
            open_dataset(root).split("subj05", "test")
    shard.write_bytes(data[: 1024 * 36 + 700])  # inside the end-of-archive zero blocks: every member is whole
    assert open_dataset(root).split("subj05", "test")[0].shape == (3, 13039)
    _truncate(root / "coco_images_224_float16.hdf5", 0.5)
    with pytest.raises(InputError, match=r"coco_images_224_float16.hdf5: .*truncated or corrupt"):
        open_dataset(root).images(np.array([0]))
