"""Evaluation: weight files, best-of-N selection and the evaluate command, with random-weight networks saved as
the local files the suite reads (the full network suite on identical / shuffled images: test_evaluate_networks.py).

Best-of-N selection must follow the brain-predicted embedding (pooled.npy) unless the oracle is asked for, and the
results must say which it used.
"""

import json

import numpy as np
import pytest
import torch

from mindhier_rt.errors import InputError
from mindhier_rt.evaluate import EvalSuite, match_rows, select_best_of_n
from mindhier_rt.feature_networks import NETWORKS, load_network

TINY_CLIP = "mh-tiny-clip"  # a small open_clip ViT registered for these tests; its embedding is 32 wide (tiny preset)


def register_tiny_clip(folder) -> None:
    """Make the open_clip model name TINY_CLIP known (a config file in ``folder``)."""
    open_clip = pytest.importorskip("open_clip")
    (folder / f"{TINY_CLIP}.json").write_text(
        json.dumps(
            {
                "embed_dim": 32,
                "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
            }
        )
    )
    open_clip.add_model_config(folder)


def save_random_weights(folder, networks) -> None:
    """Random-init networks (torchvision / open_clip constructors, weights=None) saved as the suite's files."""
    pytest.importorskip("torchvision")
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    for name in networks:
        if name == "clip":
            torch.save(open_clip.create_model(TINY_CLIP).state_dict(), folder / f"{TINY_CLIP}.pt")
        else:
            torch.save(NETWORKS[name].build().state_dict(), folder / NETWORKS[name].files[0])


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    register_tiny_clip(tmp_path_factory.mktemp("clip_cfg"))
    d = tmp_path_factory.mktemp("weights")
    save_random_weights(d, ["clip", "effnet", "swav"])
    return d


def test_missing_weights_name_the_expected_files(tmp_path):
    with pytest.raises(InputError) as e:
        EvalSuite(tmp_path, metrics=["alexnet2", "swav", "clip"])
    msg = str(e.value)
    for name in ("alexnet.pth", "alexnet-owt-7be5be79.pth", "swav_resnet50.pth", "ViT-L-14.pt"):
        assert name in msg
    assert "effnet" not in msg  # only what the chosen metrics need
    EvalSuite(tmp_path, metrics=["pixcorr", "ssim"])  # needs no weights
    with pytest.raises(InputError, match="expected metrics among"):
        EvalSuite(tmp_path, metrics=["fid"])


def test_weights_of_the_wrong_network_are_refused(weights_dir, tmp_path):
    with pytest.raises(InputError, match="expected the weights of torchvision's inception"):
        load_network(NETWORKS["inception"], weights_dir / NETWORKS["effnet"].files[0])
    bad = tmp_path / "alexnet.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="unreadable file"):
        load_network(NETWORKS["alexnet"], bad)
    # the published SwAV file: "module." prefixes, projection head and prototypes, no fc
    published = torch.load(weights_dir / "swav_resnet50.pth")
    state = {f"module.{k}": v for k, v in published.items() if not k.startswith("fc.")}
    state["module.prototypes.weight"] = torch.zeros(3, 2)
    torch.save(state, tmp_path / "swav_800ep_pretrain.pth.tar")
    load_network(NETWORKS["swav"], tmp_path / "swav_800ep_pretrain.pth.tar")


def test_best_of_n_and_row_matching():
    cand = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    assert select_best_of_n(cand, torch.tensor([[0.1, 1.0], [2.0, 0.1]])).tolist() == [1, 0]
    assert select_best_of_n(cand, torch.tensor([[1.0, 1.0], [-1.0, 0.0]])).tolist() == [2, 2]
    table = np.random.default_rng(0).standard_normal((6, 40)).astype(np.float32)
    assert match_rows(table[[4, 0, 5]], table).tolist() == [4, 0, 5]
    with pytest.raises(InputError, match="scan row 1 matching none"):
        match_rows(np.stack([table[2], table[3] + 0.01]), table)


def test_evaluate_command_selects_with_the_brain_unless_the_oracle_is_asked(cli, tmp_path, tiny_ckpt, weights_dir):
    from mindhier_rt.config import preset
    from mindhier_rt.data import make_synthetic, open_dataset, write_dataset
    from mindhier_rt.feature_networks import ClipFeatures

    subjects = preset("tiny").encoder.subjects
    data = write_dataset(make_synthetic(subjects, n_train=4, n_test=4, repeats=2, size=32), tmp_path / "data")
    voxels, index = open_dataset(data).split("subj01", "test")
    np.savez(tmp_path / "test.npz", voxels=voxels[::-1], image_index=index[::-1])  # any order: rows are matched
    recon = tmp_path / "recon"
    code, _, err = cli(
        "decode", "--ckpt", tiny_ckpt, "--fmri", tmp_path / "test.npz", "--subject", "subj01", "--out", recon,
        "--samples", "3", "--backend", "torch",
    )  # fmt: skip
    assert code == 0, err
    pooled = np.load(recon / "pooled.npy")
    assert pooled.shape == (4, 32) and np.isfinite(pooled).all()
    args = ["evaluate", "--recon", recon, "--data", data, "--subject", "subj01", "--weights-dir", weights_dir]
    args += ["--metrics", "pixcorr,ssim,clip,retrieval", "--clip-model", TINY_CLIP]
    code, out, err = cli(*args, "--json", tmp_path / "brain.json")
    assert code == 0, err
    brain = json.loads((tmp_path / "brain.json").read_text())
    assert brain["selection"]["method"] == "brain-clip" and not brain["oracle_best_of_n"]
    assert brain["n_images"] == 4 and brain["samples_per_scan"] == 3 and "ORACLE" not in err
    assert set(brain["metrics"]) == {"pixcorr", "ssim", "clip"}
    assert brain["image_index"] == index[::-1].tolist()  # scan order, each matched to its test image
    assert brain["retrieval"]["n_way"] == 4 and 0 <= brain["retrieval"]["image_top1"] <= 1
    assert "CLIP" in out and "retrieval" in out

    code, _, err = cli(*args, "--json", tmp_path / "oracle.json", "--oracle-best-of-n")
    assert code == 0, err
    oracle = json.loads((tmp_path / "oracle.json").read_text())
    assert oracle["oracle_best_of_n"] and oracle["selection"]["method"] == "oracle-ground-truth"
    assert "ORACLE" in oracle["selection"]["note"] and "ORACLE" in err

    # the default selection follows pooled.npy: point it at sample 2 of every scan, and sample 2 is kept
    clip = ClipFeatures(weights_dir / f"{TINY_CLIP}.pt", TINY_CLIP)
    from PIL import Image

    s2 = np.stack([np.asarray(Image.open(recon / f"scan{k:05d}_s2.png"), np.float32) / 255 for k in range(4)])
    np.save(recon / "pooled.npy", clip.pooled(torch.from_numpy(s2.transpose(0, 3, 1, 2).copy())).numpy())
    code, _, err = cli(*args, "--json", tmp_path / "steered.json")
    assert code == 0, err
    assert json.loads((tmp_path / "steered.json").read_text())["selection"]["chosen_samples"] == [2, 2, 2, 2]

    code, _, err = cli(*args[:-4], "--metrics", "pixcorr", "--subject", "subj02")
    assert code == 1 and "reconstructions of subj02, found subj01" in err
