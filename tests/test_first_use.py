"""What a new user meets first: decode with the bundle's own sampling settings, `--help` without PyTorch, `info`
naming the voxel counts, files with the user's umask, evaluate's weights found in the standard caches, no
third-party noise."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mindhier_rt.errors import InputError


def recorded_sampling_copy(bundle_root, tmp_path, **sampling):
    """A copy of a bundle whose manifest records other sampling settings (the manifest holds the files' hashes,
    not its own, so editing this field keeps the bundle valid)."""
    root = tmp_path / "bundle"
    shutil.copytree(bundle_root, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["sampling"].update(sampling)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_decode_uses_the_bundle_s_recorded_sampling_unless_a_flag_overrides(tiny_export, cli, tmp_path):
    _, bundle = tiny_export("scale_local")
    root = recorded_sampling_copy(bundle.root, tmp_path, cfg_scale=2.0, top_k=20, top_p=0.9, seed=5)
    np.save(tmp_path / "scans.npy", np.random.default_rng(0).standard_normal((2, 96)).astype(np.float32))
    common = ["--fmri", tmp_path / "scans.npy", "--subject", "subj01"]
    assert cli("decode", "--engine", root, "--out", tmp_path / "recorded", *common)[0] == 0
    explicit = ["--cfg", "2", "--top-k", "20", "--top-p", "0.9", "--seed", "5"]
    assert cli("decode", "--engine", bundle.root, "--out", tmp_path / "explicit", *common, *explicit)[0] == 0
    assert cli("decode", "--engine", root, "--out", tmp_path / "override", *common, "--seed", "6")[0] == 0
    png = "scan00000.png"
    assert (tmp_path / "recorded" / png).read_bytes() == (tmp_path / "explicit" / png).read_bytes()
    assert (tmp_path / "recorded" / png).read_bytes() != (tmp_path / "override" / png).read_bytes()
    report = json.loads((tmp_path / "recorded" / "decode.json").read_text())
    assert report["sampling"] | {"cfg_stop": None} == {"cfg_scale": 2.0, "cfg_stop": None, "top_k": 20, "top_p": 0.9,
                                                       "greedy": False, "seed": 5}  # fmt: skip
    assert set(report["sampling_source"].values()) == {"recorded"}
    override = json.loads((tmp_path / "override" / "decode.json").read_text())
    assert override["sampling"]["seed"] == 6 and override["sampling_source"]["seed"] == "flag"
    assert override["sampling_source"]["top_k"] == "recorded" and override["sampling"]["top_k"] == 20


def test_cfg_stop_minus_one_means_guidance_everywhere():
    from mindhier_rt.sampling import SamplingConfig, with_overrides

    base = SamplingConfig(cfg_stop=3)
    assert with_overrides(base, cfg_stop=-1)[0].cfg_stop is None
    assert with_overrides(base, cfg_stop=None) == (base, dict.fromkeys(base.to_dict(), "recorded"))


def test_help_answers_without_importing_torch():
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom mindhier_rt.cli import app\n"
        "for args in (['--help'], ['decode', '--help'], ['serve', '--help']):\n"
        "    r = CliRunner().invoke(app, args)\n    assert r.exit_code == 0, r.output\n"
        "print('torch' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "False"


def test_info_names_the_voxel_counts(cli):
    code, out, _ = cli("info", "--preset", "tiny")
    assert code == 0 and "voxels per scan subj01 96, subj02 80" in out
    assert all(len(line) <= 80 for line in cli("info", "--preset", "mindhier-512")[1].splitlines())


def test_written_files_follow_the_umask(cli, tmp_path):
    old = os.umask(0o022)
    try:
        assert cli("init", "--preset", "tiny", "--out", tmp_path / "a.safetensors")[0] == 0
        os.umask(0o077)
        assert cli("init", "--preset", "tiny", "--out", tmp_path / "b.safetensors")[0] == 0
    finally:
        os.umask(old)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o644  # safetensors alone would make 0600
    assert (tmp_path / "b.safetensors").stat().st_mode & 0o777 == 0o600


def test_evaluate_finds_weights_in_the_standard_caches(monkeypatch, tmp_path):
    from mindhier_rt.evaluate import EvalSuite
    from mindhier_rt.feature_networks import NETWORKS, weight_search_path

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / NETWORKS["alexnet"].files[1]).write_bytes(b"published name, torchvision's download")
    snapshot = tmp_path / "hf" / "hub" / "models--timm--vit_large_patch14_clip_224.openai" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(b"open_clip's download")
    suite = EvalSuite(None, ["alexnet2"], need_clip=True)
    assert suite.files["alexnet"] == hub / NETWORKS["alexnet"].files[1]
    assert suite.files["clip"] == snapshot / "open_clip_pytorch_model.bin"
    assert weight_search_path(tmp_path / "mine")[0] == tmp_path / "mine"
    with pytest.raises(InputError, match=r"inception .*looked in .*hub/checkpoints"):
        EvalSuite(None, ["inception"])


def test_torchvision_notices_of_the_onnx_exporter_are_silenced(caplog):
    import mindhier_rt.export.onnx_export  # noqa: F401  (installs the filter)

    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("torchvision is not installed. Skipping %s", "torchvision::nms")
        logger.warning("another warning")
    assert [r.getMessage() for r in caplog.records] == ["another warning"]
