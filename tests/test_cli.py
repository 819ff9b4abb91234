"""The command line: info, init, decode, and one-line errors with a non-zero exit."""

import json
import subprocess
import sys

import numpy as np
import pytest


def test_info_json_reference_sizes(cli):
    code, out, _ = cli("info", "--preset", "mindhier-512", "--json")
    assert code == 0
    report = json.loads(out)
    params = report["params"]
    for key, reference in [("generator", 2.32e9), ("vqvae", 108.9e6), ("encoder", 307e6)]:
        assert abs(params[key] - reference) / reference < 0.015, (key, params[key])
    assert report["schedule"]["total_tokens"] == 2240
    assert report["config"]["generator"]["depth"] == 30 and report["config"]["generator"]["width"] == 1920
    assert report["schedule"]["level_of_scale"] == [4, 4, 4, 3, 3, 2, 2, 2, 1, 1]


@pytest.mark.parametrize("name", ["tiny", "small", "mindhier-256"])
def test_info_every_preset(cli, name):
    code, out, _ = cli("info", "--preset", name)
    assert code == 0 and "parameters" in out


@pytest.fixture()
def voxel_file(tmp_path):
    v = np.random.default_rng(0).standard_normal((4, 96)).astype(np.float32)
    v[2, 5] = np.nan
    path = tmp_path / "scans.npy"
    np.save(path, v)
    return path


def test_decode_is_deterministic_and_skips_bad_scans(cli, tmp_path, tiny_ckpt, voxel_file):
    def decode(out, seed):
        return cli("decode", "--ckpt", tiny_ckpt, "--fmri", voxel_file, "--subject", "subj01",
            "--out", out, "--samples", "2", "--seed", seed,
        )  # fmt: skip

    code, _, err = decode(tmp_path / "a", 7)
    assert code == 0 and "scan 2" in err and "NaN" in err
    pngs = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert pngs == [f"scan{i:05d}_s{s}.png" for i in (0, 1, 3) for s in (0, 1)]
    report = json.loads((tmp_path / "a" / "decode.json").read_text())
    assert report["skipped"] == [{"scan": 2, "reason": "NaN or inf voxels"}]
    decode(tmp_path / "b", 7)
    decode(tmp_path / "c", 8)
    for name in pngs:
        same = (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        other = (tmp_path / "a" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()
        assert same and not other, name
    assert not list((tmp_path / "a").glob(".*"))  # no temp files left behind


def test_decode_bad_inputs_give_one_line(cli, tmp_path, tiny_ckpt, voxel_file):
    cases = [
        (["--subject", "subj02"], "expects 80 voxels per scan, got 96"),
        (["--subject", "subj09"], "unknown subject 'subj09'"),
    ]
    for extra, message in cases:
        code, _, err = cli("decode", "--ckpt", tiny_ckpt, "--fmri", voxel_file, "--out", tmp_path / "o", *extra)
        assert code == 1 and message in err and "Traceback" not in err
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(tiny_ckpt.read_bytes()[:1000])
    for ckpt in (tmp_path / "missing.safetensors", corrupt):
        code, _, err = cli("decode", "--ckpt", ckpt, "--fmri", voxel_file, "--subject", "subj01",
            "--out", tmp_path / "o",
        )  # fmt: skip
        assert code == 1 and err.startswith("error: ") and err.count("\n") == 1
    code, _, err = cli("info", "--preset", "nope")
    assert code == 1 and "known presets" in err


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mindhier_rt.cli", "info", "--preset", "nope"], capture_output=True, text=True
    )
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: unknown preset")
    assert "Traceback" not in proc.stderr


def test_init_then_decode_all_nan_fails(cli, tmp_path):
    ckpt = tmp_path / "bc.safetensors"
    code, _, _ = cli("init", "--out", ckpt, "--attn-mode", "block_causal")
    assert code == 0 and ckpt.exists()
    bad = tmp_path / "bad.npy"
    np.save(bad, np.full((2, 96), np.nan, dtype=np.float32))
    code, _, err = cli("decode", "--ckpt", ckpt, "--fmri", bad, "--subject", "subj01", "--out", tmp_path / "o")
    assert code == 1 and err.count("skipped") == 2


def test_decode_with_another_context_map(cli, tmp_path, tiny_ckpt, voxel_file):
    """--context-map overrides a checkpoint's map (recorded in decode.json); a bundle's map is fixed at export."""
    args = ["decode", "--ckpt", tiny_ckpt, "--fmri", voxel_file, "--subject", "subj01", "--seed", "3"]
    assert cli(*args, "--out", tmp_path / "train")[0] == 0
    code, _, err = cli(*args, "--out", tmp_path / "ref", "--context-map", "reference-pipeline")
    assert code == 0, err
    reports = {m: json.loads((tmp_path / m / "decode.json").read_text()) for m in ("train", "ref")}
    assert reports["train"]["context_map"] == "training" and reports["ref"]["context_map"] == "reference-pipeline"
    code, _, err = cli(*args, "--out", tmp_path / "bad", "--context-map", "inference")
    assert code != 0 and "context map must be one of training, reference-pipeline" in err
    code, _, err = cli("decode", "--engine", tmp_path, "--fmri", voxel_file, "--subject", "subj01",
                       "--out", tmp_path / "e", "--context-map", "training")  # fmt: skip
    assert code != 0 and "a bundle's map is fixed at export" in err
