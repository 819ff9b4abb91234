"""The GPU session's scripts, run on the CPU with tiny sizes: a GPU lease is too short to find a broken script on.

``benchmarks/gpu_bench.py`` end to end (eager vs fast, the decoder A/B, the tables) and the kernel counter of
``benchmarks/kernel_count.py`` on the tiny preset's structure. The numbers mean nothing here; the plumbing does.
"""

from __future__ import annotations

import json
import os

import pytest
from benchmark_scripts import load


def test_gpu_bench_runs_on_the_cpu(tmp_path):
    gpu_bench = load("gpu_bench")
    args = ["--out", str(tmp_path), "--presets", "tiny", "--device", "cpu", "--dtype", "float32"]
    args += ["--compile-backend", "eager", "--compile-cap", "120"]  # dynamo's plumbing, no inductor build
    assert gpu_bench.main([*args, "--batches", "1", "--samples", "1", "--repeats", "1", "--warmup", "0"]) == 0
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    (row,) = result["end_to_end"]
    assert row["fast_ms"] > 0 and row["eager_ms"] > 0 and row["fused_error"] is None
    assert {(d["dtype"], d["layout"]) for d in result["decoder"]} == set(gpu_bench.DECODER_VARIANTS)
    assert all(d["max_abs_vs_float32"] < 0.15 for d in result["decoder"])
    (extra,) = result["extra"]
    assert {p["name"] for p in extra["phases"]["phases"]} >= {"encode", "context", "step 0", "decode", "end to end"}
    assert extra["float32"]["eager_ms"] > 0 and extra["float32"]["fast_ms"] > 0
    compiled = extra["compiled"]
    assert "error" not in compiled, compiled
    assert compiled["compiled_ms"] > 0 and compiled["fast_ms"] > 0 and compiled["backend"] == "eager"
    md = (tmp_path / "gpu_bench.md").read_text()
    assert "| tiny | 1 | 1 | 2 |" in md and "channels_last" in md
    assert "Float32: eager" in md and "torch.compile (reduce-overhead):" in md and "| step 0 |" in md


def test_gpu_bench_evaluates_the_phase_targets():
    """The issue's per-phase targets from a profile's phases: summed ms against a cap, summed FLOPs over summed
    time against a rate."""
    gpu_bench = load("gpu_bench")
    phases = {f"step {i}": {"median_ms": 1.0 + 0.1 * i, "flops": 0.0} for i in range(6)}
    phases |= {f"step {i}": {"median_ms": 5.0, "flops": 3.5e12} for i in range(6, 10)}  # 700 TFLOP/s
    phases |= {"encode": {"median_ms": 1.5}, "context": {"median_ms": 1.0}, "decode": {"median_ms": 4.0}}
    got = gpu_bench.evaluate_targets(phases, gpu_bench.PHASE_TARGETS["mindhier-512"])
    met = {"+".join(t["phases"]): t["met"] for t in got}
    assert met["encode+context"] is False  # 2.5 ms > 2
    assert [met[f"step {i}"] for i in range(6)] == [True, True, True, False, False, False]  # 1.2 ms cap
    assert met["step 6+step 7+step 8+step 9"] is True and met["decode"] is True
    rate = next(t for t in got if t["kind"] == "min_tflops")
    assert rate["measured"] == pytest.approx(700.0)
    assert gpu_bench.TARGET_MS["mindhier-512"] == {1: 40.0, 4: 120.0}


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="counts under Triton's interpreter")
def test_kernel_count_on_the_tiny_structure():
    pytest.importorskip("triton")
    kc = load("kernel_count")
    cfg = kc.narrow_config("tiny")
    counter = kc.KernelCounter()
    with kc.counting_triton(counter):
        fused = kc.count_decode(cfg, True, counter)
        unfused = kc.count_decode(cfg, False, counter)
    n_scales, depth = cfg.schedule.n_scales, cfg.generator.depth
    assert fused["triton"]["choose_tokens"] == n_scales  # one draw kernel per scale
    assert fused["triton"]["step"] == n_scales * depth * 8  # 6 norm chains + 2 attentions per block
    assert fused["torch"]["step"] < unfused["torch"]["step"] / 4
    assert fused["torch"]["choose_tokens"] < unfused["torch"]["choose_tokens"] / 3
