"""Issue 15, training runs and checkpoints: nothing lost (exact resume, atomic state, signals) and nothing let in
(bounded memory on load, NaN refusal, one `error:` line for corrupt state).

Runs are tiny (the demo preset on a few dozen images, a handful of steps); a kill is simulated by raising from a
stage's loss function at a chosen step, the same place a SIGKILL between two saves would leave the run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import signal
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mindhier_rt.train.loop as loop
import mindhier_rt.train.stages as stages
from mindhier_rt.config import preset
from mindhier_rt.data.synthetic import make_synthetic
from mindhier_rt.errors import CheckpointError, TrainingInterrupted
from mindhier_rt.models.mindhier import MindHier, planned_state
from mindhier_rt.train.loop import TrainConfig, train_loop
from mindhier_rt.train.stages import TrialSet, train_stage1, train_stage2, train_vqvae
from mindhier_rt.train.teacher import HashTextTeacher, RandomViTTeacher


class Killed(Exception):
    """Stands for the process dying in the middle of a run."""


@pytest.fixture(scope="module")
def small_set():
    cfg = preset("demo")
    ds = make_synthetic(cfg.encoder.subjects, n_train=24, n_test=4, repeats=2, size=cfg.image_size, seed=3)
    trials = []
    for subject, (voxels, image_index, split) in ds.trials.items():
        keep = split == 0
        trials.append(TrialSet(subject, torch.from_numpy(voxels[keep]), torch.from_numpy(image_index[keep])))
    images = torch.from_numpy(ds.images)
    levels = RandomViTTeacher(cfg).image_levels(images)
    text = HashTextTeacher(cfg).text_tokens([f"caption {i % 3}" for i in range(len(images))])
    return cfg, images, trials, levels, text


def _at_step(monkeypatch, step: int, action) -> None:
    """Run ``action()`` when a stage's loss function is asked for ``step`` (before that step is computed)."""

    def patched(stage, modules, loss_fn, *args, **kwargs):
        def hooked(s: int):
            if s == step:
                action()
            return loss_fn(s)

        return loop.train_loop(stage, modules, hooked, *args, **kwargs)

    monkeypatch.setattr(stages, "train_loop", patched)


def _kill():
    raise Killed


def _log_steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def _without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def _assert_identical(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, f"{len(differ)} of {len(sa)} tensors differ, e.g. {differ[:3]}"


# ------------------------------------------------------------------------------------------------
# nothing lost: exact resume


def test_vqvae_resume_is_bit_identical_with_codebook_restarts(small_set, tmp_path, monkeypatch):
    cfg, images, _, _, _ = small_set
    cfg = dataclasses.replace(cfg, vqvae=dataclasses.replace(cfg.vqvae, ch=8, norm_groups=4))  # a narrower VQ-VAE
    # restarts run at steps 0, 4 and 8; the kill at 7 falls between the saves at 5 and 10, so the resumed run
    # replays 5 and 6 and its step-8 restarts depend on usage statistics accumulated before the kill
    tcfg = TrainConfig(steps=10, batch_size=4, lr=3e-3, seed=0, save_every=5, log_every=1)
    straight = MindHier.from_config(cfg, seed=0)
    records = train_vqvae(straight, images, tcfg, tmp_path / "a", resume=False, progress=False, restart_every=4)
    assert records[8]["restarted"] > 0, "codebook restarts must be active after the resume point"

    cut = MindHier.from_config(cfg, seed=0)
    _at_step(monkeypatch, 7, _kill)
    with pytest.raises(Killed):
        train_vqvae(cut, images, tcfg, tmp_path / "b", progress=False, restart_every=4)
    monkeypatch.undo()
    resumed = MindHier.from_config(cfg, seed=7)  # another init: everything must come from the state file
    again = train_vqvae(resumed, images, tcfg, tmp_path / "b", progress=False, restart_every=4)
    _assert_identical(straight.vqvae, resumed.vqvae)
    assert _without_time(again) == _without_time(records[5:])  # losses, codes used, restarts: the same values


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_kill_between_saves_resumes_bit_identical(small_set, tmp_path, monkeypatch, stage):
    cfg, images, trials, levels, text = small_set
    tcfg = TrainConfig(steps=7, batch_size=8, lr=2e-3, seed=0, save_every=3, log_every=1)

    def run(models: MindHier, folder: Path, resume: bool = True):
        if stage == "stage1":
            return train_stage1(models, trials, levels, text, tcfg, folder, resume=resume, progress=False)
        return train_stage2(models, trials, images, tcfg, folder, resume=resume, progress=False)

    straight = MindHier.from_config(cfg, seed=0)
    run(straight, tmp_path / "a", resume=False)
    _at_step(monkeypatch, 5, _kill)  # steps 0..4 done, saved after step 3
    with pytest.raises(Killed):
        run(MindHier.from_config(cfg, seed=0), tmp_path / "b")
    monkeypatch.undo()
    with safe_open(tmp_path / "b" / f"{stage}.state.safetensors", "pt") as f:
        assert f.metadata()["step"] == "3"
    resumed = MindHier.from_config(cfg, seed=0 if stage == "stage2" else 5)  # stage 2: same frozen models
    if stage == "stage2":
        torch.manual_seed(11)
        for p in resumed.generator.parameters():
            p.data.normal_()  # the trained model's start must come from the state file
    run(resumed, tmp_path / "b")
    trained = "encoder" if stage == "stage1" else "generator"
    _assert_identical(getattr(straight, trained), getattr(resumed, trained))


def _toy(tmp_path: Path, tcfg: TrainConfig, hook=None, resume: bool = True) -> tuple[torch.nn.Module, list[dict]]:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 1)
    x, y = torch.randn(32, 4), torch.randn(32, 1)

    def loss_fn(step: int):
        if hook is not None:
            hook(step)
        rows = torch.from_numpy(loop.batch_rng(tcfg.seed, step).choice(32, 8, replace=False))
        noise = 0.01 * torch.randn(8, 1)  # torch's generator is part of the state too
        return {"loss": (layer(x[rows]) - y[rows] - noise).pow(2).mean()}

    records = train_loop("toy", {"layer": layer}, loss_fn, tcfg, tmp_path, resume=resume, progress=False)
    return layer, records


def test_log_has_each_step_once_after_resume(tmp_path):
    tcfg = TrainConfig(steps=10, batch_size=8, lr=1e-2, save_every=4, log_every=1)

    def kill_at_7(step: int) -> None:
        if step == 7:
            raise Killed

    with pytest.raises(Killed):
        _toy(tmp_path, tcfg, kill_at_7)
    log_path = tmp_path / "toy.log.jsonl"
    assert _log_steps(log_path) == [1, 2, 3, 4, 5, 6, 7]  # logged past the save at 4
    with log_path.open("a") as f:
        f.write('{"stage": "toy", "step": 8, "lo')  # a line cut off by the kill
    layer, records = _toy(tmp_path, tcfg)
    assert _log_steps(log_path) == list(range(1, 11))
    assert [r["step"] for r in records] == [5, 6, 7, 8, 9, 10]
    straight, _ = _toy(tmp_path / "straight", tcfg, resume=False)
    assert torch.equal(layer.weight, straight.weight) and torch.equal(layer.bias, straight.bias)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_save_every_is_honoured(tmp_path, monkeypatch, cli):
    saved: list[int] = []
    real = loop.save_state

    def recording(path, modules, opt, sched, step, *args, **kwargs):
        saved.append(step)
        real(path, modules, opt, sched, step, *args, **kwargs)

    monkeypatch.setattr(loop, "save_state", recording)
    _toy(tmp_path / "toy", TrainConfig(steps=10, batch_size=8, lr=1e-2, save_every=3, log_every=5))
    assert saved == [3, 6, 9, 10]

    saved.clear()
    data = tmp_path / "data"
    assert cli("synth", "--out", data, "--n-train", "12", "--n-test", "2", "--repeats", "1")[0] == 0
    code, _, err = cli(
        "train", "vqvae", "--data", data, "--out", tmp_path / "vq", "--steps", "5", "--batch-size", "4",
        "--save-every", "2",
    )  # fmt: skip
    assert code == 0, err
    assert saved == [2, 4, 5]
    code, _, err = cli("train", "vqvae", "--data", data, "--out", tmp_path / "vq", "--save-every", "0")
    assert code == 2 and "save-every" in err  # typer: 0 is out of range


def test_sigterm_saves_state_and_stops(tmp_path, cli, monkeypatch):
    tcfg = TrainConfig(steps=8, batch_size=8, lr=1e-2, save_every=100, log_every=1)
    straight, _ = _toy(tmp_path / "straight", tcfg, resume=False)
    for sig in (signal.SIGTERM, signal.SIGINT):
        handler, run = signal.getsignal(sig), tmp_path / sig.name

        def signal_at_3(step: int, sig=sig) -> None:
            if step == 3:
                os.kill(os.getpid(), sig)

        with pytest.raises(TrainingInterrupted) as stopped:
            _toy(run, tcfg, signal_at_3)
        assert stopped.value.signum == sig and f"stopped by {sig.name} after step 4 of 8" in str(stopped.value)
        with safe_open(run / "toy.state.safetensors", "pt") as f:
            assert f.metadata()["step"] == "4"  # saved on the signal, long before save_every
        assert signal.getsignal(sig) == handler  # the handlers are put back
        layer, _ = _toy(run, tcfg)
        assert torch.equal(layer.weight, straight.weight) and torch.equal(layer.bias, straight.bias)
        assert _log_steps(run / "toy.log.jsonl") == list(range(1, 9))

    # the command: a clean stop with one message and the shell's exit code for SIGTERM, then a resume
    data = tmp_path / "data"
    assert cli("synth", "--out", data, "--n-train", "12", "--n-test", "2", "--repeats", "1")[0] == 0
    _at_step(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGTERM))
    argv = ["train", "vqvae", "--data", data, "--out", tmp_path / "vq", "--steps", "4", "--batch-size", "4"]
    code, _, err = cli(*argv)
    assert code == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM after step 3 of 4" in err and "Traceback" not in err
    assert not (tmp_path / "vq" / "model.safetensors").exists()
    monkeypatch.undo()
    code, _, err = cli(*argv)
    assert code == 0, err
    assert _log_steps(tmp_path / "vq" / "vqvae.log.jsonl") == [4]  # log_every 20: the last step only, once


# ------------------------------------------------------------------------------------------------
# nothing let in: checkpoints


def _checkpoint_meta(cfg: dict, parts: str) -> dict[str, str]:
    return {"format": "mindhier-rt-checkpoint", "format_version": "1", "config": json.dumps(cfg), "parts": parts}


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_huge_config_header_is_refused_without_allocating(tmp_path, cli, tiny_voxels):
    cfg = preset("tiny").to_dict()
    cfg["generator"].update(width=2**20, heads=2**14)  # ~4.6e13 parameters: 168 TiB in float32
    path = tmp_path / "huge.safetensors"
    save_file({"vqvae.codebook": torch.zeros(4)}, path, metadata=_checkpoint_meta(cfg, "encoder,generator,vqvae"))
    assert path.stat().st_size < 2048
    planned_state(preset("tiny"))  # the one-time cost of a first meta build is not the refusal's
    rss, t0 = _max_rss_mib(), time.perf_counter()
    with pytest.raises(CheckpointError, match=r"expected a model of at most [\d,]+ elements .* found a config asking"):
        MindHier.load(path)
    assert time.perf_counter() - t0 < 3 and _max_rss_mib() - rss < 64  # measured: 0.1-0.2 s, no growth
    scans = tmp_path / "scans.npy"
    np.save(scans, tiny_voxels.numpy())
    code, _, err = cli("decode", "--ckpt", path, "--fmri", scans, "--subject", "subj01", "--out", tmp_path / "r")
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and "found a config asking" in err, err

    deep = preset("tiny").to_dict()
    deep["generator"]["depth"] = 10**9  # even on the meta device: a billion blocks
    save_file({}, path, metadata=_checkpoint_meta(deep, "vqvae"))
    with pytest.raises(CheckpointError, match=r"expected generator depth in 0\.\.256, found 1000000000"):
        MindHier.load(path, require=())

    nested = {**_checkpoint_meta({}, "vqvae"), "config": "[" * 100_000 + "]" * 100_000}  # 200 kB of nesting
    save_file({}, path, metadata=nested)
    with pytest.raises(CheckpointError, match="expected the config as JSON, found invalid JSON"):
        MindHier.load(path)

    bomb = tmp_path / "bomb.safetensors"
    bomb.write_bytes(struct.pack("<Q", 2**40) + b"{}")  # a header length of 1 TiB
    with pytest.raises(CheckpointError, match=r"expected a header of at most 2 bytes, found a length of 1099511627776"):
        MindHier.load(bomb)


def test_config_tensor_shape_mismatch_is_refused(tiny_ckpt, tmp_path, monkeypatch):
    with safe_open(tiny_ckpt, "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    cfg = json.loads(meta["config"])
    cfg["generator"]["width"] = 128  # the tensors are 64 wide
    meta["config"] = json.dumps(cfg)
    bad = tmp_path / "wider.safetensors"
    save_file(tensors, bad, metadata=meta)
    built: list[str] = []
    real = MindHier.from_config.__func__

    def recording(cls, cfg, device="cpu", seed=None):
        built.append(str(device))
        return real(cls, cfg, device, seed)

    monkeypatch.setattr(MindHier, "from_config", classmethod(recording))
    with pytest.raises(CheckpointError) as e:
        MindHier.load(bad)
    msg = str(e.value)
    assert "part 'generator'" in msg and "mis-shaped keys" in msg
    assert "pos_start: expected (1, 1, 128), found (1, 1, 64)" in msg
    assert built == ["meta"]  # only shapes were built; nothing allocated


def _with_nan(src: Path, dst: Path, key: str) -> None:
    with safe_open(src, "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[1] = float("nan")
    save_file(tensors, dst, metadata=meta)


def test_nan_weight_is_refused_naming_the_tensor(tiny_ckpt, tmp_path, cli, tiny_voxels):
    bad = tmp_path / "nan.safetensors"
    _with_nan(tiny_ckpt, bad, "generator.head.weight")
    with pytest.raises(CheckpointError, match=r"expected finite values in tensor 'generator.head.weight', found 1 NaN"):
        MindHier.load(bad)
    scans = tmp_path / "scans.npy"
    np.save(scans, tiny_voxels.numpy())
    code, _, err = cli("decode", "--ckpt", bad, "--fmri", scans, "--subject", "subj01", "--out", tmp_path / "r")
    assert code == 1 and err.count("\n") == 1 and "generator.head.weight" in err, err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


# ------------------------------------------------------------------------------------------------
# nothing let in: training state


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, small_set):
    """A data folder and a VQ-VAE run folder stopped at step 2 of the CLI's run."""
    from typer.testing import CliRunner

    from mindhier_rt.cli import app

    root = tmp_path_factory.mktemp("state")
    runner = CliRunner()
    for argv in (
        ["synth", "--out", str(root / "data"), "--n-train", "12", "--n-test", "2", "--repeats", "1"],
        ["train", "vqvae", "--data", str(root / "data"), "--out", str(root / "run"), "--steps", "2",
         "--batch-size", "4"],
    ):  # fmt: skip
        result = runner.invoke(app, argv)
        assert result.exit_code == 0, result.output
    return root


def _rewrite_state(path: Path, edit) -> None:
    with safe_open(path, "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(meta, tensors)
    save_file(tensors, path, metadata=meta)


def _first(tensors: dict, prefix: str) -> str:
    return next(k for k in sorted(tensors) if k.startswith(prefix) and tensors[k].is_floating_point())


CORRUPT_STATES = {
    "step not a number": (lambda m, t: m.update(step="two"), "expected a non-negative integer step, found 'two'"),
    "negative step": (lambda m, t: m.update(step="-3"), "found '-3'"),
    "step beyond the end": (lambda m, t: m.update(step="9"), "state is at step 9, beyond the end of training"),
    "missing entry": (lambda m, t: m.pop("scheduler"), "missing scheduler"),
    "bad JSON": (lambda m, t: m.update(param_groups="[{"), "expected JSON in the state's 'param_groups' entry"),
    "missing tensor": (lambda m, t: t.pop(_first(t, "model.")), "missing tensors (1): model.vqvae."),
    "missing codebook usage": (lambda m, t: t.pop("aux.restarts.usage_V"), "missing tensors (1): aux.restarts."),
    "unexpected tensor": (lambda m, t: t.update({"model.vqvae.extra": torch.zeros(2)}), "unexpected tensors (1)"),
    "mis-shaped tensor": (
        lambda m, t: t.update({(k := _first(t, "model.")): torch.zeros(*t[k].shape, 2)}),
        "mis-shaped tensors (1): model.vqvae.",
    ),
    "mis-shaped optimizer moment": (
        lambda m, t: t.update({_first(t, "opt."): torch.zeros(3)}),
        "mis-shaped tensors (1): opt.",
    ),
    "NaN weight": (
        lambda m, t: t[_first(t, "model.")].view(-1).__setitem__(0, float("nan")),
        "expected finite values in tensor 'model.vqvae.",
    ),
    "inf optimizer moment": (
        lambda m, t: t[_first(t, "opt.")].view(-1).__setitem__(0, float("inf")),
        "found 0 NaN and 1 inf",
    ),
    "changed seed": (
        lambda m, t: m.update(train_config=json.dumps({**json.loads(m["train_config"]), "seed": 5})),
        "seed: saved 5, now 0",
    ),
    "schedule off its step": (
        lambda m, t: m.update(scheduler=json.dumps({**json.loads(m["scheduler"]), "last_epoch": 1})),
        "expected the LR schedule at step 2, found it at 1",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPT_STATES))
def test_corrupt_state_ends_in_one_error_line(saved_run, tmp_path, cli, case):
    edit, expected = CORRUPT_STATES[case]
    run = tmp_path / "run"
    shutil.copytree(saved_run / "run", run)
    state = run / "vqvae.state.safetensors"
    _rewrite_state(state, edit)
    before = state.read_bytes()
    argv = ["train", "vqvae", "--data", saved_run / "data", "--out", run, "--steps", "2", "--batch-size", "4"]
    code, _, err = cli(*argv)
    assert code == 1, err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert str(state) in err
    assert state.read_bytes() == before  # a refused state is left as it was


def test_truncated_or_oversized_state_ends_in_one_error_line(saved_run, tmp_path, cli):
    run = tmp_path / "run"
    shutil.copytree(saved_run / "run", run)
    state = run / "vqvae.state.safetensors"
    argv = ["train", "vqvae", "--data", saved_run / "data", "--out", run, "--steps", "3", "--batch-size", "4"]
    data = state.read_bytes()
    for payload, expected in (
        (data[: len(data) // 2], "corrupt"),
        (struct.pack("<Q", 2**50) + data[8:], "header of at most"),
    ):
        state.write_bytes(payload)
        code, _, err = cli(*argv)
        assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
