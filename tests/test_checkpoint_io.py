"""Checkpoint format (mindhier_rt.checkpoint) and file I/O (mindhier_rt.io), with small stand-in modules."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from mindhier_rt.checkpoint import (
    FORMAT,
    Checkpoint,
    checkpoint_info,
    load_part,
    read_checkpoint,
    save_checkpoint,
)
from mindhier_rt.config import preset
from mindhier_rt.errors import CheckpointError, InputError
from mindhier_rt.io import (
    atomic_path,
    atomic_write,
    finite_rows,
    png_bytes,
    read_voxels,
    save_grid_png,
    save_png,
    write_json,
)


def small(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))


class Tied(nn.Module):
    """Embedding and head share one weight; also has a non-persistent buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scratch", torch.ones(3), persistent=False)
        self.register_buffer("steps", torch.tensor(7))


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture
def ckpt_path(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, preset("tiny"), {"encoder": small(1), "vqvae": small(2)}, extra={"step": 12, "note": "hi"})
    return path


# ------------------------------------------------------------------------------------------------
# checkpoint round trip


def test_round_trip(ckpt_path: Path) -> None:
    ckpt = read_checkpoint(ckpt_path)
    assert isinstance(ckpt, Checkpoint)
    assert ckpt.cfg == preset("tiny")
    assert list(ckpt.parts) == ["encoder", "vqvae"]
    assert ckpt.extra == {"step": 12, "note": "hi"}
    assert ckpt.path == ckpt_path
    for part, seed in (("encoder", 1), ("vqvae", 2)):
        fresh = small(99)
        assert load_part(fresh, ckpt, part) is fresh
        assert_same_state(fresh, small(seed))


def test_metadata_layout(ckpt_path: Path) -> None:
    from safetensors import safe_open

    with safe_open(ckpt_path, "pt") as f:
        meta = f.metadata()
        keys = sorted(f.keys())
    assert meta["format"] == FORMAT
    assert meta["format_version"] == "1"
    assert meta["parts"] == "encoder,vqvae"
    assert json.loads(meta["config"])["name"] == "tiny"
    assert json.loads(meta["extra"]) == {"step": 12, "note": "hi"}
    assert keys == sorted(f"{p}.{k}" for p in ("encoder", "vqvae") for k in small().state_dict())


def test_tied_weights_non_persistent_buffers_and_dtype_cast(tmp_path: Path) -> None:
    src = Tied()
    path = tmp_path / "tied.safetensors"
    save_checkpoint(path, preset("tiny"), {"generator": src})
    ckpt = read_checkpoint(path)
    assert "scratch" not in ckpt.parts["generator"]
    assert ckpt.extra == {}
    dst = Tied().to(torch.float64)
    load_part(dst, ckpt, "generator")
    assert dst.embed.weight.dtype == torch.float64
    assert dst.head.weight is dst.embed.weight
    assert torch.equal(dst.embed.weight, src.embed.weight.double())
    assert dst.steps.dtype == torch.int64 and dst.steps.item() == 7


def test_overwrite_keeps_latest(ckpt_path: Path) -> None:
    save_checkpoint(ckpt_path, preset("tiny"), {"generator": small(5)})
    ckpt = read_checkpoint(ckpt_path)
    assert list(ckpt.parts) == ["generator"]
    assert not [p for p in ckpt_path.parent.iterdir() if p != ckpt_path]


def test_checkpoint_info(ckpt_path: Path) -> None:
    info = checkpoint_info(ckpt_path)
    assert info["config_name"] == "tiny"
    assert info["format_version"] == 1
    assert set(info["parts"]) == {"encoder", "vqvae"}
    enc = info["parts"]["encoder"]
    assert enc["tensors"] == 4
    assert enc["parameters"] == 4 * 3 + 3 + 3 + 3
    assert enc["bytes"] == enc["parameters"] * 4
    assert enc["dtypes"] == ["F32"]
    assert info["tensor_bytes"] == 2 * enc["bytes"]
    assert info["file_bytes"] == ckpt_path.stat().st_size
    assert info["extra"]["step"] == 12


def test_save_rejects_unknown_part(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="decoder"):
        save_checkpoint(tmp_path / "x.safetensors", preset("tiny"), {"decoder": small()})
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------
# checkpoint errors


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match="no such file") as e:
        read_checkpoint(path)
    assert str(path) in str(e.value)
    with pytest.raises(CheckpointError, match="no such file"):
        checkpoint_info(path)


def test_truncated_file(ckpt_path: Path, tmp_path: Path) -> None:
    data = ckpt_path.read_bytes()
    bad = tmp_path / "half.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt") as e:
        read_checkpoint(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    bad.write_bytes(data[:-3])
    with pytest.raises(CheckpointError, match="corrupt"):
        read_checkpoint(bad)


@pytest.mark.parametrize(
    "payload", [os.urandom(4096), b"", b"abc", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"]
)
def test_random_bytes(tmp_path: Path, payload: bytes) -> None:
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(payload)
    with pytest.raises(CheckpointError, match="corrupt") as e:
        read_checkpoint(bad)
    assert str(bad) in str(e.value)
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint_info(bad)


def test_plain_safetensors_without_metadata(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file(dict(small().state_dict()), path)
    with pytest.raises(CheckpointError, match="plain safetensors file") as e:
        read_checkpoint(path)
    assert str(path) in str(e.value)


def _rewrite_meta(src: Path, dst: Path, **changes: str | None) -> Path:
    from safetensors import safe_open

    with safe_open(src, "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    save_file(tensors, dst, metadata=meta)
    return dst


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"format": "someone-else"}, "found format='someone-else'"),
        ({"format_version": "2"}, "expected format_version <= 1, found 2"),
        ({"format_version": "x"}, "integer format_version, found 'x'"),
        ({"format_version": None}, "integer format_version, found None"),
        ({"config": "{"}, "invalid JSON"),
        ({"config": "[]"}, "JSON object, found list"),
        ({"config": json.dumps({"name": "tiny"})}, "malformed"),
        ({"config": None}, "'config' entry"),
        ({"parts": "encoder,decoder"}, "found 'encoder,decoder'"),
        ({"parts": "encoder"}, "prefixed by a listed part (encoder), found 'vqvae."),
        ({"extra": "[1]"}, "'extra' metadata as a JSON object"),
    ],
)
def test_bad_metadata(ckpt_path: Path, tmp_path: Path, changes: dict, expected: str) -> None:
    bad = _rewrite_meta(ckpt_path, tmp_path / "bad.safetensors", **changes)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(bad)
    msg = str(e.value)
    assert expected in msg and str(bad) in msg, msg


def test_invalid_config_values_are_wrapped(ckpt_path: Path, tmp_path: Path) -> None:
    cfg = preset("tiny").to_dict()
    cfg["image_size"] = 65  # inconsistent with patch_nums x downsampling -> ConfigError
    bad = _rewrite_meta(ckpt_path, tmp_path / "bad.safetensors", config=json.dumps(cfg))
    with pytest.raises(CheckpointError, match="image_size 65"):
        read_checkpoint(bad)


def test_missing_part(ckpt_path: Path) -> None:
    ckpt = read_checkpoint(ckpt_path)
    with pytest.raises(CheckpointError, match="expected a part 'generator', found parts: encoder, vqvae"):
        load_part(small(), ckpt, "generator")


def test_key_mismatches_are_all_named(ckpt_path: Path) -> None:
    ckpt = read_checkpoint(ckpt_path)
    other = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(3), nn.Linear(2, 2))
    with pytest.raises(CheckpointError) as e:
        load_part(other, ckpt, "encoder")
    msg = str(e.value)
    assert str(ckpt_path) in msg
    assert "missing keys (2): 2.weight, 2.bias" in msg
    assert "mis-shaped keys (2): 0.weight: expected (5, 4), found (3, 4); 0.bias: expected (5,), found (3,)" in msg
    assert "unexpected keys" not in msg

    fewer = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(2\): 1\.bias, 1\.weight"):
        load_part(fewer, ckpt, "encoder")


def test_non_strict_allows_missing_and_unexpected_but_not_misshaped(ckpt_path: Path) -> None:
    ckpt = read_checkpoint(ckpt_path)
    bigger = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 1))
    load_part(bigger, ckpt, "encoder", strict=False)
    assert torch.equal(bigger[0].weight, small(1)[0].weight)
    misshaped = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_part(misshaped, ckpt, "encoder", strict=False)


def test_long_key_lists_are_truncated() -> None:
    ckpt = Checkpoint(cfg=preset("tiny"), parts={"vqvae": {f"w{i}": torch.zeros(1) for i in range(25)}})
    with pytest.raises(CheckpointError) as e:
        load_part(nn.Module(), ckpt, "vqvae")
    msg = str(e.value)
    assert "unexpected keys (25): w0, w1" in msg and "w9, ... and 15 more" in msg and "w10" not in msg


# ------------------------------------------------------------------------------------------------
# atomic writes


def test_atomic_write_failure_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def failing(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]

    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_atomic_write_success_creates_parents(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out.npy"
    atomic_write(target, lambda tmp: np.save(tmp, np.arange(3)))  # np.save keeps a path ending in .npy
    assert np.array_equal(np.load(target), np.arange(3))
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.npy"]


def test_failed_checkpoint_save_keeps_old_checkpoint(ckpt_path: Path) -> None:
    before = ckpt_path.read_bytes()
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_checkpoint(ckpt_path, preset("tiny"), {"encoder": small()}, extra={"bad": object()})
    assert ckpt_path.read_bytes() == before


def test_write_json(tmp_path: Path) -> None:
    path = write_json(tmp_path / "sub" / "r.json", {"b": 1, "a": [1.5, "x"]})
    assert path.read_text().endswith("\n")
    assert json.loads(path.read_text()) == {"b": 1, "a": [1.5, "x"]}


# ------------------------------------------------------------------------------------------------
# voxels


def test_read_npy_2d_and_1d(tmp_path: Path) -> None:
    data = np.arange(12, dtype=np.float64).reshape(3, 4)
    np.save(tmp_path / "v.npy", data)
    v = read_voxels(tmp_path / "v.npy")
    assert v.dtype == np.float32 and v.shape == (3, 4) and np.array_equal(v, data)
    np.save(tmp_path / "one.npy", np.arange(5, dtype=np.int16))
    assert read_voxels(tmp_path / "one.npy").shape == (1, 5)


def test_read_npz_keys(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", voxels=np.ones((2, 3)), other=np.zeros(4))
    assert read_voxels(tmp_path / "a.npz").shape == (2, 3)
    assert read_voxels(tmp_path / "a.npz", key="other").shape == (1, 4)
    np.savez(tmp_path / "only.npz", betas=np.ones((2, 6)))
    assert read_voxels(tmp_path / "only.npz").shape == (2, 6)
    with pytest.raises(InputError, match="expected array 'nope', found arrays: voxels, other"):
        read_voxels(tmp_path / "a.npz", key="nope")
    np.savez(tmp_path / "two.npz", x=np.ones(2), y=np.ones(2))
    with pytest.raises(InputError, match="found arrays: x, y"):
        read_voxels(tmp_path / "two.npz")


def test_read_voxels_keeps_nan(tmp_path: Path) -> None:
    data = np.ones((3, 4), dtype=np.float32)
    data[1, 2] = np.nan
    data[2, 0] = np.inf
    np.save(tmp_path / "v.npy", data)
    v = read_voxels(tmp_path / "v.npy")
    assert np.isnan(v[1, 2])
    assert finite_rows(v).tolist() == [True, False, False]


def test_read_voxels_errors(tmp_path: Path) -> None:
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4)))
    with pytest.raises(InputError, match=r"found 3-D shape \(2, 3, 4\)") as e:
        read_voxels(tmp_path / "cube.npy")
    assert str(tmp_path / "cube.npy") in str(e.value)

    with pytest.raises(InputError, match="no such file"):
        read_voxels(tmp_path / "missing.npy")

    (tmp_path / "v.csv").write_text("1,2,3\n")
    with pytest.raises(InputError, match=r"ending in \.npy, \.npz, \.h5, \.hdf5, found '\.csv'"):
        read_voxels(tmp_path / "v.csv")

    np.save(tmp_path / "s.npy", np.array(["a", "b"]))
    with pytest.raises(InputError, match="found dtype <U1"):
        read_voxels(tmp_path / "s.npy")

    np.save(tmp_path / "b.npy", np.array([True, False]))
    with pytest.raises(InputError, match="found dtype bool"):
        read_voxels(tmp_path / "b.npy")

    (tmp_path / "junk.npy").write_bytes(os.urandom(100))
    with pytest.raises(InputError, match="corrupt"):
        read_voxels(tmp_path / "junk.npy")

    (tmp_path / "junk.npz").write_bytes(os.urandom(100))
    with pytest.raises(InputError, match="corrupt"):
        read_voxels(tmp_path / "junk.npz")

    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="corrupt"):
        read_voxels(tmp_path / "obj.npy")

    np.save(tmp_path / "empty.npy", np.zeros((0, 4)))
    with pytest.raises(InputError, match=r"found shape \(0, 4\)"):
        read_voxels(tmp_path / "empty.npy")

    with pytest.raises(InputError, match="found shape"):
        finite_rows(np.zeros(3))


def test_read_h5(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["voxels"] = np.ones((2, 3))
        f["grp/betas"] = np.zeros((4, 5))
    assert read_voxels(tmp_path / "v.h5").shape == (2, 3)
    assert read_voxels(tmp_path / "v.h5", key="grp/betas").shape == (4, 5)
    with pytest.raises(InputError, match="nope"):
        read_voxels(tmp_path / "v.h5", key="nope")
    (tmp_path / "junk.hdf5").write_bytes(os.urandom(100))
    with pytest.raises(InputError, match="corrupt"):
        read_voxels(tmp_path / "junk.hdf5")


def test_read_h5_without_h5py(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "h5py", None)  # makes `import h5py` raise ImportError
    (tmp_path / "v.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    with pytest.raises(InputError, match="pip install h5py") as e:
        read_voxels(tmp_path / "v.h5")
    assert "train" in str(e.value)


# ------------------------------------------------------------------------------------------------
# images


def test_save_png_deterministic_and_exact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    img = torch.rand(3, 5, 7)
    img[0, 0, 0], img[1, 0, 0], img[2, 0, 0] = -0.5, 1.5, 0.5  # clamped, clamped, 127.5 -> 128
    a, b = save_png(tmp_path / "a.png", img), save_png(tmp_path / "b.png", img.clone())
    assert a.read_bytes() == b.read_bytes()
    assert png_bytes(img.numpy()) == a.read_bytes()
    with Image.open(a) as im:
        assert im.mode == "RGB" and im.size == (7, 5)
        assert not im.info or set(im.info) <= {"dpi"}  # no text chunks or timestamps
        pixels = np.asarray(im)
    expected = np.rint(img.clamp(0, 1).numpy() * np.float32(255)).astype(np.uint8).transpose(1, 2, 0)
    assert np.array_equal(pixels, expected)
    assert pixels[0, 0].tolist() == [0, 255, 128]
    with pytest.raises(ValueError, match=r"found \(4, 5, 7\)"):
        save_png(tmp_path / "c.png", torch.zeros(4, 5, 7))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]


def test_save_grid_png(tmp_path: Path) -> None:
    red = torch.zeros(3, 4, 4)
    red[0] = 1
    gray = np.full((1, 2, 3), 0.5, dtype=np.float32)
    path = save_grid_png(tmp_path / "grid.png", [[red, red], [gray]], pad=1, pad_value=0.0)
    pixels = np.asarray(Image.open(io.BytesIO(path.read_bytes())))
    assert pixels.shape == (1 + 4 + 1 + 4 + 1, 1 + 4 + 1 + 4 + 1, 3)
    assert pixels[1, 1].tolist() == [255, 0, 0] and pixels[1, 6].tolist() == [255, 0, 0]
    assert pixels[0, 0].tolist() == [0, 0, 0]
    assert pixels[6, 1].tolist() == [128, 128, 128]  # gray repeated to RGB
    assert pixels[6 + 3, 1].tolist() == [0, 0, 0]  # below the smaller image: fill
