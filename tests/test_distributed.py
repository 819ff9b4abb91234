"""Training at scale on CPU: two gloo processes train like one process on the same global batch (stage 1 with
DDP, stage 2 with FSDP2 + gradient checkpointing, interrupted and resumed), the CLI's train commands in those
processes (FSDP + AMP), AMP, gradient checkpointing and the stage-2 memory estimate. The processes are started
with torch.multiprocessing (one start for all of it: importing torch costs seconds on a busy 2-core machine) and
given the variables torchrun sets; the real ``torchrun`` launch of the CLI is the ``slow`` test at the end.

Tolerances. The two-process runs do the single-process arithmetic in another order: each rank reduces the
mean over its half of the batch, the halves' gradients are averaged by a collective, and SoftCLIP sees the
gathered batch. In float32 that moves results by a few ulps (relative 1e-7 .. 1e-6) per operation; over three
or four AdamW steps (lr 1e-3, update size ~lr whatever the gradient scale) the weights then differ by ~1e-6 at
most. We allow 1e-5 relative on every logged loss and grad norm and 5e-5 absolute on weights: an order of magnitude
above that noise, two orders below one AdamW step (1e-3), so a wrong shard, a missing gradient average or a
skipped batch row would fail.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mindhier_rt.config import preset
from mindhier_rt.data.synthetic import make_synthetic
from mindhier_rt.errors import ConfigError
from mindhier_rt.models.generator import ScaleGenerator
from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.train.distributed import DistContext
from mindhier_rt.train.loop import TrainConfig, train_loop
from mindhier_rt.train.losses import token_cross_entropy
from mindhier_rt.train.memory import block_activation_bytes, estimate_stage2_memory, memory_table
from mindhier_rt.train.stages import TrialSet, train_stage1, train_stage2
from mindhier_rt.train.teacher import HashTextTeacher, RandomViTTeacher

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

WORLD = 2
STAGE1 = TrainConfig(steps=3, batch_size=8, lr=1e-3, seed=0, log_every=1)
STAGE2 = TrainConfig(steps=4, batch_size=8, lr=1e-3, seed=0, log_every=1, save_every=2)
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 5e-5


def _make_data(folder: Path) -> None:
    """Tiny models' data, written once for every process: two subjects, 16 training images, the random-ViT
    teacher's targets (safetensors), and an on-disk data set plus an init checkpoint for the CLI."""
    from mindhier_rt.data import synth_command_impl

    cfg = preset("tiny")
    ds = make_synthetic(cfg.encoder.subjects, n_train=16, n_test=2, repeats=1, size=cfg.image_size, seed=1)
    images = torch.from_numpy(ds.images)
    tensors = {"images": images}
    for subject, (voxels, image_index, split) in ds.trials.items():
        tensors[f"voxels.{subject}"] = torch.from_numpy(voxels[split == 0])
        tensors[f"index.{subject}"] = torch.from_numpy(image_index[split == 0])
    tensors["levels"] = RandomViTTeacher(cfg).image_levels(images)
    tensors["text"] = HashTextTeacher(cfg).text_tokens([f"caption {i % 5}" for i in range(len(images))])
    save_file(tensors, folder / "data.safetensors")
    synth_command_impl(folder / "cli_data", "tiny", n_train=16, n_test=2, repeats=1, seed=0)
    MindHier.from_config(cfg, seed=0).save(folder / "init.safetensors")


def _load_data(folder: Path):
    t = load_file(folder / "data.safetensors")
    cfg = preset("tiny")
    trials = [TrialSet(s, t[f"voxels.{s}"], t[f"index.{s}"]) for s, _ in cfg.encoder.subjects]
    return cfg, t["images"], trials, t["levels"], t["text"]


def _stage2_models(cfg, generator_seed: int) -> MindHier:
    """Frozen encoder and VQ-VAE from seed 0 (the precomputed inputs must match); the generator from its own seed."""
    models = MindHier.from_config(cfg, seed=0)
    torch.manual_seed(generator_seed)
    models.generator = ScaleGenerator(cfg)
    return models


class Interrupted(Exception):
    pass


def _cli(argv: list[str], stdout: Path) -> int:
    """The console entry point in this process, stdout to a file: its exit code."""
    import contextlib

    from mindhier_rt.cli import main

    sys.argv = ["mindhier-rt", *argv]
    with stdout.open("w") as f, contextlib.redirect_stdout(f):
        try:
            main()
        except SystemExit as e:
            return e.code or 0
    return 0


def _worker(rank: int, port: int, out: str) -> None:
    """One of two torchrun-like processes: the variables torchrun would set, then the library's own init."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    import mindhier_rt.train.loop as loop
    from mindhier_rt.train.distributed import distributed_session

    out_dir = Path(out)
    with distributed_session(device="cpu") as ctx:
        assert (ctx.rank, ctx.world_size, ctx.initialized) == (rank, WORLD, True)
        cfg, images, trials, levels, text = _load_data(out_dir)
        models = MindHier.from_config(cfg, seed=0)
        s1 = train_stage1(models, trials, levels, text, STAGE1, out_dir / "s1", progress=False, dist=ctx)
        save_file(models.encoder.state_dict(), out_dir / f"s1_rank{rank}.safetensors")

        save_state = loop.save_state

        def save_then_crash(*args, **kwargs):
            save_state(*args, **kwargs)
            raise Interrupted  # both ranks die right after the step-2 state is written

        loop.save_state = save_then_crash
        with pytest.raises(Interrupted):
            train_stage2(
                _stage2_models(cfg, 0), trials, images, STAGE2, out_dir / "s2", progress=False, dist=ctx,
                fsdp=True, grad_checkpoint=True,
            )  # fmt: skip
        loop.save_state = save_state
        models = _stage2_models(cfg, 123)  # another init: every weight must come from the state file
        sharded = models.generator
        s2 = train_stage2(
            models, trials, images, STAGE2, out_dir / "s2", progress=False, dist=ctx, fsdp=True, grad_checkpoint=True
        )
        local = sum(p.to_local().numel() for p in sharded.parameters())
        total = sum(p.numel() for p in models.generator.parameters())
        save_file(models.generator.state_dict(), out_dir / f"s2_rank{rank}.safetensors")
        # the CLI in the same processes: FSDP with bf16 gathered weights + autocast + checkpointing, then fp16
        cli_codes = []
        for amp in ("bf16", "fp16"):
            argv = [
                "train", "stage2", "--data", str(out_dir / "cli_data"), "--init", str(out_dir / "init.safetensors"),
                "--out", str(out_dir / f"cli_{amp}"), "--steps", "2", "--batch-size", "4", "--amp", amp,
                "--grad-checkpoint",
            ]  # fmt: skip
            cli_codes.append(_cli(argv, out_dir / f"cli_{amp}_rank{rank}.txt"))
        result = {"stage1": s1, "stage2": s2, "shard_fraction": local / total, "cli": cli_codes}
        (out_dir / f"records_rank{rank}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dist")
    _make_data(folder)
    return folder


@pytest.fixture(scope="module")
def data(shared):
    return _load_data(shared)


@pytest.fixture(scope="module")
def two_ranks(shared):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(_free_port(), str(shared)), nprocs=WORLD, join=True)
    records = [json.loads((shared / f"records_rank{r}.json").read_text()) for r in range(WORLD)]
    return shared, records


def _same_records(dist_records, single_records):
    assert [r["step"] for r in dist_records] == [r["step"] for r in single_records]
    assert dist_records[0].keys() == single_records[0].keys()
    for a, b in zip(dist_records, single_records, strict=True):
        for key in ("loss", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], rel=LOSS_RTOL), (a["step"], key, a[key], b[key])


def _same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=WEIGHT_ATOL, rtol=0, msg=key)


def test_batch_shards_concatenate_to_the_global_batch():
    rows = torch.arange(12)
    shards = [DistContext(rank=r, world_size=3).shard(rows) for r in range(3)]
    assert torch.equal(torch.cat(shards), rows) and [len(s) for s in shards] == [4, 4, 4]
    assert DistContext().shard(rows) is rows
    with pytest.raises(ConfigError, match="divisible by 3"):
        DistContext(rank=0, world_size=3).shard(torch.arange(10))


def test_stage1_ddp_matches_one_process(two_ranks, data, tmp_path):
    out, records = two_ranks
    cfg, _, trials, levels, text = data
    single = MindHier.from_config(cfg, seed=0)
    ref = train_stage1(single, trials, levels, text, STAGE1, tmp_path, progress=False)
    rank0, rank1 = (load_file(out / f"s1_rank{r}.safetensors") for r in range(WORLD))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key  # DDP: bit-identical replicas
    for a, b in zip(records[0]["stage1"], records[1]["stage1"], strict=True):  # averaged over ranks: same everywhere
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    _same_records(records[0]["stage1"], ref)
    _same_weights(rank0, single.encoder.state_dict())
    # only rank 0 wrote the log; the state file has the single-process layout
    lines = (out / "s1" / "stage1.log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


def test_stage2_fsdp_resumed_matches_one_process(two_ranks, data, tmp_path):
    out, records = two_ranks
    cfg, images, trials, _, _ = data
    single = _stage2_models(cfg, 0)
    ref = train_stage2(single, trials, images, STAGE2, tmp_path, progress=False)  # no FSDP, no checkpointing
    rank0, rank1 = (load_file(out / f"s2_rank{r}.safetensors") for r in range(WORLD))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert records[0]["shard_fraction"] == pytest.approx(1 / WORLD, abs=0.01)  # each rank held half the weights
    assert [r["step"] for r in records[0]["stage2"]] == [3, 4]  # resumed at step 2
    _same_records(records[0]["stage2"], ref[2:])
    _same_weights(rank0, single.generator.state_dict())
    # the state file gathered from the shards has exactly the single-process layout
    with (
        safe_open(out / "s2" / "stage2.state.safetensors", "pt") as a,
        safe_open(tmp_path / "stage2.state.safetensors", "pt") as b,
    ):
        assert set(a.keys()) == set(b.keys())
        assert all(a.get_slice(k).get_shape() == b.get_slice(k).get_shape() for k in a.keys())  # noqa: SIM118
        assert a.metadata().keys() == b.metadata().keys()
    # ... so one process resumes the two processes' run (FSDP shards -> plain weights) for a fifth step
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "stage2.state.safetensors").write_bytes((out / "s2" / "stage2.state.safetensors").read_bytes())
    more = train_stage2(_stage2_models(cfg, 7), trials, images, replace(STAGE2, steps=5), resumed, progress=False)
    assert [r["step"] for r in more] == [5]


def test_checkpointed_blocks_give_the_same_loss_and_gradients():
    cfg = preset("tiny")
    torch.manual_seed(0)
    gen = ScaleGenerator(cfg)
    B, L, S = 3, cfg.schedule.total_tokens, cfg.n_levels * cfg.context_tokens
    inputs = (torch.randn(B, cfg.context_dim), torch.randn(B, S, cfg.context_dim), torch.randn(B, L - 1, 8))
    idx = torch.randint(cfg.vocab_size, (B, L))
    losses, grads = [], []
    for ckpt in (False, True):
        gen.zero_grad()
        loss = token_cross_entropy(gen(*inputs, checkpoint_blocks=ckpt), idx)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in gen.named_parameters() if p.grad is not None})
    assert torch.equal(losses[0], losses[1])
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-7, rtol=1e-6, msg=name)


def test_amp_autocasts_the_loss_and_keeps_the_fp16_scaler(tmp_path):
    """The loop's AMP on a toy model (stage 2 with AMP under FSDP runs in ``test_cli_stage2_in_two_processes``)."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 8), torch.randn(16, 1)

    def run(amp: str, steps: int):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
        seen = []

        def loss_fn(step: int):
            out = model(x)
            seen.append(out.dtype)
            return {"loss": (out.float() - y).pow(2).mean()}

        tcfg = TrainConfig(steps=steps, batch_size=16, lr=1e-2, log_every=1, amp=amp)
        records = train_loop("toy", {"model": model}, loss_fn, tcfg, tmp_path / amp, progress=False)
        assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights throughout
        return records, set(seen)

    first = {}
    for amp, dtype in (("off", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        records, dtypes = run(amp, 2)
        assert dtypes == {dtype}
        first[amp] = records[0]["loss"]
    # the first step sees the same weights and batch: the loss moves by the format's rounding only
    assert first["bf16"] == pytest.approx(first["off"], rel=2e-2)
    assert first["fp16"] == pytest.approx(first["off"], rel=2e-3)
    with safe_open(tmp_path / "fp16" / "toy.state.safetensors", "pt") as f:
        assert json.loads(f.metadata()["grad_scaler"])["scale"] == 2.0**16  # no overflow: the initial scale
    records, _ = run("fp16", 3)  # resumes at step 2, scaler state from the file
    assert [r["step"] for r in records] == [3]
    with pytest.raises(ConfigError, match="amp must be one of"):
        run("fp8", 1)


# ---- memory estimate --------------------------------------------------------------------------------
def _saved_tensor_bytes(cfg, batch: int, amp: str) -> tuple[int, int]:
    """What autograd keeps for backward in one teacher-forced pass: (activation bytes, autocast weight copies)."""
    torch.manual_seed(0)
    gen = ScaleGenerator(cfg)
    weights = {t.untyped_storage().data_ptr() for t in [*gen.parameters(), *gen.buffers()]}
    # autocast's low-precision weight copies: a Linear parameter's shape (Linear saves the transposed view)
    weight_shapes = {s for p in gen.parameters() for s in (tuple(p.shape), tuple(p.shape)[::-1])}
    saved: dict[int, tuple[int, bool]] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = (t.untyped_storage().nbytes(), tuple(t.shape) in weight_shapes and t.dtype != torch.float32)
        return t

    L, S = cfg.schedule.total_tokens, cfg.n_levels * cfg.context_tokens
    inputs = (torch.randn(batch, cfg.context_dim), torch.randn(batch, S, cfg.context_dim))
    x, idx = torch.randn(batch, L - 1, cfg.latent_dim), torch.randint(cfg.vocab_size, (batch, L))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        token_cross_entropy(gen(*inputs, x), idx)
    casts = sum(n for n, is_weight in saved.values() if is_weight)
    return sum(n for n, _ in saved.values()) - casts, casts


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_activation_estimate_matches_what_autograd_saves(amp):
    cfg = preset("small").replace(depth=2)
    batch = 1
    measured, casts = _saved_tensor_bytes(cfg, batch, amp)
    est = estimate_stage2_memory(cfg, batch, amp=amp, fsdp=False)
    assert est["activations"] == pytest.approx(measured, rel=0.03)
    gen = ScaleGenerator(cfg)
    n = sum(p.numel() for p in gen.parameters())
    linear = sum(p.numel() for m in gen.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters())
    assert est["parameters"] == n * 4
    if amp == "bf16":
        # autocast's bf16 copy of every Linear weight, counted as working copies; autograd keeps all but those of
        # the two Linears whose inputs need no gradient (fmri_pooler and word_embed, ~1.5 % here)
        assert 0.97 * linear * 2 < casts <= linear * 2
        assert est["working_copies"] == linear * 2
    else:
        assert casts == 0 and est["working_copies"] == 0
    # one more block adds exactly one block's count
    per_sample, per_batch = block_activation_bytes(cfg, amp)
    deeper = estimate_stage2_memory(cfg.replace(depth=3), batch, amp=amp, fsdp=False)["activations"]
    assert deeper - est["activations"] == batch * per_sample + per_batch


def test_memory_estimate_known_counts():
    cfg = preset("mindhier-512")
    with torch.device("meta"):
        gen = ScaleGenerator(cfg)
    n = sum(p.numel() for p in gen.parameters())
    trainable = sum(p.numel() for p in gen.parameters() if p.requires_grad)
    assert 2.25e9 < n < 2.40e9  # REFERENCE §5: ~2.32B
    single = estimate_stage2_memory(cfg, 1, world_size=1, amp="off", grad_checkpoint=False, fsdp=False)
    assert single["parameters"] == n * 4  # fp32 weights, no copies
    assert single["gradients"] == trainable * 4
    assert single["adamw_states"] == trainable * 2 * 4  # two fp32 moments
    assert single["working_copies"] == 0 and single["optimizer_step"] == trainable * 4
    persistent = single["parameters"] + single["gradients"] + single["adamw_states"]
    assert single["total"] == persistent + max(single["activations"], single["optimizer_step"])
    sharded = estimate_stage2_memory(cfg, 1, world_size=8, amp="bf16", grad_checkpoint=True, fsdp=True)
    assert sharded["adamw_states"] == -(-trainable * 8 // 8)
    block = sum(p.numel() for p in gen.blocks[0].parameters())
    root = n - len(gen.blocks) * block
    assert sharded["parameters"] == -(-n * 4 // 8)  # one shard of the fp32 weights
    # gathered bf16 weights of the root and two blocks; one block's gradients (bf16 + fp32) before the reduce-scatter
    assert sharded["working_copies"] == (root + 2 * block) * 2 + block * (2 + 4)
    # checkpointing keeps one block's activations instead of 30; activations grow linearly with the batch
    full = estimate_stage2_memory(cfg, 2, world_size=8, amp="bf16", grad_checkpoint=False, fsdp=True)
    ckpt2 = estimate_stage2_memory(cfg, 2, world_size=8, amp="bf16", grad_checkpoint=True, fsdp=True)
    assert ckpt2["activations"] < full["activations"] / 8
    _, per_batch = block_activation_bytes(cfg, "bf16")  # the masks: shared by the batch
    assert ckpt2["activations"] - sharded["activations"] == sharded["activations"] - per_batch
    table = memory_table(cfg, sharded, 1, 8, "bf16", True, True)
    assert "FSDP over 8 GPUs" in table and "adamw states" in table and "GiB" in table
    with pytest.raises(ConfigError):
        estimate_stage2_memory(cfg, 1, amp="fp8")


# ---- the CLI under torchrun ---------------------------------------------------------------------------
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cli_stage2_in_two_processes(two_ranks, amp):
    out, records = two_ranks
    assert [r["cli"] for r in records] == [[0, 0], [0, 0]]
    rank0, rank1 = ((out / f"cli_{amp}_rank{r}.txt").read_text() for r in range(WORLD))
    assert "stage 2 memory per GPU" in rank0 and "FSDP over 2 GPUs" in rank0 and "wrote" in rank0
    assert rank1 == ""  # only rank 0 prints and writes
    models = MindHier.load(out / f"cli_{amp}" / "model.safetensors")
    assert models.cfg.name == "tiny" and all(torch.isfinite(p).all() for p in models.generator.parameters())
    log = [json.loads(line) for line in (out / f"cli_{amp}" / "stage2.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2]


@pytest.mark.slow
def test_cli_stage2_under_torchrun(cli, tiny_ckpt, tmp_path):
    data = tmp_path / "data"
    assert cli("synth", "--preset", "tiny", "--out", data, "--n-train", "16", "--n-test", "2", "--repeats", "1")[0] == 0
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
        "-m", "mindhier_rt.cli", "train", "stage2", "--data", str(data), "--init", str(tiny_ckpt), "--out", str(out),
        "--steps", "2", "--batch-size", "4", "--amp", "bf16", "--grad-checkpoint",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("stage 2 memory per GPU") == 1  # printed by rank 0 only
    assert "FSDP over 2 GPUs" in done.stdout and done.stdout.count("wrote") == 1
    models = MindHier.load(out / "model.safetensors")
    assert models.cfg.name == "tiny"
    log = [json.loads(line) for line in (out / "stage2.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2]
    assert time.perf_counter() - t0 < 300
