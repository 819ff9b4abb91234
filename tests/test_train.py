"""Training: losses against direct formulas, loss goes down, resume is exact, the demo runs end to end."""

import json

import numpy as np
import pytest
import torch

from mindhier_rt.config import preset
from mindhier_rt.data.synthetic import make_synthetic
from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.train.loop import TrainConfig
from mindhier_rt.train.losses import hierarchical_mse, soft_clip_loss, token_cross_entropy
from mindhier_rt.train.stages import TrialSet, train_stage1, train_stage2, train_vqvae
from mindhier_rt.train.teacher import HashTextTeacher, RandomViTTeacher


def test_soft_clip_matches_the_direct_formula():
    torch.manual_seed(0)
    preds, targets, tau = torch.randn(5, 3, 4), torch.randn(5, 3, 4), 0.05
    p = [v / v.norm() for v in preds.flatten(1)]
    t = [v / v.norm() for v in targets.flatten(1)]
    n = len(p)
    total = 0.0
    for i in range(n):
        tt = torch.tensor([float(t[i] @ t[j]) / tau for j in range(n)])
        q = torch.softmax(tt, 0)  # soft targets of row i (t t^T is symmetric)
        pt = torch.log_softmax(torch.tensor([float(p[i] @ t[j]) / tau for j in range(n)]), 0)
        tp = torch.log_softmax(torch.tensor([float(t[i] @ p[j]) / tau for j in range(n)]), 0)
        total += -(q * pt).sum() - (q * tp).sum()
    expected = 0.5 * total / n
    assert torch.allclose(soft_clip_loss(preds, targets, tau), expected, atol=1e-5)
    # identical, well separated inputs give (almost) the entropy floor: lower than for random pairs
    assert soft_clip_loss(targets, targets, tau) < soft_clip_loss(preds, targets, tau)


def test_hierarchical_mse_and_level_mask():
    torch.manual_seed(0)
    a, b = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6)
    direct = sum(
        ((a[:, m].flatten(1) / a[:, m].flatten(1).norm(dim=1, keepdim=True))
         - (b[:, m].flatten(1) / b[:, m].flatten(1).norm(dim=1, keepdim=True))).pow(2).sum(1).mean()
        for m in range(4)
    )  # fmt: skip
    assert torch.allclose(hierarchical_mse(a, b), direct, atol=1e-5)
    terminal_only = hierarchical_mse(a, b, torch.tensor([0.0, 0.0, 0.0, 1.0]))
    assert torch.allclose(terminal_only, hierarchical_mse(a[:, 3:], b[:, 3:]), atol=1e-6)
    assert hierarchical_mse(a, a * 3.0) < 1e-6  # scale invariant


def test_token_cross_entropy_is_the_mean_over_tokens():
    logits = torch.randn(2, 7, 11)
    idx = torch.randint(11, (2, 7))
    direct = -torch.log_softmax(logits, -1).gather(-1, idx[..., None]).mean()
    assert torch.allclose(token_cross_entropy(logits, idx), direct, atol=1e-6)


def test_teacher_taps_follow_the_layer_map():
    cfg = preset("demo")
    teacher = RandomViTTeacher(cfg, seed=0)
    assert len(teacher.blocks) == max(cfg.schedule.clip_layers) == 24
    assert teacher.taps == (12, 16, 20, 24)
    imgs = torch.rand(3, 3, cfg.image_size, cfg.image_size)
    levels = teacher.image_levels(imgs)
    assert levels.shape == (3, 4, cfg.context_tokens, cfg.context_dim)
    assert torch.equal(levels, RandomViTTeacher(cfg, seed=0).image_levels(imgs))  # deterministic weights
    assert not torch.allclose(levels[:, 0], levels[:, 3])
    text = HashTextTeacher(cfg).text_tokens(["a red disk", "a blue cross", "a red disk"])
    assert text.shape == (3, cfg.encoder.text_tokens, cfg.context_dim) and torch.equal(text[0], text[2])


@pytest.fixture(scope="module")
def small_set():
    cfg = preset("demo")
    ds = make_synthetic(cfg.encoder.subjects, n_train=48, n_test=8, repeats=2, size=cfg.image_size, seed=1)
    images = torch.from_numpy(ds.images)
    trials = []
    for subject, (voxels, image_index, split) in ds.trials.items():
        keep = split == 0
        trials.append(TrialSet(subject, torch.from_numpy(voxels[keep]), torch.from_numpy(image_index[keep])))
    return cfg, images, trials


def _first_last(records):
    return records[0]["loss"], records[-1]["loss"]


def test_each_stage_lowers_its_loss(small_set, tmp_path):
    cfg, images, trials = small_set
    models = MindHier.from_config(cfg, seed=0)
    tc = dict(batch_size=16, seed=0, log_every=1, warmup_frac=0.2)
    vq = train_vqvae(models, images, TrainConfig(steps=25, lr=3e-3, **tc), tmp_path, progress=False)
    teacher = RandomViTTeacher(cfg)
    levels = teacher.image_levels(images)
    text = HashTextTeacher(cfg).text_tokens([f"caption {i % 5}" for i in range(len(images))])
    s1 = train_stage1(models, trials, levels, text, TrainConfig(steps=25, lr=3e-3, **tc), tmp_path, progress=False)
    s2 = train_stage2(models, trials, images, TrainConfig(steps=25, lr=3e-3, **tc), tmp_path, progress=False)
    for records in (vq, s1, s2):
        first = np.mean([r["loss"] for r in records[:3]])
        last = np.mean([r["loss"] for r in records[-3:]])
        assert last < 0.9 * first, (records[0]["stage"], first, last)
    log_lines = (tmp_path / "stage2.log.jsonl").read_text().splitlines()
    assert len(log_lines) == 25 and json.loads(log_lines[-1])["step"] == 25


def test_stage2_trains_on_given_conditions_in_place_of_the_encoder_s(small_set, tmp_path):
    """``conditions`` equal to the encoder's outputs train exactly what the encoder would; other conditions (the
    teacher's features of the images) train other weights; a condition count that is not one per trial is refused."""
    from mindhier_rt.models.encoder import EncoderOutput
    from mindhier_rt.train.stages import encode_all

    cfg, images, trials = small_set
    tcfg = TrainConfig(steps=3, batch_size=8, lr=3e-3, seed=0, log_every=1)

    def trained(name: str, conditions=None) -> dict[str, torch.Tensor]:
        models = MindHier.from_config(cfg, seed=0)
        train_stage2(models, trials, images, tcfg, tmp_path / name, progress=False, conditions=conditions)
        return models.generator.state_dict()

    reference = MindHier.from_config(cfg, seed=0)
    encoded = [encode_all(reference, ts) for ts in trials]
    levels = RandomViTTeacher(cfg).image_levels(images)
    features = [EncoderOutput.from_levels(levels[ts.image_index_n], torch.empty(0)) for ts in trials]
    plain, same, other = trained("plain"), trained("same", encoded), trained("teacher", [
        (f.pooled_BD, f.context_BSD()) for f in features
    ])  # fmt: skip
    assert all(torch.equal(plain[k], same[k]) for k in plain)
    assert not all(torch.equal(plain[k], other[k]) for k in plain)
    with pytest.raises(ValueError, match="one condition"):
        trained("short", [(p[:-1], c[:-1]) for p, c in encoded])
    with pytest.raises(ValueError, match="one condition"):
        trained("short context", [(p, c[:-1]) for p, c in encoded])
    with pytest.raises(ValueError, match="one condition"):  # the context's width is not the generator's
        trained("narrow context", [(p, c[..., :-1]) for p, c in encoded])


def test_resume_gives_the_same_weights(small_set, tmp_path, monkeypatch):
    import mindhier_rt.train.loop as loop

    cfg, images, trials = small_set
    teacher_levels = RandomViTTeacher(cfg).image_levels(images)
    text = HashTextTeacher(cfg).text_tokens(["x"] * len(images))
    tcfg = TrainConfig(steps=8, batch_size=8, lr=1e-3, seed=0, save_every=4, log_every=1)

    straight = MindHier.from_config(cfg, seed=0)
    train_stage1(straight, trials, teacher_levels, text, tcfg, tmp_path / "a", resume=False, progress=False)

    class Interrupted(Exception):
        pass

    save_state = loop.save_state

    def save_then_crash(*args, **kwargs):
        save_state(*args, **kwargs)
        raise Interrupted  # the process dies right after the step-4 state is written

    cut = MindHier.from_config(cfg, seed=0)
    monkeypatch.setattr(loop, "save_state", save_then_crash)
    with pytest.raises(Interrupted):
        train_stage1(cut, trials, teacher_levels, text, tcfg, tmp_path / "b", resume=True, progress=False)
    monkeypatch.setattr(loop, "save_state", save_state)
    resumed = MindHier.from_config(cfg, seed=123)  # other init: every weight must come from the state file
    train_stage1(resumed, trials, teacher_levels, text, tcfg, tmp_path / "b", resume=True, progress=False)
    for key, value in straight.encoder.state_dict().items():
        assert torch.equal(value, resumed.encoder.state_dict()[key]), key  # bit-identical
    log = [json.loads(line) for line in (tmp_path / "b" / "stage1.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))


def test_demo_on_a_reduced_setting(tmp_path):
    from mindhier_rt.demo import DemoSettings, run_demo

    settings = DemoSettings(n_train=40, n_test=6, repeats=2, vq_steps=3, stage1_steps=3, stage2_steps=3, batch_size=8)
    metrics = run_demo(tmp_path, settings, progress=False)
    for key in ("pixcorr", "ssim", "two_way_pixel", "two_way_feature", "n_test", "backend", "seconds"):
        assert key in metrics
    assert metrics["n_test"] == 6 and 0 <= metrics["two_way_pixel"] <= 1
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert (tmp_path / "reconstructions.png").stat().st_size > 0
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "data" / "dataset.json").exists()


def test_train_commands_chain_and_resume(cli, tmp_path):
    data = tmp_path / "data"
    assert cli("synth", "--out", data, "--n-train", "24", "--n-test", "4", "--repeats", "2")[0] == 0
    steps = ["--steps", "2", "--batch-size", "4"]
    code, _, err = cli("train", "vqvae", "--data", data, "--out", tmp_path / "vq", *steps)
    assert code == 0, err
    code, _, err = cli("train", "stage2", "--data", data, "--out", tmp_path / "s2", *steps)
    assert code == 1 and "--init" in err  # stage 2 needs the earlier stages' weights
    s1 = ["train", "stage1", "--data", data, "--out", tmp_path / "s1", "--init", tmp_path / "vq" / "model.safetensors"]
    code, _, err = cli(*s1, *steps, "--teacher", "clip", "--clip-weights", tmp_path / "clip.bin")
    assert code == 1 and "257 x 768" in err  # the demo preset is not CLIP-sized
    assert cli(*s1, *steps)[0] == 0
    assert cli(*s1, "--steps", "3", "--batch-size", "4")[0] == 0  # resumes at step 2, runs one more
    log = [json.loads(line) for line in (tmp_path / "s1" / "stage1.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 3]  # logged at the end of each run (log_every is 20)
    code, _, err = cli(
        "train", "stage2", "--data", data, "--out", tmp_path / "s2", "--init", tmp_path / "s1" / "model.safetensors",
        *steps,
    )  # fmt: skip
    assert code == 0, err
    ckpt = MindHier.load(tmp_path / "s2" / "model.safetensors")
    assert ckpt.cfg.name == "demo"


def test_train_command_defaults_are_the_demo_recipe():
    import inspect

    from mindhier_rt import cli
    from mindhier_rt.demo import DemoSettings

    s = DemoSettings()
    for fn, steps, lr in [
        (cli.train_vqvae_cmd, s.vq_steps, s.vq_lr),
        (cli.train_stage1_cmd, s.stage1_steps, s.stage1_lr),
        (cli.train_stage2_cmd, s.stage2_steps, s.stage2_lr),
    ]:
        params = inspect.signature(fn).parameters
        assert (params["steps"].default, params["lr"].default, params["batch_size"].default) == (
            steps, lr, s.batch_size,
        ), fn.__name__  # fmt: skip


@pytest.mark.parametrize("steps", [2, 3, 10, 20])
def test_short_runs_keep_a_valid_one_cycle_schedule(steps, tmp_path):
    """10 steps with a 10 % warm-up once made OneCycleLR divide by zero (a one-step warm-up phase)."""
    from mindhier_rt.train.loop import train_loop

    layer = torch.nn.Linear(2, 1)
    x = torch.randn(8, 2)
    records = train_loop(
        "toy", {"layer": layer}, lambda step: {"loss": layer(x).pow(2).mean()},
        TrainConfig(steps=steps, batch_size=8, lr=1e-2, log_every=1), tmp_path, resume=False, progress=False,
    )  # fmt: skip
    assert len(records) == steps and all(np.isfinite(r["loss"]) for r in records)
