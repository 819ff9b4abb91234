"""The one backend contract (``runtime.base.DecodeBackend``): every backend subclasses it for its defaults, the loop
calls its members directly, ``update`` returns a ``ScaleUpdate`` and the voxels are checked once, by the loop."""

from __future__ import annotations

import importlib

import pytest
import torch

from mindhier_rt.config import preset
from mindhier_rt.errors import ConfigError, InputError
from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.pipeline import reconstruct
from mindhier_rt.runtime.base import DecodeBackend, ScaleUpdate
from mindhier_rt.runtime.torch_backend import TorchBackend
from mindhier_rt.runtime.torch_fast import FastTorchBackend
from mindhier_rt.sampling import SamplingConfig, choose_tokens


class Recording(TorchBackend):
    """The eager backend, counting what the loop calls."""

    def __init__(self, models: MindHier) -> None:
        super().__init__(models)
        self.calls: dict[str, int] = {"encode": 0, "choose_tokens": 0}

    def encode(self, voxels_BV, subject):
        self.calls["encode"] += 1
        return super().encode(voxels_BV, subject)

    def choose_tokens(self, logits_BlV, scfg, scale, guidance, scan_ids, sample_ids):
        self.calls["choose_tokens"] += 1
        return super().choose_tokens(logits_BlV, scfg, scale, guidance, scan_ids, sample_ids)


@pytest.fixture(scope="module")
def models() -> MindHier:
    return MindHier.from_config(preset("tiny"), seed=0).eval()


@pytest.mark.parametrize(
    ("module", "cls"),
    [
        ("mindhier_rt.runtime.torch_backend", "TorchBackend"),
        ("mindhier_rt.runtime.torch_fast", "FastTorchBackend"),
        ("mindhier_rt.runtime.onnxruntime_backend", "OnnxRuntimeBackend"),
        ("mindhier_rt.runtime.tensorrt_backend", "TensorRTBackend"),
    ],
)
def test_every_backend_subclasses_the_contract(module, cls):
    backend_cls = getattr(importlib.import_module(module), cls)
    assert DecodeBackend in backend_cls.__mro__  # subclassed, not only the same members
    assert not backend_cls.__abstractmethods__  # every contract method implemented


def test_the_defaults_come_from_the_base_class(models):
    eager = TorchBackend(models)
    assert eager.host_threads is None
    assert type(eager).choose_tokens is DecodeBackend.choose_tokens
    assert eager.voxel_count("subj01") == preset("tiny").encoder.voxel_count("subj01")
    logits = torch.randn(4, 3, preset("tiny").vocab_size, generator=torch.Generator().manual_seed(0))
    ids = torch.arange(2)
    got = eager.choose_tokens(logits, SamplingConfig(seed=3), 1, 0.5, ids, ids)
    assert torch.equal(got, choose_tokens(logits, SamplingConfig(seed=3), 1, 0.5, ids, ids))
    with pytest.raises(ConfigError, match="unknown subject 'subj09'"):
        eager.voxel_count("subj09")
    assert FastTorchBackend.choose_tokens is not DecodeBackend.choose_tokens  # replays it as a CUDA graph


def test_a_backend_without_an_encoder_has_no_voxel_count(models):
    headless = TorchBackend(MindHier(models.cfg.replace(encoder=None), None, models.generator, models.vqvae))
    with pytest.raises(InputError, match="has no fMRI encoder"):
        headless.voxel_count("subj01")


def test_a_backend_missing_a_method_cannot_be_made(models):
    class NoUpdate(DecodeBackend):
        def encode(self, voxels_BV, subject): ...
        def prepare(self, pooled_BD, context_BSD): ...
        def select(self, state, rows): ...
        def step(self, i, state, h_BlC): ...
        def empty_fhat(self, batch): ...
        def decode_image(self, f_hat_BEhw): ...

    with pytest.raises(TypeError, match="update"):
        NoUpdate()


def test_the_loop_calls_the_backends_choose_tokens(models, tiny_voxels):
    backend = Recording(models)
    rec = reconstruct(backend, tiny_voxels[:2], "subj01", SamplingConfig(seed=1))
    assert backend.calls == {"encode": 2, "choose_tokens": models.cfg.schedule.n_scales}  # cond + null encodes
    plain = reconstruct(TorchBackend(models), tiny_voxels[:2], "subj01", SamplingConfig(seed=1))
    assert all(torch.equal(a, b) for a, b in zip(rec.tokens, plain.tokens, strict=True))


@pytest.mark.parametrize(
    ("voxels", "message"),
    [
        (torch.zeros(2, 95), "subject subj01 expects 96 voxels per scan, got 95"),
        (torch.zeros(2, 3, 96), r"expects voxels of shape \[batch, 96\]"),
        (torch.tensor([[0.0] * 95 + [float("nan")], [0.0] * 96]), "1 of 2 voxel rows for subject subj01 contain NaN"),
    ],
)
def test_the_loop_checks_the_voxels_before_encoding(models, voxels, message):
    backend = Recording(models)
    with pytest.raises(InputError, match=message):
        reconstruct(backend, voxels, "subj01", SamplingConfig())
    assert backend.calls["encode"] == 0


def test_update_returns_the_next_scales_embedded_input(models):
    """Torch backends embed the next scale's tokens in ``update`` (as the exported update graphs do); ``step``
    takes them as they are. Against the generator's own step on the VQ-VAE's raw next-scale latent."""
    backend = TorchBackend(models)
    cfg, gen, vq = models.cfg, models.generator, models.vqvae
    g = torch.Generator().manual_seed(0)
    pooled = torch.randn(2, cfg.generator.pooled_dim or cfg.context_dim, generator=g)
    context = torch.randn(2, cfg.schedule.context_length, cfg.context_dim, generator=g)
    state, ref_state = backend.prepare(pooled, context), gen.prepare(pooled, context)
    f_hat = ref_f_hat = backend.empty_fhat(2)
    h_BlC = x_BlE = None
    for i in range(cfg.schedule.n_scales):
        with torch.no_grad():
            ref = gen.step(i, ref_state, x_BlE)
        assert torch.equal(backend.step(i, state, h_BlC), ref)
        idx = torch.randint(0, cfg.vocab_size, (2, cfg.schedule.token_counts[i]), generator=g)
        update = backend.update(i, f_hat, idx)
        ref_f_hat, x_BlE = vq.update_fhat(i, ref_f_hat, idx)
        assert isinstance(update, ScaleUpdate) and torch.equal(update.f_hat_BEhw, ref_f_hat)
        f_hat, h_BlC = update
        if x_BlE is None:
            assert h_BlC is None
        else:
            assert tuple(h_BlC.shape) == (2, cfg.schedule.token_counts[i + 1], cfg.generator.width)
            assert torch.equal(h_BlC, gen.embed_scale(i + 1, x_BlE).detach())
