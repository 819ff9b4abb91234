"""The fast torch backend against the eager reference: same tokens in float32, on CPU (static buffers) and,
where a GPU is present, with CUDA graphs, Triton attention and half precision."""

import copy

import pytest
import torch

from mindhier_rt.config import preset
from mindhier_rt.errors import ConfigError
from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.pipeline import reconstruct
from mindhier_rt.runtime.torch_backend import TorchBackend
from mindhier_rt.runtime.torch_fast import FastTorchBackend
from mindhier_rt.sampling import SamplingConfig

CUDA = torch.cuda.is_available()


def peaked_models(mode: str) -> MindHier:
    models = MindHier.from_config(preset("tiny").replace(attn_mode=mode), seed=0).eval()
    with torch.no_grad():  # peaked next-token distributions, as a trained model has
        models.generator.head.weight.mul_(8.0)
    return models


def assert_same_tokens(a, b) -> None:
    for i, (x, y) in enumerate(zip(a.tokens, b.tokens, strict=True)):
        assert torch.equal(x, y), f"scale {i}: {int((x != y).sum())} of {x.numel()} tokens differ"


@pytest.mark.parametrize("mode", ["scale_local", "block_causal"])
@pytest.mark.parametrize("sampling", [SamplingConfig(seed=3), SamplingConfig(seed=4, cfg_stop=2)], ids=["cfg", "stop"])
def test_static_buffers_give_the_eager_tokens_on_cpu(mode, sampling, tiny_voxels):
    models = peaked_models(mode)
    eager = TorchBackend(copy.deepcopy(models))
    fast = FastTorchBackend(models, device="cpu")
    assert fast.dtype == torch.float32 and not fast.cuda_graphs and fast.attention == "sdpa"
    for voxels in (tiny_voxels[:3], tiny_voxels[3:5], tiny_voxels[:3]):  # buffers reused across scans
        ref = reconstruct(eager, voxels, "subj01", sampling, samples=2)
        got = reconstruct(fast, voxels, "subj01", sampling, samples=2)
        assert_same_tokens(got, ref)
        assert (got.images_NS3HW - ref.images_NS3HW).abs().max() < 1e-4
    rows = {3 * 2 * 2, 3 * 2, 2 * 2 * 2, 2 * 2} if sampling.cfg_stop is not None else {3 * 2 * 2, 2 * 2 * 2}
    assert set(fast._scans) == rows


def test_triton_attention_in_the_fast_backend_on_cpu(tiny_voxels):
    pytest.importorskip("triton")
    from mindhier_rt.kernels.scale_attention import HAS_TRITON

    if not HAS_TRITON or (not CUDA and __import__("os").environ.get("TRITON_INTERPRET") != "1"):
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")
    models = peaked_models("block_causal")
    eager = TorchBackend(copy.deepcopy(models))
    fast = FastTorchBackend(models, device="cpu", attention="triton")
    sampling = SamplingConfig(seed=5)
    assert_same_tokens(
        reconstruct(fast, tiny_voxels[:2], "subj01", sampling), reconstruct(eager, tiny_voxels[:2], "subj01", sampling)
    )


@pytest.mark.parametrize("decoder_dtype, max_abs", [("float16", 3 / 255), ("bfloat16", 0.15)])
def test_half_precision_image_decoder_stays_close(decoder_dtype, max_abs, tiny_voxels):
    """Tokens do not depend on the image decoder; its images stay within the documented distance of float32."""
    models = peaked_models("scale_local")
    eager = TorchBackend(copy.deepcopy(models))
    fast = FastTorchBackend(models, device="cpu", decoder_dtype=decoder_dtype)
    assert fast.decoder_dtype == getattr(torch, decoder_dtype)
    assert next(models.vqvae.parameters()).dtype == torch.float32  # weights stay float32 (autocast)
    ref = reconstruct(eager, tiny_voxels[:2], "subj01", SamplingConfig(seed=6))
    got = reconstruct(fast, tiny_voxels[:2], "subj01", SamplingConfig(seed=6))
    assert_same_tokens(got, ref)
    assert got.images_NS3HW.dtype == torch.float32
    diff = (got.images_NS3HW - ref.images_NS3HW).abs()
    assert 0 < diff.max() < max_abs


def test_channels_last_image_decoder_gives_the_same_images():
    models = peaked_models("scale_local")
    fast = FastTorchBackend(models, device="cpu")
    f_hat = torch.randn(2, models.cfg.latent_dim, 4, 4)
    nchw = fast.decode_image(f_hat)
    fast.set_decoder_layout("channels_last")
    assert models.vqvae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    nhwc = fast.decode_image(f_hat)
    assert nhwc.is_contiguous() and (nhwc - nchw).abs().max() < 1e-5
    with pytest.raises(ConfigError, match="decoder_layout"):
        fast.set_decoder_layout("nhwc")


def test_cpu_refuses_what_needs_cuda():
    models = peaked_models("scale_local")
    with pytest.raises(ConfigError, match="CUDA only"):
        FastTorchBackend(models, device="cpu", dtype="bfloat16")
    with pytest.raises(ConfigError, match="CUDA graphs"):
        FastTorchBackend(models, device="cpu", cuda_graphs=True)
    with pytest.raises(ConfigError, match="dtype"):
        FastTorchBackend(models, device="cpu", dtype="int8")
    with pytest.raises(ConfigError, match="decoder_dtype"):
        FastTorchBackend(models, device="cpu", decoder_dtype="int8")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["scale_local", "block_causal"])
@pytest.mark.parametrize("attention", [None, "triton"])  # float32's default (SDPA) and the kernel
def test_cuda_graphs_float32_give_the_eager_tokens(mode, attention, tiny_voxels):
    models = peaked_models(mode)
    eager = TorchBackend(copy.deepcopy(models), device="cuda")
    fast = FastTorchBackend(models, device="cuda", dtype="float32", decoder_dtype="float32", attention=attention)
    assert fast.cuda_graphs and fast.attention == (attention or "sdpa")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for sampling in (SamplingConfig(seed=1), SamplingConfig(seed=2, cfg_stop=2)):
        for _ in range(2):  # the second decode replays the captured graphs
            ref = reconstruct(eager, tiny_voxels[:3], "subj01", sampling, samples=2)
            got = reconstruct(fast, tiny_voxels[:3], "subj01", sampling, samples=2)
            assert_same_tokens(got, ref)
            assert (got.images_NS3HW - ref.images_NS3HW).abs().max() < 1e-4
    # every phase ran as a captured graph: none fell back to eager execution
    for call in (fast._encode, fast._prepare, fast._choose, fast._update, fast._decode):
        assert call._graphs and all(entry is not None for entry in call._graphs.values()), call.name


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_stays_close(dtype, tiny_voxels):
    """Documented tolerance: first-scale logits within 5e-2 max relative error of float32 eager."""
    models = peaked_models("scale_local")
    eager = TorchBackend(copy.deepcopy(models), device="cuda")
    fast = FastTorchBackend(models, device="cuda", dtype=dtype)
    v = tiny_voxels[:2].cuda()
    logits = []
    for backend in (eager, fast):
        pooled, ctx = backend.encode(v, "subj01")
        logits.append(backend.step(0, backend.prepare(pooled, ctx), None))
    assert ((logits[1] - logits[0]).abs().max() / logits[0].abs().max()).item() < 5e-2


def test_decode_command_with_the_fast_backend(cli, tiny_ckpt, tmp_path):
    import numpy as np

    voxels = np.random.default_rng(0).standard_normal((2, preset("tiny").encoder.voxel_count("subj01")))
    np.save(tmp_path / "v.npy", voxels.astype(np.float32))
    common = ["--ckpt", tiny_ckpt, "--fmri", tmp_path / "v.npy", "--subject", "subj01", "--seed", "2"]
    assert cli("decode", *common, "--backend", "torch-fast", "--out", tmp_path / "fast")[0] == 0
    assert cli("decode", *common, "--out", tmp_path / "eager")[0] == 0
    for name in ("scan00000.png", "scan00001.png"):
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "eager" / name).read_bytes()
