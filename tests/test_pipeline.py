"""The decode loop with the torch backend: determinism, batch invariance, guidance switching."""

import pytest
import torch

from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.pipeline import reconstruct
from mindhier_rt.runtime.torch_backend import TorchBackend
from mindhier_rt.sampling import SamplingConfig


@pytest.fixture(scope="module", params=["scale_local", "block_causal"])
def backend(request, tiny_ckpt):
    models = MindHier.load(tiny_ckpt)
    if request.param == "block_causal":
        cfg = models.cfg.replace(attn_mode="block_causal")
        fresh = MindHier.from_config(cfg, seed=0)
        models = MindHier(cfg, models.encoder, fresh.generator, models.vqvae)
    return TorchBackend(models)


def tokens_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens, strict=True))


def test_shapes_and_range(backend, tiny_voxels):
    cfg = backend.cfg
    rec = reconstruct(backend, tiny_voxels[:3], "subj01", SamplingConfig(), samples=2)
    assert rec.images_NS3HW.shape == (3, 2, 3, cfg.image_size, cfg.image_size)
    assert rec.images_NS3HW.min() >= 0 and rec.images_NS3HW.max() <= 1
    assert [t.shape for t in rec.tokens] == [(3, 2, n) for n in cfg.schedule.token_counts]
    assert all(((t >= 0) & (t < cfg.vocab_size)).all() for t in rec.tokens)


def test_seed_controls_the_draw(backend, tiny_voxels):
    a = reconstruct(backend, tiny_voxels[:2], "subj01", SamplingConfig(seed=1), samples=2)
    b = reconstruct(backend, tiny_voxels[:2], "subj01", SamplingConfig(seed=1), samples=2)
    c = reconstruct(backend, tiny_voxels[:2], "subj01", SamplingConfig(seed=2), samples=2)
    assert tokens_equal(a, b) and torch.equal(a.images_NS3HW, b.images_NS3HW)
    assert not tokens_equal(a, c)
    # the samples of one scan differ from each other
    assert not torch.equal(a.tokens[-1][:, 0], a.tokens[-1][:, 1])


def test_tokens_do_not_depend_on_the_batch(backend, tiny_voxels):
    ids = torch.tensor([10, 11, 12, 13])
    batched = reconstruct(backend, tiny_voxels[:4], "subj01", SamplingConfig(), samples=2, scan_ids=ids)
    for j in range(4):
        alone = reconstruct(
            backend, tiny_voxels[j : j + 1], "subj01", SamplingConfig(), samples=2, scan_ids=ids[j : j + 1]
        )
        for t_batched, t_alone in zip(batched.tokens, alone.tokens, strict=True):
            assert torch.equal(t_batched[j], t_alone[0])
        assert (batched.images_NS3HW[j] - alone.images_NS3HW[0]).abs().max() < 1e-4


def test_guidance_switch_off_and_greedy(backend, tiny_voxels):
    sampling = SamplingConfig(cfg_stop=2)
    a = reconstruct(backend, tiny_voxels[:2], "subj01", sampling)
    full = reconstruct(backend, tiny_voxels[:2], "subj01", SamplingConfig())
    # before the stop scale the two runs are the same computation
    assert torch.equal(a.tokens[0], full.tokens[0]) and torch.equal(a.tokens[1], full.tokens[1])
    g1 = reconstruct(backend, tiny_voxels[:2], "subj01", SamplingConfig(greedy=True, seed=1), samples=2)
    g2 = reconstruct(backend, tiny_voxels[:2], "subj01", SamplingConfig(greedy=True, seed=2), samples=2)
    assert tokens_equal(g1, g2) and torch.equal(g1.tokens[-1][:, 0], g1.tokens[-1][:, 1])
    unguided = reconstruct(backend, tiny_voxels[:2], "subj01", SamplingConfig(cfg_scale=0.0))
    assert [t.shape for t in unguided.tokens] == [t.shape for t in full.tokens]


def test_host_threads_limit_applies_during_the_loop_and_is_restored(backend, tiny_voxels):
    """A backend's ``host_threads`` caps PyTorch's threads while the loop runs and is undone afterwards."""
    before = torch.get_num_threads()
    if before < 2:
        torch.set_num_threads(2)
    seen: list[int] = []
    reference = reconstruct(backend, tiny_voxels[:1], "subj01", SamplingConfig())
    try:
        backend.host_threads = 1
        limited = reconstruct(
            backend,
            tiny_voxels[:1],
            "subj01",
            SamplingConfig(),
            on_scale=lambda i: seen.append(torch.get_num_threads()),
        )
        assert seen == [1] * backend.cfg.schedule.n_scales
        assert torch.get_num_threads() == max(before, 2)
        assert tokens_equal(limited, reference)
        backend.host_threads = None  # None: the loop leaves PyTorch's setting alone
        seen.clear()
        reconstruct(
            backend,
            tiny_voxels[:1],
            "subj01",
            SamplingConfig(),
            on_scale=lambda i: seen.append(torch.get_num_threads()),
        )
        assert set(seen) == {max(before, 2)}
    finally:
        del backend.host_threads
        torch.set_num_threads(before)
