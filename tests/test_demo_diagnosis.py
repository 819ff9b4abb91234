"""The demo diagnosis (`benchmarks/demo_diagnosis.py`): its read-outs and its noise-free scans."""

from __future__ import annotations

import json

import numpy as np
import pytest
from benchmark_scripts import load

from mindhier_rt.data.nsd import BrainDataset, write_dataset
from mindhier_rt.data.synthetic import make_synthetic


def test_ridge_read_out_finds_a_linear_class_and_not_noise() -> None:
    diagnosis = load("demo_diagnosis")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 400)
    x = np.eye(3)[y] * 2.0 + rng.normal(size=(400, 3)) * 0.3
    assert diagnosis.ridge_accuracy(x[:300], y[:300], x[300:], y[300:], 3, lam=1.0) > 0.95
    noise = rng.normal(size=(400, 3))
    assert diagnosis.ridge_accuracy(noise[:300], y[:300], noise[300:], y[300:], 3, lam=1.0) < 0.6


def test_noise_free_scans_are_the_signal_in_the_data_set_s_z_scored_units(tmp_path) -> None:
    """With no trial noise the data set's scans are the z-scored signal itself, so the fitted map must give them
    back; with noise, the noise-free scans track the averaged repeats but not their noise."""
    diagnosis = load("demo_diagnosis")
    subjects = [("subj01", 40)]
    for noise, check in ((0.0, "exact"), (1.0, "close")):
        synthetic = make_synthetic(
            subjects, n_train=200, n_test=10, repeats=3, size=16, seed=3, noise_sd={"subj01": noise}
        )
        data = BrainDataset(write_dataset(synthetic, tmp_path / check))
        train = data.split("subj01", "train", average_repeats=False)
        test_vox, test_img = data.split("subj01", "test")
        clean = diagnosis.noise_free_scans(data, "subj01", 3, train, test_img)
        assert clean.shape == test_vox.shape and clean.dtype == np.float32
        if check == "exact":
            # the stored stimuli are 8-bit, the signal came from floats
            np.testing.assert_allclose(clean, test_vox, atol=0.03)
        else:
            assert np.corrcoef(clean.ravel(), test_vox.ravel())[0, 1] > 0.6
            assert np.abs(clean - test_vox).mean() > 0.1  # the averaged repeats keep some noise; these do not


def test_a_folder_without_its_synthetic_seed_is_refused_before_anything_is_read(tmp_path) -> None:
    diagnosis = load("demo_diagnosis")
    synthetic = make_synthetic([("subj01", 20)], n_train=20, n_test=2, repeats=1, size=16, seed=1)
    meta_path = write_dataset(synthetic, tmp_path / "run" / "data") / "dataset.json"
    meta = json.loads(meta_path.read_text())
    del meta["seed"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match="not a synthetic set with its seed"):
        diagnosis.main(["--run", str(tmp_path / "run"), "--results", str(tmp_path / "results")])
    with pytest.raises(SystemExit, match="--train-trials must be at least 1"):  # a negative slice would drop trials
        diagnosis.main(["--run", str(tmp_path / "run"), "--train-trials", "-5", "--results", str(tmp_path / "results")])
    assert not (tmp_path / "results").exists()


def test_given_scales_decode_is_the_round_trip_with_all_and_the_decode_loop_with_none() -> None:
    import torch

    from mindhier_rt.config import preset
    from mindhier_rt.models.mindhier import MindHier
    from mindhier_rt.pipeline import reconstruct
    from mindhier_rt.runtime.torch_backend import TorchBackend
    from mindhier_rt.sampling import SamplingConfig

    diagnosis = load("demo_diagnosis")
    models = MindHier.from_config(preset("tiny"), seed=0).eval()
    with torch.no_grad():
        models.generator.head.weight.mul_(8.0)  # peaked logits: the draws depend on the condition
    backend, cfg = TorchBackend(models), models.cfg
    g = torch.Generator().manual_seed(0)
    voxels = torch.randn(3, cfg.encoder.voxel_count("subj01"), generator=g)
    sampling = SamplingConfig(cfg_scale=2.0, top_k=5, seed=4)
    tokens = [torch.randint(cfg.vocab_size, (3, n), generator=g) for n in cfg.schedule.token_counts]
    with torch.no_grad():
        round_trip = models.vqvae.fhat_to_img(models.vqvae.idx_to_fhat(tokens))
    assert torch.equal(diagnosis.decode_given_scales(backend, voxels, "subj01", sampling, tokens), round_trip)
    drawn = reconstruct(backend, voxels, "subj01", sampling).images_NS3HW[:, 0]
    assert torch.equal(diagnosis.decode_given_scales(backend, voxels, "subj01", sampling, []), drawn)
    partly = diagnosis.decode_given_scales(backend, voxels, "subj01", sampling, tokens[:2])
    assert not torch.equal(partly, drawn) and not torch.equal(partly, round_trip)


def test_clean_condition_refuses_a_checkpoint_without_demo_settings(tmp_path) -> None:
    from mindhier_rt.config import preset
    from mindhier_rt.models.mindhier import MindHier

    diagnosis = load("demo_diagnosis")
    path = tmp_path / "model.safetensors"
    MindHier.from_config(preset("tiny"), seed=0).save(path)
    with pytest.raises(SystemExit, match="records no demo settings"):
        diagnosis.run_settings(path)
    MindHier.from_config(preset("tiny"), seed=0).save(path, extra={"demo": {"seed": 3, "not_a_setting": 1}})
    with pytest.raises(SystemExit, match="records no demo settings"):
        diagnosis.run_settings(path)
    MindHier.from_config(preset("tiny"), seed=0).save(path, extra={"demo": {"seed": 3, "stage2_steps": "7"}})
    with pytest.raises(SystemExit, match="stage2_steps='7', not a int"):
        diagnosis.run_settings(path)
    MindHier.from_config(preset("tiny"), seed=0).save(path, extra={"demo": {"seed": 3, "stage2_steps": 7}})
    settings = diagnosis.run_settings(path)
    assert (settings.seed, settings.stage2_steps) == (3, 7)

    # a run folder whose checkpoint was trained for another seed than its data is refused before any read-out
    synthetic = make_synthetic([("subj01", 20)], n_train=20, n_test=2, repeats=1, size=16, seed=1)
    write_dataset(synthetic, tmp_path / "run" / "data")
    path.rename(tmp_path / "run" / "model.safetensors")
    with pytest.raises(SystemExit, match="demo seed 3 is not its data's 1"):
        diagnosis.main(["--run", str(tmp_path / "run"), "--results", str(tmp_path / "results"), "--clean-condition"])
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_diagnosis_runs_on_a_tiny_demo_folder(tmp_path) -> None:
    from mindhier_rt.demo import DemoSettings, run_demo

    settings = DemoSettings(n_train=48, n_test=6, repeats=2, vq_steps=2, stage1_steps=2, stage2_steps=2,
                            probe_images=64, probe_steps=2, batch_size=8)  # fmt: skip
    run_demo(tmp_path / "demo", settings, progress=False)
    diagnosis = load("demo_diagnosis")
    diagnosis.main(["--run", str(tmp_path / "demo"), "--train-trials", "40", "--results", str(tmp_path / "results"),
                    "--clean-condition"])  # fmt: skip
    report = json.loads((tmp_path / "results" / "demo_diagnosis_seed0.json").read_text())
    clean = report["clean_condition"]
    assert clean["stage2_steps"] == 2 and set(clean) == {
        "stage2_steps", "the test stimuli's teacher features", "measured scans"
    }  # fmt: skip
    assert "--clean-condition" in report["command"]
    assert set(report["voxels"]) == set(report["encoder"]) == {"category", "colour", "position", "size"}
    assert "noise-free scans, demo sampling" in report["decode"] and report["n_test"] == 6
    assert sorted(map(int, report["given_scales"])) == list(range(1, 6))  # the demo preset has 6 scales
    assert sorted(map(int, report["vq_first_scales"])) == list(range(1, 6))
    levels = report["encoder_levels"]  # 4 levels; under coarse-to-fine the deepest is read by the coarsest scales
    assert sorted(map(int, levels)) == [1, 2, 3, 4] and levels["4"]["read_by_scales"] == [1, 2]
    assert sorted(s for v in levels.values() for s in v["read_by_scales"]) == list(range(1, 7))
    assert (tmp_path / "results" / "demo_diagnosis_seed0.md").read_text().startswith("# Where the demo loses")
