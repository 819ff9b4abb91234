"""The GPU session's scripts, run on the CPU with tiny sizes: a GPU lease is too short to find a broken script on.

``benchmarks/gpu_bench.py`` end to end (eager vs fast, the decoder A/B, the tables) and the kernel counter of
``benchmarks/kernel_count.py`` on the tiny preset's structure. The numbers mean nothing here; the plumbing does.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_runs_on_the_cpu(tmp_path):
    gpu_bench = load("gpu_bench")
    args = ["--out", str(tmp_path), "--presets", "tiny", "--device", "cpu", "--dtype", "float32"]
    assert gpu_bench.main([*args, "--batches", "1", "--samples", "1", "--repeats", "1", "--warmup", "0"]) == 0
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    (row,) = result["end_to_end"]
    assert row["fast_ms"] > 0 and row["eager_ms"] > 0 and row["fused_error"] is None
    assert {(d["dtype"], d["layout"]) for d in result["decoder"]} == set(gpu_bench.DECODER_VARIANTS)
    assert all(d["max_abs_vs_float32"] < 0.15 for d in result["decoder"])
    md = (tmp_path / "gpu_bench.md").read_text()
    assert "| tiny | 1 | 1 | 2 |" in md and "channels_last" in md


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
