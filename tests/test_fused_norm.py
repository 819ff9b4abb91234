"""Fused norm chains (``kernels/fused_norm.py``): the Triton kernels against their references, the Switti block
with and without them, and the fast backend using them.

Without CUDA the kernels run under Triton's interpreter (float32, CPU); the half-precision checks on the compiled
kernels are marked ``gpu``.
"""

import copy
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates the kernels

pytest.importorskip("triton", reason="triton is not installed (pip install 'mindhier-rt[gpu]')")

from mindhier_rt.config import preset
from mindhier_rt.errors import BackendError, ConfigError
from mindhier_rt.execution import execution
from mindhier_rt.kernels import fused_norm as fn
from mindhier_rt.models.blocks import SwittiBlock, rope_tables
from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.pipeline import reconstruct
from mindhier_rt.runtime.torch_backend import TorchBackend
from mindhier_rt.runtime.torch_fast import FastTorchBackend
from mindhier_rt.sampling import SamplingConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not fn._INTERPRETED:
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)
GPU_RTOL = {torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 1e-5}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max()).item()


def inputs(B: int, l: int, C: int, seed: int, dtype=torch.float32):
    """x, h [B, l, C] and AdaLN vectors that are strided slices of one [B, 6, C] tensor, as in the block."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, l, C, generator=g) * 3 + 0.5).to(DEVICE, dtype)
    h = torch.randn(B, l, C, generator=g).to(DEVICE, dtype)
    ada = (torch.randn(B, 6, C, generator=g) * 0.5).to(DEVICE, dtype)
    w1, w2 = (torch.rand(C, generator=g) + 0.5).to(DEVICE), (torch.rand(C, generator=g) + 0.5).to(DEVICE)
    return x, h, ada.split(1, dim=1), w1, w2


@pytest.mark.parametrize("C", [64, 96, 171])
@pytest.mark.parametrize("modulated", [False, True])
def test_rms_norm_modulate_matches_reference(C, modulated):
    x, _, (_, _, scale, _, shift, _), w, _ = inputs(3, 5, C, seed=C)
    args = (x, w, 1e-6) + ((scale, shift) if modulated else ())
    got, ref = fn.rms_norm_modulate(*args), fn.rms_norm_modulate_ref(*args)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert rel_err(got, ref) < 1e-5


@pytest.mark.parametrize("C", [64, 171])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("then", ["none", "plain", "modulated"])
def test_residual_rms_norm_matches_reference(C, gated, then):
    x, h, (gamma, _, _, scale, _, shift), w1, w2 = inputs(2, 9, C, seed=7 * C)
    kwargs = {"gate_B1C": gamma if gated else None}
    if then != "none":
        kwargs |= {"next_weight_C": w2, "next_eps": 1e-5}
    if then == "modulated":
        kwargs |= {"next_scale_B1C": scale, "next_shift_B1C": shift}
    gx, gn = fn.residual_rms_norm(x, h, w1, 1e-6, **kwargs)
    rx, rn = fn.residual_rms_norm_ref(x, h, w1, 1e-6, **kwargs)
    assert rel_err(gx, rx) < 1e-5
    if then == "none":
        assert gn is None and rn is None
    else:
        assert rel_err(gn, rn) < 1e-5


def test_silu_mul_and_non_contiguous_inputs():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 7, 2 * 45, generator=g).to(DEVICE)[..., ::2]  # strided: copied to contiguous inside
    b = torch.randn(4, 7, 45, generator=g).to(DEVICE)
    assert rel_err(fn.silu_mul(a, b), fn.silu_mul_ref(a, b)) < 1e-5
    gu = torch.randn(3, 5, 2 * 1500, generator=g).to(DEVICE)  # the halves of a packed projection, read in place
    got = fn.silu_mul(gu[..., :1500], gu[..., 1500:])
    assert got.is_contiguous() and rel_err(got, fn.silu_mul_ref(gu[..., :1500], gu[..., 1500:])) < 1e-5
    x = torch.randn(2, 3, 2 * 64, generator=g).to(DEVICE)[..., :64]  # rows with a stride of 128
    w = torch.ones(64, device=DEVICE)
    assert rel_err(fn.rms_norm_modulate(x, w, 1e-6), fn.rms_norm_modulate_ref(x, w, 1e-6)) < 1e-5


@pytest.mark.parametrize("heads, c", [(2, 48), (4, 32)])
@pytest.mark.parametrize("cached", [False, True])
def test_qk_norm_rope_matches_reference(heads, c, cached):
    """q, k, v heads from the fused projection; with a cache, k and v land at the offset and nothing else moves."""
    g = torch.Generator().manual_seed(heads * c + cached)
    B, l, C, L, offset = 3, 7, heads * c, 20, 5
    qkv = (torch.randn(B, l, 3, C, generator=g) * 2 + 0.3).to(DEVICE)
    angles = torch.rand(l, c // 2, generator=g) * 6
    cos = torch.stack((angles.cos(), angles.cos()), -1).flatten(-2).to(DEVICE)
    sin = torch.stack((-angles.sin(), angles.sin()), -1).flatten(-2).to(DEVICE)
    caches = None
    if cached:
        before = torch.randn(2, B, heads, L, c, generator=g).to(DEVICE)
        caches = [before.clone(), before.clone()]  # kernel's, reference's
    got = fn.qk_norm_rope(qkv, cos, sin, heads, 1e-6, None if caches is None else tuple(caches[0]), offset)
    ref = fn.qk_norm_rope_ref(qkv, cos, sin, heads, 1e-6, None if caches is None else tuple(caches[1]), offset)
    for a, b in zip(got, ref, strict=True):
        assert a.shape == b.shape and rel_err(a, b) < 1e-5
    if cached:
        assert got[1].shape[2] == offset + l
        assert torch.equal(caches[0][:, :, :, :offset], before[:, :, :, :offset])  # earlier scales untouched
        assert torch.equal(caches[0][:, :, :, offset + l :], before[:, :, :, offset + l :])
        assert rel_err(caches[0], caches[1]) < 1e-5
    with pytest.raises(ConfigError, match="rotary tables"):
        fn.qk_norm_rope(qkv, cos[:-1], sin, heads, 1e-6)
    with pytest.raises(ConfigError, match="even size"):
        fn.qk_norm_rope(qkv[..., :-1], cos, sin, heads, 1e-6)


def test_block_with_fused_norms_matches_the_eager_block():
    torch.manual_seed(0)
    block = SwittiBlock(width=96, heads=2, context_dim=48, ffn_dim=171, eps=1e-6, crop_cond=False).to(DEVICE)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))  # gains away from 1 so that the test sees them
        B, l, S = 3, 6, 5
        x = torch.randn(B, l, 96, device=DEVICE)
        ada = block.modulation(torch.randn(B, 96, device=DEVICE), None)
        cos, sin = (t.float().to(DEVICE) for t in rope_tables(torch.rand(l, 24) * 6))  # head dim 48
        context = torch.randn(B, S, 48, device=DEVICE)
        k, v = block.context_kv(context)
        ref = block(x, ada, cos, sin, k, v)
        with execution(fused_norms=True):
            got = block(x, ada, cos, sin, k, v)
            k_fused, _ = block.context_kv(context)
        assert rel_err(got, ref) < 1e-5 and rel_err(k_fused, k) < 1e-5

        # SwiGLU's gate and up weights packed into one tensor: one GEMM on the fused path, same block, same state
        state = {n: t.clone() for n, t in block.state_dict().items()}
        assert block.ffn._packed_weight() is None
        block.ffn.pack_gate_up()
        assert block.ffn._packed_weight() is not None
        assert all(torch.equal(t, state[n]) for n, t in block.state_dict().items())
        with execution(fused_norms=True):
            packed = block(x, ada, cos, sin, k, v)
        assert rel_err(packed, ref) < 1e-5 and rel_err(block(x, ada, cos, sin, k, v), ref) < 1e-6
        block.double()  # converts each weight on its own: unpacked, the fused path falls back to two GEMMs
        assert block.ffn._packed_weight() is None


@pytest.mark.parametrize("mode", ["scale_local", "block_causal"])
def test_teacher_forced_pass_with_the_kernels_matches_the_eager_one(mode):
    """The whole pyramid in one pass with the block-sparse attention kernel (schedule masks as ranges, outputs
    written token-major) and the fused norms, against SDPA with dense masks and the PyTorch norms."""
    models = MindHier.from_config(preset("tiny").replace(attn_mode=mode), seed=0).eval()
    cfg, gen = models.cfg, models.generator
    g = torch.Generator().manual_seed(3)
    pooled = torch.randn(1, cfg.generator.pooled_dim or cfg.context_dim, generator=g)
    context = torch.randn(1, cfg.schedule.context_length, cfg.context_dim, generator=g)
    x = torch.randn(1, cfg.schedule.total_tokens - 1, cfg.latent_dim, generator=g)
    with torch.no_grad():
        ref = gen(pooled, context, x)
        with execution(attention="triton", fused_norms=True):
            got = gen(pooled, context, x)
    assert rel_err(got, ref) < 1e-4


@pytest.mark.parametrize("mode", ["scale_local", "block_causal"])
def test_fast_backend_with_fused_norms_gives_the_eager_tokens(mode, tiny_voxels):
    models = MindHier.from_config(preset("tiny").replace(attn_mode=mode), seed=0).eval()
    with torch.no_grad():
        models.generator.head.weight.mul_(8.0)  # peaked distributions, as a trained model has
    eager = TorchBackend(copy.deepcopy(models))
    fast = FastTorchBackend(models, device="cpu", fused=True)
    assert fast.fused and fast._scan(2).options.fused_norms
    sampling = SamplingConfig(seed=5)
    got = reconstruct(fast, tiny_voxels[:1], "subj01", sampling)
    ref = reconstruct(eager, tiny_voxels[:1], "subj01", sampling)
    for x, y in zip(got.tokens, ref.tokens, strict=True):
        assert torch.equal(x, y)


def test_bad_arguments_raise():
    x, h, (_, _, scale, _, shift, _), w, _ = inputs(2, 3, 64, seed=1)
    with pytest.raises(ConfigError, match="scale and shift come together"):
        fn.rms_norm_modulate(x, w, 1e-6, scale, None)
    with pytest.raises(ConfigError, match=r"must be \[2, 1, 64\]"):
        fn.rms_norm_modulate(x, w, 1e-6, scale[:1], shift[:1])
    with pytest.raises(ConfigError, match="one shape"):
        fn.residual_rms_norm(x, h[:, :2], w, 1e-6)
    with pytest.raises(ConfigError, match="need next_weight"):
        fn.residual_rms_norm(x, h, w, 1e-6, next_scale_B1C=scale, next_shift_B1C=shift)
    with pytest.raises(ConfigError, match=r"take \[B, l, C\]"):
        fn.rms_norm_modulate(x[0], w, 1e-6)


def test_cpu_without_interpreter_or_in_half_precision_raises_backend_error(monkeypatch):
    x = torch.zeros(1, 2, 8)
    w = torch.ones(8)
    monkeypatch.setattr(fn, "_INTERPRETED", False)
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
            fn.rms_norm_modulate(x, w, 1e-6)
    monkeypatch.setattr(fn, "_INTERPRETED", True)
    with pytest.raises(BackendError, match="float32 only"):
        fn.rms_norm_modulate(x.bfloat16(), w, 1e-6)
    monkeypatch.setattr(fn, "HAS_TRITON", False)
    with pytest.raises(BackendError, match="need Triton"):
        fn.silu_mul(x, x)


AOT_SCRIPT = r"""
import sys
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except Exception as e:
    print(f"no Triton AOT compiler here: {e}"); sys.exit(3)
from mindhier_rt.kernels import fused_norm as fn
flags = ("HAS_RES", "HAS_GATE", "HAS_NEXT", "HAS_MOD")
for dtype in ("fp32", "bf16", "fp16"):
    for combo in ((0, 0, 0, 1), (1, 1, 1, 1), (1, 0, 1, 0), (1, 1, 0, 0)):
        k = fn._norm_chain_kernel
        consts = dict(zip(flags, map(bool, combo))) | {"BLOCK_C": 2048}
        sig = {n: ("*" + dtype if n in ("H", "X", "GATE", "SCALE", "SHIFT", "OUT_X", "OUT_N") else "*fp32"
                   if n in ("W1", "W2") else "fp32" if n.startswith("eps") else "constexpr" if n in consts else "i32")
               for n in k.arg_names}
        src = ASTSource(fn=k, signature=sig, constexprs={(k.arg_names.index(n),): v for n, v in consts.items()})
        assert triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["cubin"]
    k = fn._qk_norm_rope_kernel
    consts = {"WIDTH": 1920, "HEAD_DIM": 64, "BLOCK_C": 2048}
    sig = {n: ("*" + dtype if n in ("QKV", "COS", "SIN", "Q_OUT", "K_OUT", "V_OUT") else "fp32" if n == "eps"
               else "constexpr" if n in consts else "i32") for n in k.arg_names}
    src = ASTSource(fn=k, signature=sig, constexprs={(k.arg_names.index(n),): v for n, v in consts.items()})
    assert triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["cubin"]
    k = fn._silu_mul_kernel
    sig = {"A": "*" + dtype, "B": "*" + dtype, "OUT": "*" + dtype, "n_cols": "i32", "stride_a": "i32",
           "stride_b": "i32", "BLOCK": "constexpr"}
    src = ASTSource(fn=k, signature=sig, constexprs={(k.arg_names.index("BLOCK"),): 1024})
    assert triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["cubin"]
    print("ok", dtype)
from mindhier_rt.kernels import token_draw as ks
k = ks._draw_kernel
sig = {n: ("*fp32" if n == "VALS" else "*fp64" if n == "TOP_P" else "*i64" if n.isupper() else "constexpr"
           if n == "BLOCK_K" else "i32") for n in k.arg_names}
src = ASTSource(fn=k, signature=sig, constexprs={(k.arg_names.index("BLOCK_K"),): 512})
ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
# the hash's products wrap in 32 bits and its shifts are logical, as fmix32 needs
assert "mul.lo.s32" in ptx and "shr.u32" in ptx and "__nv_exp" in ptx, "unexpected hash/exp lowering"
print("ok", "draw")
"""


def test_kernels_compile_for_hopper_without_a_gpu(tmp_path):
    """Ahead-of-time compile to sm_90 cubins in a subprocess (a process that imported Triton in interpreter mode
    cannot compile): catches what the interpreter lets through. Also the token-draw kernel of kernels/token_draw.py."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    if run.returncode == 3:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["ok", "fp32", "ok", "bf16", "ok", "fp16", "ok", "draw"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_kernels_match_the_float32_reference(dtype):
    """Half-precision kernels against the float32 reference of the same (rounded) inputs."""
    x, h, (gamma, _, scale, scale2, shift, shift2), w1, w2 = inputs(4, 100, 1920, seed=11, dtype=dtype)
    up = lambda t: t.float()  # noqa: E731
    got = fn.rms_norm_modulate(x, w1, 1e-6, scale, shift)
    assert rel_err(got, fn.rms_norm_modulate_ref(up(x), w1, 1e-6, up(scale), up(shift))) < GPU_RTOL[dtype]
    gx, gn = fn.residual_rms_norm(x, h, w1, 1e-6, gamma, w2, 1e-6, scale2, shift2)
    rx, rn = fn.residual_rms_norm_ref(up(x), up(h), w1, 1e-6, up(gamma), w2, 1e-6, up(scale2), up(shift2))
    assert rel_err(gx, rx) < GPU_RTOL[dtype] and rel_err(gn, rn) < 4 * GPU_RTOL[dtype]
    assert rel_err(fn.silu_mul(x, h), fn.silu_mul_ref(up(x), up(h))) < GPU_RTOL[dtype]
    qkv = torch.randn(4, 100, 3, 1920, device="cuda").to(dtype)
    angles = torch.rand(100, 32, device="cuda") * 6
    cos = torch.stack((angles.cos(), angles.cos()), -1).flatten(-2).to(dtype)
    sin = torch.stack((-angles.sin(), angles.sin()), -1).flatten(-2).to(dtype)
    got = fn.qk_norm_rope(qkv, cos, sin, 30, 1e-6)
    for a, b in zip(got, fn.qk_norm_rope_ref(up(qkv), up(cos), up(sin), 30, 1e-6), strict=True):
        assert rel_err(a, b) < 2 * GPU_RTOL[dtype]
