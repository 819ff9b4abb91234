"""Every Triton launch a decode makes, compiled for sm_90 on the CPU (``kernels/compile_check.py``).

The interpreter runs the kernels here, but it does not specialise arguments as the compiler does (an integer
equal to 1 becomes a constant, multiples of 16 are marked), so a kernel can pass every interpreter test and
fail to compile on a GPU: the token draw did, at scale 1. These tests record the launches of real decodes under
the interpreter (fast backend with every kernel on, both attention modes, guidance switched off mid-way, one
and several rows; the teacher-forced pass with the kernels) and compile each through the kernel's own JIT for
sm_90 in a second process, with every varying integer argument also swept over the value classes 1, 16, 17.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mindhier_rt.config import preset
from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.pipeline import reconstruct
from mindhier_rt.sampling import SamplingConfig

triton = pytest.importorskip("triton")
if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("records launches under Triton's interpreter (the CPU test setup)", allow_module_level=True)

from mindhier_rt.kernels import compile_check as cc  # noqa: E402
from mindhier_rt.kernels.scale_attention import HAS_TRITON  # noqa: E402

if not HAS_TRITON:
    pytest.skip("Triton did not import", allow_module_level=True)

KERNELS = {
    "mindhier_rt.kernels.fused_norm._norm_chain_kernel",
    "mindhier_rt.kernels.fused_norm._silu_mul_kernel",
    "mindhier_rt.kernels.fused_norm._qk_norm_rope_kernel",
    "mindhier_rt.kernels.token_draw._draw_kernel",
    "mindhier_rt.kernels.scale_attention._scale_attn_fwd_kernel",
}


def record_decodes() -> list[cc.Launch]:
    from mindhier_rt.execution import execution
    from mindhier_rt.runtime.torch_fast import FastTorchBackend

    torch.manual_seed(0)
    voxels = torch.randn(2, preset("tiny").encoder.voxel_count("subj01"))
    launches: list[cc.Launch] = []
    for mode in ("scale_local", "block_causal"):
        models = MindHier.from_config(preset("tiny").replace(attn_mode=mode), seed=0).eval()
        fast = FastTorchBackend(copy.deepcopy(models), device="cpu", attention="triton", fused=True)
        with cc.record_launches() as got:
            reconstruct(fast, voxels[:1], "subj01", SamplingConfig(seed=1))  # 1 scan, guidance on every scale
            reconstruct(fast, voxels, "subj01", SamplingConfig(seed=5, cfg_stop=2, top_k=1), samples=2)
            cfg, gen = models.cfg, models.generator
            x = torch.randn(1, cfg.schedule.total_tokens - 1, cfg.latent_dim)
            with torch.no_grad(), execution(attention="triton", fused_norms=True):
                gen(torch.randn(1, cfg.generator.pooled_dim or cfg.context_dim), torch.randn(
                    1, cfg.schedule.context_length, cfg.context_dim), x)  # fmt: skip
        launches += got
    return launches


@pytest.fixture(scope="module")
def launches() -> list[cc.Launch]:
    return record_decodes()


def compile_in_subprocess(launches: list[cc.Launch], tmp: Path, *flags: str) -> tuple[int, dict]:
    """``python -m mindhier_rt.kernels.compile_check`` without the interpreter: (exit code, its report)."""
    path = tmp / "launches.json"
    cc.save_launches(launches, path)
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp / "cache")}
    cmd = [sys.executable, "-m", "mindhier_rt.kernels.compile_check", str(path), "--capability", "9.0", *flags]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    lines = run.stdout.strip().splitlines()
    assert lines, run.stderr[-3000:]
    return run.returncode, json.loads(lines[-1])


def test_recorded_launches_cover_every_kernel_and_the_value_one(launches):
    assert {x.name for x in launches} == KERNELS
    draws = [x for x in launches if x.kernel == "_draw_kernel"]
    scale_arg = [i for i, a in enumerate(draws[0].args) if isinstance(a, int)][-1]  # the last integer: scale
    assert {x.args[scale_arg] for x in draws} == {0, 1, 2, 3}
    # seeds 1 and 5: the host-side seed hash below and above 2^31 (an i32 and an i64 argument)
    assert {x.args[scale_arg - 1] >= 2**31 for x in draws} == {False, True}
    assert any(a == 1 for x in launches for a in x.args if type(a) is int), "no launch passes an integer 1"


def test_every_decode_launch_compiles_for_sm90(launches, tmp_path):
    """Each recorded launch and each value class (1, 16, 17) of every integer argument that varies between a
    kernel's launches, through the JIT's own specialisation, to an sm_90 cubin."""
    code, report = compile_in_subprocess(launches, tmp_path, "--sweep")
    assert code == 0 and not report["failures"], "\n".join(report["failures"])
    assert set(report["compiled"]) == KERNELS
    assert report["launches"] > len({json.dumps(x.to_json(), sort_keys=True) for x in launches})


def test_a_specialised_integer_used_as_a_tensor_is_caught(launches, tmp_path):
    """The check finds the bug class it is for: the draw kernel as it was (``scale.to(...)`` with ``scale``
    specialised), taken from git history, fails at scale 1 and compiles at scale 2."""
    old = tmp_path / "old_draw.py"
    source = (Path(__file__).parents[1] / "kernels" / "token_draw.py").read_text()
    source = source.replace("do_not_specialize=DRAW_PER_LAUNCH_ARGS", "")  # the kernel without the fix
    assert "@triton.jit()" in source, "the draw kernel's decorator changed: update this test"
    old.write_text(source)
    draws = [x for x in launches if x.kernel == "_draw_kernel"]
    scale_arg = [i for i, a in enumerate(draws[0].args) if isinstance(a, int)][-1]
    probe = [
        cc.Launch("old_draw", "_draw_kernel", (*draws[0].args[:scale_arg], scale, *draws[0].args[scale_arg + 1 :]),
                  draws[0].kwargs)
        for scale in (2, 1)
    ]  # fmt: skip
    env_path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    path = tmp_path / "probe.json"
    cc.save_launches(probe, path)
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "c"), "PYTHONPATH": env_path}
    run = subprocess.run(
        [sys.executable, "-m", "mindhier_rt.kernels.compile_check", str(path)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert run.returncode == 1 and len(report["failures"]) == 1, report
    assert "'int' object has no attribute 'to'" in report["failures"][0]
    assert report["compiled"] == {"old_draw._draw_kernel": 1}


def test_sweep_varies_only_the_integers_that_vary():
    a = cc.Launch("m", "k", ({"tensor": "float32", "aligned": True}, 4, 7, 0.5), {"BLOCK": 16})
    b = cc.Launch("m", "k", ({"tensor": "float32", "aligned": True}, 9, 7, 0.5), {"BLOCK": 16})
    variants = cc.value_class_sweep([a, b])
    assert {v.args[1] for v in variants} == set(cc.SWEEP_VALUES)
    assert all(v.args[2] == 7 and v.args[3] == 0.5 for v in variants)
