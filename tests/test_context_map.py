"""The context map (which context segment each query token reads): ``training`` and ``reference-pipeline``.

The reference pipeline's map is rebuilt here independently, from REFERENCE §9's description of MindHier's
inference code: the training cross-attention mask is built once for the whole 512 px pyramid (pyramid row r
reads level floor(4 * scale(r) / 10) of the context in its given order), scale i uses its first pn_i ** 2
rows, and the context levels are concatenated in reverse order.
"""

import copy
import os

import pytest
import torch

from mindhier_rt.config import preset
from mindhier_rt.errors import ScheduleError
from mindhier_rt.models.generator import ScaleGenerator
from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.models.vqvae import MultiScaleVQVAE
from mindhier_rt.pipeline import reconstruct
from mindhier_rt.runtime.torch_backend import TorchBackend
from mindhier_rt.runtime.torch_fast import FastTorchBackend
from mindhier_rt.sampling import SamplingConfig
from mindhier_rt.schedule import Schedule

REF = "reference-pipeline"


def reference_pipeline_mask_512() -> torch.Tensor:
    """Bool [2240, 4 * 257]: the key set of every query of the reference inference at 512 px, from §9 alone."""
    patch_nums, levels, tokens = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32), 4, 257
    row_scale = [k for k, pn in enumerate(patch_nums) for _ in range(pn * pn)]
    # training mask over the whole pyramid, context in its given order [c_0, c_1, c_2, c_3]
    train = torch.zeros(len(row_scale), levels * tokens, dtype=torch.bool)
    for r, k in enumerate(row_scale):
        lvl = levels * k // len(patch_nums)
        train[r, lvl * tokens : (lvl + 1) * tokens] = True
    rows = []
    for pn in patch_nums:
        sliced = train[: pn * pn]  # the first pn^2 rows of the 512 px mask
        # the key axis names the reversed concatenation [c_3, c_2, c_1, c_0]: key level a is given-order level
        # 3 - a, so in the given order the allowed keys are the sliced mask's level blocks reversed
        rows.append(sliced.view(-1, levels, tokens).flip(1).reshape(-1, levels * tokens))
    return torch.cat(rows)


def test_reference_pipeline_map_of_the_512_schedule():
    cfg = preset("mindhier-512")
    train, ref = cfg.schedule, cfg.replace(context_map=REF).schedule
    want = reference_pipeline_mask_512()
    assert torch.equal(ref.cross_attn_mask(), want)
    assert torch.equal(train.cross_attn_mask(), cfg.schedule.cross_attn_mask())
    moved = sum(a != b for a, b in zip(ref.segment_of_token, train.segment_of_token, strict=True))
    assert (moved, ref.total_tokens) == (2056, 2240)  # 91.8%, REFERENCE §9
    assert [len(s) for s in ref.segments_of_scale] == [1, 1, 1, 2, 2, 3, 3, 3, 3, 4]
    assert all(len(s) == 1 for s in train.segments_of_scale) and train.single_segment and not ref.single_segment
    # every decode step's rows are rows of the pyramid mask
    for i in range(ref.n_scales):
        assert torch.equal(ref.step_cross_mask(i), want[ref.scale_slice(i)])


@pytest.mark.parametrize("name", ["tiny", "small", "mindhier-256", "mindhier-512"])
@pytest.mark.parametrize("context_map", ["training", REF])
@pytest.mark.parametrize("guidance", ["coarse_to_fine", "fine_to_coarse"])
def test_cross_ranges_cover_exactly_the_mask(name, context_map, guidance):
    s = preset(name).replace(context_map=context_map, guidance=guidance).schedule
    mask = s.cross_attn_mask()
    from_ranges = torch.zeros_like(mask)
    covered = 0
    for q0, q1, k0, k1 in s.key_ranges("cross"):
        assert not from_ranges[q0:q1].any()  # query ranges disjoint
        from_ranges[q0:q1, k0:k1] = True
        covered += q1 - q0
    assert covered == s.total_tokens and torch.equal(from_ranges, mask)
    for i in range(s.n_scales):
        step = torch.zeros(s.token_counts[i], s.context_length, dtype=torch.bool)
        for j0, j1, k0, k1 in s.step_cross_ranges(i):
            step[j0:j1, k0:k1] = True
        assert torch.equal(step, s.step_cross_mask(i))


def test_context_slice_refuses_a_scale_reading_several_segments():
    s = Schedule((1, 2, 3, 4), n_levels=2, context_tokens=5, context_map=REF)
    assert s.segments_of_scale == ((1,), (1,), (0, 1), (0, 1))
    assert s.context_slice(0) == slice(5, 10)
    with pytest.raises(ScheduleError, match=r"reads context segments \(0, 1\)"):
        s.context_slice(2)
    with pytest.raises(ScheduleError, match="context_map"):
        Schedule((1, 2), n_levels=1, context_tokens=1, context_map="inference")


def random_inputs(cfg, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = cfg.schedule
    pooled = torch.randn(batch, cfg.context_dim, generator=g)
    context = torch.randn(batch, s.context_length, cfg.context_dim, generator=g)
    idx = [torch.randint(cfg.vocab_size, (batch, n), generator=g) for n in s.token_counts]
    return pooled, context, idx


@pytest.mark.parametrize("mode", ["scale_local", "block_causal"])
def test_incremental_equals_teacher_forced_under_the_reference_map(mode):
    torch.manual_seed(0)
    cfg = preset("small").replace(attn_mode=mode, context_map=REF)
    gen, vq = ScaleGenerator(cfg).eval(), MultiScaleVQVAE(cfg).eval()
    pooled, context, idx = random_inputs(cfg)
    with torch.no_grad():
        teacher = gen(pooled, context, vq.teacher_inputs(idx))
        trained_map = ScaleGenerator(cfg.replace(context_map="training")).eval()
        trained_map.load_state_dict(gen.state_dict())  # the map is no weight: the same state dict loads
        other = trained_map(pooled, context, vq.teacher_inputs(idx))
        state = gen.prepare(pooled, context)
        f_hat, x, steps = vq.empty_fhat(2), None, []
        for i in range(cfg.schedule.n_scales):
            steps.append(gen.step(i, state, x))
            f_hat, x = vq.update_fhat(i, f_hat, idx[i])
    incremental = torch.cat(steps, dim=1)
    err = ((incremental - teacher).abs().max() / teacher.abs().max()).item()
    assert err < 1e-5
    # the map matters: the scales whose tokens read other segments get other logits
    train_map = cfg.replace(context_map="training").schedule.segment_of_token
    moved = torch.tensor(cfg.schedule.segment_of_token) != torch.tensor(train_map)
    diff = (other - teacher).abs().amax(dim=(0, 2))
    assert moved.any() and diff[moved].min() > 1e-3


def multi_level_models(mode: str = "scale_local") -> MindHier:
    """Tiny models whose reference-pipeline map puts two levels in scales 2 and 3 (checked)."""
    cfg = preset("tiny").replace(attn_mode=mode, context_map=REF)
    assert [len(s) for s in cfg.schedule.segments_of_scale] == [1, 1, 2, 2]
    models = MindHier.from_config(cfg, seed=0).eval()
    with torch.no_grad():  # peaked next-token distributions, as a trained model has
        models.generator.head.weight.mul_(8.0)
    return models


def _kernel_attention() -> str | None:
    """``triton`` where the block-sparse kernel can run here (a GPU, or the interpreter on the CPU), else None."""
    from mindhier_rt.kernels.scale_attention import HAS_TRITON

    runnable = HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
    return "triton" if runnable else None


def assert_same_tokens(a, b) -> None:
    for i, (x, y) in enumerate(zip(a.tokens, b.tokens, strict=True)):
        assert torch.equal(x, y), f"scale {i}: {int((x != y).sum())} of {x.numel()} tokens differ"


@pytest.mark.parametrize("mode", ["scale_local", "block_causal"])
def test_torch_fast_decodes_like_eager_under_the_reference_map(mode, tiny_voxels):
    models = multi_level_models(mode)
    sampling = SamplingConfig(seed=7)
    eager = reconstruct(TorchBackend(copy.deepcopy(models)), tiny_voxels[:2], "subj01", sampling)
    fast = reconstruct(FastTorchBackend(copy.deepcopy(models), device="cpu"), tiny_voxels[:2], "subj01", sampling)
    assert_same_tokens(fast, eager)
    if _kernel_attention() == "triton":
        backend = FastTorchBackend(copy.deepcopy(models), device="cpu", attention="triton")
        assert_same_tokens(reconstruct(backend, tiny_voxels[:2], "subj01", sampling), eager)
    # and the map is in effect: the training map's decode of the same weights differs
    other = copy.deepcopy(models).with_context_map("training")
    assert other.cfg.context_map == "training"
    assert torch.equal(other.generator.head.weight, models.generator.head.weight)
    got = reconstruct(TorchBackend(other), tiny_voxels[:2], "subj01", sampling)
    assert any(not torch.equal(x, y) for x, y in zip(got.tokens, eager.tokens, strict=True))


def test_every_backend_decodes_a_multi_level_scale_the_same(tiny_export, tiny_voxels):
    """Eager, torch-fast (kernel ranges under the interpreter) and the onnxruntime bundle give the same tokens
    where scales 2 and 3 read two context levels each; the bundle records the map and its table."""
    from mindhier_rt.runtime.onnxruntime_backend import OnnxRuntimeBackend

    models, bundle = tiny_export("block_causal", REF)
    assert [len(s) for s in models.cfg.schedule.segments_of_scale] == [1, 1, 2, 2]
    spec = bundle.spec
    assert spec.context_map == REF and spec.tables["cross_segment"] == "cross_segment.npy"
    assert list(bundle.load_table("cross_segment")) == list(models.cfg.schedule.segment_of_token)
    step = spec.graphs["generator_step"]
    assert step.input("cross.segment").dtype == "int64"
    assert step.input("cross.0.key").shape[2] == models.cfg.schedule.context_length
    for sampling in (SamplingConfig(seed=11), SamplingConfig(seed=12, cfg_stop=2)):
        eager = reconstruct(TorchBackend(copy.deepcopy(models)), tiny_voxels[:2], "subj01", sampling)
        fast = FastTorchBackend(copy.deepcopy(models), device="cpu", attention=_kernel_attention())
        ort = reconstruct(OnnxRuntimeBackend(bundle), tiny_voxels[:2], "subj01", sampling)
        assert_same_tokens(ort, eager)
        assert_same_tokens(reconstruct(fast, tiny_voxels[:2], "subj01", sampling), eager)
        assert (ort.images_NS3HW - eager.images_NS3HW).abs().max() < 1e-4


def test_training_map_bundles_keep_their_step_graph(tiny_export):
    """The default map's step reads one segment [B, H, T, c] and has no cross.segment input or table."""
    _, bundle = tiny_export("block_causal")
    step = bundle.spec.graphs["generator_step"]
    assert bundle.spec.context_map == "training" and "cross_segment" not in bundle.spec.tables
    assert step.input("cross.segment") is None
    assert step.input("cross.0.key").shape[2] == bundle.cfg.context_tokens


def test_decoding_features_from_elsewhere_equals_the_voxel_decode(tiny_voxels):
    """``decode_features`` (an imported generator fed by the reference encoder's features) = ``reconstruct``."""
    from mindhier_rt.errors import InputError
    from mindhier_rt.pipeline import decode_features

    models = multi_level_models()
    backend = TorchBackend(models)
    sampling = SamplingConfig(seed=3)
    want = reconstruct(backend, tiny_voxels[:2], "subj01", sampling, samples=2)
    with torch.no_grad():
        pooled, context = backend.encode(tiny_voxels[:2], "subj01")
        null = backend.encode(torch.zeros_like(tiny_voxels[:1]), "subj01")
    got = decode_features(backend, pooled, context, sampling, null=null, samples=2)
    assert_same_tokens(got, want)
    assert torch.equal(got.images_NS3HW, want.images_NS3HW)
    with pytest.raises(InputError, match="needs the null condition"):
        decode_features(backend, pooled, context, sampling)
    with pytest.raises(InputError, match=r"expected context \[N, 10, 32\]"):
        decode_features(backend, pooled, context[:, :5], sampling, null=null)
