"""Scale-masked attention: the Triton kernel against its PyTorch reference, the range helpers and the costs.

Without CUDA the kernel runs under Triton's interpreter (float32, CPU); the GPU tests (fp16 / bf16 / fp32 on
the compiled kernel) are marked ``gpu``. Every check poisons ``out`` with NaN first: covered rows must come
back finite and right, uncovered rows must stay NaN.
"""

import importlib.util
import math
import os
import subprocess
import sys
from collections.abc import Sequence

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates the kernel

pytest.importorskip("triton", reason="triton is not installed (pip install 'mindhier-rt[gpu]')")

from hypothesis import given, settings
from hypothesis import strategies as st

from mindhier_rt.config import preset
from mindhier_rt.errors import BackendError, ConfigError
from mindhier_rt.kernels import scale_attention as sa
from mindhier_rt.kernels import scale_attention_costs as sac
from mindhier_rt.schedule import Schedule

CPU_RTOL = 1e-4  # float32, interpreter or IEEE fp32 dots on a GPU
GPU_RTOL = {torch.float16: 2e-2, torch.bfloat16: 2e-2, torch.float32: 1e-4}  # fp16/bf16: P is rounded for P @ V
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float32."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max()).item()


def sched(m: int = 3, t: int = 7, guidance: str = "coarse_to_fine", context_map: str = "training") -> Schedule:
    # ragged scale sizes 1, 4, 9, 16, 36 tokens
    return Schedule(
        patch_nums=(1, 2, 3, 4, 6), n_levels=m, context_tokens=t, guidance=guidance, context_map=context_map
    )


def randn(*shape: int, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


def poisoned(like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, float("nan"))


def check_against_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ranges: Sequence[Sequence[int]],
    rtol: float,
    scale: float | None = None,
    **blocks: int,
) -> torch.Tensor:
    """Run kernel and reference into NaN-poisoned outputs; compare covered rows, check uncovered ones stay NaN."""
    got = sa.scale_masked_attention(q, k, v, ranges, scale=scale, out=poisoned(q), **blocks)
    want = sa.scale_masked_attention_ref(q, k, v, ranges, scale=scale, out=poisoned(q))
    covered_L = sa.dense_mask(ranges, q.shape[2], k.shape[2], device=q.device).any(-1)
    assert torch.isfinite(got[:, :, covered_L]).all()
    assert torch.isnan(got[:, :, ~covered_L]).all()
    assert torch.isnan(want[:, :, ~covered_L]).all()
    assert got.dtype == q.dtype
    err = rel_err(got[:, :, covered_L], want[:, :, covered_L])
    assert err < rtol, f"relative error {err:.2e} >= {rtol:.0e}"
    return got


# ---- kernel vs reference, teacher-forced pyramid -------------------------------------------------------
@pytest.mark.parametrize("guidance", ["coarse_to_fine", "fine_to_coarse"])
@pytest.mark.parametrize("kind", sa.KINDS)
@pytest.mark.parametrize(("head_dim", "m", "t"), [(32, 3, 7), (48, 2, 17)])
def test_teacher_forced_pyramid_matches_reference(kind, guidance, head_dim, m, t):
    s = sched(m, t, guidance)
    if kind == "cross":  # the reference-pipeline map: runs of tokens inside one scale read different segments
        ref_map = sched(m, t, guidance, "reference-pipeline")
        assert max(len(r) for r in ref_map.cross_runs) > 1
        gen = torch.Generator().manual_seed(head_dim + m)
        q = randn(2, 2, ref_map.total_tokens, head_dim, gen=gen)
        k, v = (randn(2, 2, ref_map.context_length, head_dim, gen=gen) for _ in range(2))
        check_against_ref(q, k, v, ref_map.key_ranges("cross"), CPU_RTOL, block_m=16, block_n=16)
    gen = torch.Generator().manual_seed(100 * sa.KINDS.index(kind) + 10 * (guidance == "coarse_to_fine") + head_dim)
    B, H, L = 2, 2, s.total_tokens
    S = s.context_length if kind == "cross" else L
    q = randn(B, L, H, head_dim, gen=gen).transpose(1, 2)  # permuted views: [B, H, L, c], non-contiguous
    k = randn(B, S, H, head_dim, gen=gen).transpose(1, 2)
    v = randn(B, H, S, head_dim, gen=gen)
    # 16 x 16 tiles: several query tiles per range and ragged key tails
    check_against_ref(q, k, v, s.key_ranges(kind), CPU_RTOL, block_m=16, block_n=16)


def test_default_tiles_and_custom_scale():
    s = sched()
    gen = torch.Generator().manual_seed(1)
    q, k, v = (randn(2, 2, s.total_tokens, 32, gen=gen) for _ in range(3))
    check_against_ref(q, k, v, s.key_ranges("block_causal"), CPU_RTOL, scale=0.3)


def test_uncovered_queries_are_left_untouched():
    s = sched()
    gen = torch.Generator().manual_seed(2)
    q, k, v = (randn(1, 2, s.total_tokens, 32, gen=gen) for _ in range(3))
    ranges = [r for i, r in enumerate(s.key_ranges("scale_local")) if i != 2]  # skip scale 2's queries
    check_against_ref(q, k, v, ranges, CPU_RTOL, block_m=16, block_n=16)
    fresh = sa.scale_masked_attention(q, k, v, ranges, block_m=16, block_n=16)
    assert (fresh[:, :, s.scale_slice(2)] == 0).all()  # a fresh out is zero where no range reaches


@settings(max_examples=8, deadline=None)
@given(
    head_dim=st.sampled_from([8, 20, 33, 64]),
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    gap=st.integers(0, 3),
    n_keys=st.integers(1, 70),
    seed=st.integers(0, 2**16),
)
def test_random_ranges_match_reference(head_dim, sizes, gap, n_keys, seed):
    gen = torch.Generator().manual_seed(seed)
    ranges, q0 = [], 0
    for n in sizes:
        k0 = int(torch.randint(0, n_keys, (1,), generator=gen))
        k1 = int(torch.randint(k0 + 1, n_keys + 1, (1,), generator=gen))
        ranges.append((q0 + gap, q0 + gap + n, k0, k1))
        q0 += gap + n
    q = randn(1, 2, q0 + 1, head_dim, gen=gen)
    k, v = (randn(1, 2, n_keys, head_dim, gen=gen) for _ in range(2))
    check_against_ref(q, k, v, ranges, CPU_RTOL, block_m=16, block_n=16)


# ---- decode steps against a preallocated cache -----------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "cached", "context_map"),
    [
        ("cross", True, "training"),
        ("cross", True, "reference-pipeline"),
        ("block_causal", True, "training"),
        ("scale_local", True, "training"),
        ("scale_local", False, "training"),
    ],
)
def test_decode_steps_reproduce_the_teacher_forced_rows(kind, cached, context_map):
    """Step i's queries against the cache (NaN beyond what step i may see) == rows of scale i in one pass."""
    s = sched(3, 7, "fine_to_coarse", context_map)
    gen = torch.Generator().manual_seed(3)
    B, H, c, L = 2, 2, 48, s.total_tokens
    S = s.context_length if kind == "cross" else L
    q_BHLc = randn(B, L, H, c, gen=gen).transpose(1, 2)
    kv_B2SHc = randn(B, 2, S, H, c, gen=gen)  # one fused K/V buffer: k and v are strided views of it
    k_BHSc, v_BHSc = (kv_B2SHc[:, j].transpose(1, 2) for j in range(2))
    want_BHLc = sa.scale_masked_attention_ref(q_BHLc, k_BHSc, v_BHSc, s.key_ranges(kind))

    cache_B2SHc = torch.full_like(kv_B2SHc, float("nan"))  # preallocated, poisoned until written
    cache_k, cache_v = (cache_B2SHc[:, j].transpose(1, 2) for j in range(2))
    if kind == "cross":
        cache_B2SHc.copy_(kv_B2SHc)  # the context K/V is complete before the first step
    for i in range(s.n_scales):
        sl = s.scale_slice(i)
        if kind != "cross":
            cache_B2SHc[:, :, sl] = kv_B2SHc[:, :, sl]  # write this scale's K/V at its offset
        step_ranges = sac.ranges_for_step(s, i, kind, cached)
        assert sum(q1 - q0 for q0, q1, _, _ in step_ranges) == s.token_counts[i]
        k, v = (cache_k, cache_v) if cached else (k_BHSc[:, :, sl], v_BHSc[:, :, sl])
        q = q_BHLc[:, :, sl]
        got = sa.scale_masked_attention(q, k, v, step_ranges, out=poisoned(q), block_m=16, block_n=16)
        assert torch.isfinite(got).all(), f"step {i} read keys outside its range"
        err = rel_err(got, want_BHLc[:, :, sl])
        assert err < CPU_RTOL, f"step {i}: relative error {err:.2e}"


def test_ranges_for_step_values():
    s = sched(3, 7)  # offsets 0, 1, 5, 14, 30, 66; segments 0, 0, 1, 1, 2
    assert sac.ranges_for_step(s, 3, "cross") == ((0, 16, 7, 14),)
    assert sac.ranges_for_step(s, 3, "block_causal") == ((0, 16, 0, 30),)
    assert sac.ranges_for_step(s, 3, "scale_local") == ((0, 16, 14, 30),)
    assert sac.ranges_for_step(s, 3, "scale_local", cached=False) == ((0, 16, 0, 16),)
    # reference-pipeline map, M = 3 of 5 scales: scale 3's first 5 pyramid rows are scales 0-1 (segment 0 ->
    # mirrored 2), rows 5..13 scale 2 (segment 1 -> 1), rows 14..15 scale 3 (segment 1 -> 1)
    r = sched(3, 7, context_map="reference-pipeline")
    assert sac.ranges_for_step(r, 3, "cross") == ((0, 5, 14, 21), (5, 16, 7, 14))
    with pytest.raises(ConfigError, match="scale index"):
        sac.ranges_for_step(s, 5, "cross")
    with pytest.raises(ConfigError, match="kind"):
        sac.ranges_for_step(s, 0, "causal")


# ---- tile table -----------------------------------------------------------------------------------------
def test_tile_table_is_cached_and_tiles_stay_inside_their_range():
    s = sched()
    ranges = s.key_ranges("block_causal")
    table = sa.tile_table(ranges, 16, torch.device("cpu"))
    assert table is sa.tile_table(ranges, 16, torch.device("cpu"))
    assert table.dtype == torch.int32 and table.shape == (1 + 1 + 1 + 1 + 3, 4)
    seen = torch.zeros(s.total_tokens, dtype=torch.int64)
    for t0, t1, k0, k1 in table.tolist():
        owner = next(r for r in ranges if r[0] <= t0 < r[1])
        assert t1 <= owner[1] and t1 - t0 <= 16 and (k0, k1) == owner[2:]
        seen[t0:t1] += 1
    assert (seen == 1).all()
    assert table[0, 3] - table[0, 2] == s.total_tokens  # the longest key range launches first


# ---- errors ---------------------------------------------------------------------------------------------
BAD_RANGES = {
    "key end past Lk": ([(0, 4, 0, 11)], "k_end <= Lk = 10"),
    "query end past Lq": ([(0, 9, 0, 4)], "q_end <= Lq = 8"),
    "empty key range": ([(0, 4, 3, 3)], "empty key range"),
    "empty query range": ([(2, 2, 0, 4)], "q_end > q_start"),
    "negative start": ([(-1, 4, 0, 4)], "starts >= 0"),
    "overlapping queries": ([(0, 4, 0, 4), (3, 6, 0, 4)], "must not overlap"),
    "not a 4-tuple": ([(0, 4, 0)], "q_start, q_end, k_start, k_end"),
    "no ranges": ([], "at least one"),
}


@pytest.mark.parametrize("fn", [sa.scale_masked_attention, sa.scale_masked_attention_ref])
@pytest.mark.parametrize("case", list(BAD_RANGES))
def test_bad_ranges_raise_config_error(fn, case):
    ranges, message = BAD_RANGES[case]
    q, k = torch.zeros(1, 1, 8, 16), torch.zeros(1, 1, 10, 16)
    with pytest.raises(ConfigError, match=message):
        fn(q, k, k, ranges)


def _bad_tensors():
    z = torch.zeros
    ok_q, ok_kv = z(2, 2, 8, 16), z(2, 2, 10, 16)
    return {
        "k/v shapes differ": ((ok_q, ok_kv, z(2, 2, 9, 16)), "same shape"),
        "head dims differ": ((ok_q, z(2, 2, 10, 8), z(2, 2, 10, 8)), "agree on B, H and c"),
        "batch differs": ((z(1, 2, 8, 16), ok_kv, ok_kv), "agree on B, H and c"),
        "3-D q": ((z(2, 8, 16), ok_kv, ok_kv), "4-D"),
        "head dim too large": ((z(1, 1, 8, 257), z(1, 1, 10, 257), z(1, 1, 10, 257)), "1..256"),
        "dtypes differ": ((ok_q, ok_kv.double(), ok_kv.double()), "one dtype"),
        "int dtype": ((ok_q.int(), ok_kv.int(), ok_kv.int()), "one dtype"),
    }


@pytest.mark.parametrize("fn", [sa.scale_masked_attention, sa.scale_masked_attention_ref])
@pytest.mark.parametrize("case", list(_bad_tensors()))
def test_bad_tensors_raise_config_error(fn, case):
    (q, k, v), message = _bad_tensors()[case]
    with pytest.raises(ConfigError, match=message):
        fn(q, k, v, [(0, 4, 0, 4)])


def test_bad_out_and_block_sizes_raise_config_error():
    q, kv = torch.zeros(1, 1, 8, 16), torch.zeros(1, 1, 10, 16)
    with pytest.raises(ConfigError, match="out must match q"):
        sa.scale_masked_attention(q, kv, kv, [(0, 4, 0, 4)], out=torch.zeros(1, 1, 8, 16, dtype=torch.float64))
    with pytest.raises(ConfigError, match="power of two"):
        sa.scale_masked_attention(q, kv, kv, [(0, 4, 0, 4)], block_m=24)


def test_cpu_without_interpreter_or_in_half_precision_raises_backend_error(monkeypatch):
    q = torch.zeros(1, 1, 8, 16)
    with pytest.raises(BackendError, match="float32 only"):
        sa.scale_masked_attention(q.half(), q.half(), q.half(), [(0, 4, 0, 4)])
    monkeypatch.setattr(sa, "_INTERPRETED", False)
    with pytest.raises(BackendError, match="CUDA GPU or TRITON_INTERPRET=1"):
        sa.scale_masked_attention(q, q, q, [(0, 4, 0, 4)])


def test_module_imports_and_explains_itself_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("_scale_attention_no_triton", sa.__file__)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # dataclasses look their module up while it executes
    spec.loader.exec_module(mod)
    assert mod.HAS_TRITON is False
    q = torch.randn(1, 1, 4, 16)
    assert torch.isfinite(mod.scale_masked_attention_ref(q, q, q, [(0, 4, 0, 4)])).all()
    with pytest.raises(BackendError, match="pip install"):
        mod.scale_masked_attention(q, q, q, [(0, 4, 0, 4)])


# ---- costs ----------------------------------------------------------------------------------------------
def test_mask_savings_of_mindhier_512():
    s = preset("mindhier-512").schedule
    savings = sac.mask_savings(s)
    assert savings["cross"] == pytest.approx(1 - 1 / s.n_levels, abs=1e-12)
    dense = {"cross": s.cross_attn_mask(), **{m: s.self_attn_mask(m) for m in ("scale_local", "block_causal")}}
    for kind, mask in dense.items():
        assert savings[kind] == pytest.approx(1 - mask.float().mean().item(), abs=1e-6)
    assert savings["cross"] > savings["scale_local"] > savings["block_causal"] > 0


@pytest.mark.parametrize("kind", sa.KINDS)
@pytest.mark.parametrize(("block_m", "block_n"), [(16, 16), (64, 32)])
def test_attention_cost_matches_a_brute_force_count(kind, block_m, block_n):
    s = sched(2, 17, "fine_to_coarse")
    ranges = s.key_ranges(kind)
    B, H, c, nbytes = 2, 3, 48, 2
    mask = s.cross_attn_mask() if kind == "cross" else s.self_attn_mask(kind)
    cost = sac.attention_cost(ranges, B, H, c, nbytes, block_m=block_m, block_n=block_n)
    assert cost["flops"] == 4 * c * int(mask.sum()) * B * H
    assert cost["softmax_exps"] == int(mask.sum()) * B * H
    kv_loads, tiles, steps = 0, 0, 0
    for q0, q1, _, _ in ranges:  # each query tile loads the union of the keys its rows may see, K and V
        for t in range(q0, q1, block_m):
            keys = int(mask[t : min(t + block_m, q1)].any(0).sum())
            kv_loads, tiles, steps = kv_loads + keys, tiles + 1, steps + math.ceil(keys / block_n)
    rows = int(mask.any(-1).sum())
    assert cost["bytes_q_out"] == 2 * rows * c * nbytes * B * H
    assert cost["bytes_kv"] == 2 * kv_loads * c * nbytes * B * H
    assert cost["bytes"] == cost["bytes_q_out"] + cost["bytes_kv"]
    assert cost["n_tiles"] == tiles
    assert cost["mma_flops"] == 4 * block_m * block_n * 64 * steps * B * H  # c = 48 runs as BLOCK_D = 64


def test_cost_report_of_mindhier_512():
    report = sac.cost_report("mindhier-512")
    assert report["heads"] == 30 and report["head_dim"] == 64 and report["tokens"] == 2240
    assert report["kinds"]["cross"]["flops_ratio"] == pytest.approx(0.25)
    for kind in sa.KINDS:
        assert report["kinds"][kind]["flops_ratio"] == pytest.approx(1 - report["mask_savings"][kind])
        assert report["kinds"][kind]["bytes_ratio"] < 1


# ---- the compiled path, checked without a GPU -----------------------------------------------------------
AOT_SCRIPT = """
import sys
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:
    print(f"no ahead-of-time compiler API in this Triton: {e}")
    sys.exit(3)
from mindhier_rt.kernels import scale_attention as sa

fn = sa._scale_attn_fwd_kernel
for dtype, head_dim in [("fp16", 48), ("bf16", 64), ("fp32", 32)]:
    cfg = sa.launch_config(head_dim)
    consts = {"HEAD_DIM": head_dim, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_D": cfg.block_d,
              "DOT_PRECISION": "ieee" if dtype == "fp32" else None}
    ptrs = {"Q": "*" + dtype, "K": "*" + dtype, "V": "*" + dtype, "O": "*" + dtype, "TILES": "*i32"}
    sig = {n: ptrs.get(n, "constexpr" if n in consts else "fp32" if n == "qk_scale_log2" else "i32")
           for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(n),): x for n, x in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    assert k.asm["cubin"], dtype
    print(dtype, head_dim, "wgmma" if "wgmma" in k.asm["ptx"] else "fma", k.metadata.shared)
"""


@pytest.fixture(scope="module")
def aot_lines(tmp_path_factory) -> list[str]:
    """Output lines of one subprocess that compiles the block-sparse kernel to sm_90 cubins and the plugin's
    single-range kernel to sm_90 PTX (a process that imported Triton in interpreter mode cannot compile)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path_factory.mktemp("triton"))}
    cmd = [sys.executable, "-c", AOT_SCRIPT + PLUGIN_AOT_SCRIPT]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if run.returncode == 3:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.strip().split("\n")


def test_kernel_compiles_for_hopper_without_a_gpu(aot_lines):
    """Ahead-of-time compile to sm_90 cubins (ptxas included): catches what the interpreter lets through."""
    assert any(line.startswith("fp16 48 wgmma") for line in aot_lines), aot_lines  # both dots on tensor cores
    assert any(line.startswith("bf16 64 wgmma") for line in aot_lines), aot_lines


@pytest.mark.parametrize("lq, lk, head_dim", [(1, 1, 32), (9, 17, 64), (70, 5, 48), (16, 130, 64)])
def test_single_range_kernel_matches_reference(lq, lk, head_dim):
    """The plugin's kernel: every query over every key, contiguous inputs, the same numbers as the reference."""
    gen = torch.Generator().manual_seed(lq * 1000 + lk)
    q = randn(2, 3, lq, head_dim, gen=gen)
    k = randn(2, 3, lk, head_dim, gen=gen)
    v = randn(2, 3, lk, head_dim, gen=gen)
    got = sa.single_range_attention(q, k, v, scale=0.3)
    ref = sa.scale_masked_attention_ref(q, k, v, [(0, lq, 0, lk)], scale=0.3)
    assert rel_err(got, ref) < CPU_RTOL
    with pytest.raises(ConfigError, match="at least one key"):
        sa.single_range_attention(q, k[:, :, :0], v[:, :, :0])


PLUGIN_AOT_SCRIPT = r"""
import re, sys, torch
try:
    from triton.backends.compiler import GPUTarget  # noqa: F401
except Exception as e:
    print(f"no Triton AOT compiler here: {e}"); sys.exit(3)
from mindhier_rt.kernels import scale_attention as sa
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    k = sa.compile_single_range(dtype, 64, 0.125, (9, 0))
    params = re.search(r"\.entry\s+" + k.name + r"\s*\((.*?)\)", k.ptx, re.S).group(1).split(",")
    kinds = ["u32" if ".u32" in p else "ptr" if ".ptr" in p else "?" for p in params]
    print(dtype, k.name, k.num_warps, k.block_m, k.scratch_bytes, " ".join(kinds), ".target sm_90" in k.ptx)
"""


def test_single_range_kernel_compiles_to_ptx_for_the_plugin(aot_lines):
    """What the TensorRT plugin embeds: PTX for sm_90 whose parameters are (q, k, v pointers, heads, Lq, Lk, out
    pointer) and Triton's two trailing scratch pointers, with no scratch memory asked for."""
    lines = [line for line in aot_lines if line.startswith("torch.")]
    assert len(lines) == 3, aot_lines
    for line in lines:
        fields = line.split()
        assert fields[1] == "_single_range_attn_fwd_kernel" and fields[2:5] == ["4", "64", "0"], line
        assert fields[5:12] == ["ptr", "ptr", "ptr", "u32", "u32", "u32", "ptr"] and fields[-1] == "True", line


# ---- GPU ------------------------------------------------------------------------------------------------
@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", sa.KINDS)
@pytest.mark.parametrize("head_dim", [32, 48, 64])
def test_gpu_kernel_matches_reference(dtype, kind, head_dim):
    s = preset("mindhier-256").schedule
    gen = torch.Generator().manual_seed(4)
    L = s.total_tokens
    S = s.context_length if kind == "cross" else L
    q = randn(2, L, 4, head_dim, gen=gen, dtype=dtype).transpose(1, 2)
    k = randn(2, S, 4, head_dim, gen=gen, dtype=dtype).transpose(1, 2)
    v = randn(2, 4, S, head_dim, gen=gen, dtype=dtype)
    check_against_ref(q, k, v, s.key_ranges(kind), GPU_RTOL[dtype])


@gpu
@needs_cuda
def test_gpu_benchmark_runs_on_a_small_preset():
    result = sac.benchmark("small", batch=2, warmup=2, repeats=5)
    for kind in sa.KINDS:
        r = result["kinds"][kind]
        assert r["ms_kernel"] > 0 and r["ms_sdpa_dense_mask"] > 0 and r["max_abs_diff"] < 2e-2
