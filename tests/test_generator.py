"""The scale-wise generator: teacher-forced and incremental paths agree; masks do what the schedule says."""

import pytest
import torch

from mindhier_rt.config import preset
from mindhier_rt.models.generator import ScaleGenerator
from mindhier_rt.models.vqvae import MultiScaleVQVAE

MODES = ("scale_local", "block_causal")


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the parity metric used throughout the project."""
    return ((a - b).abs().max() / b.abs().max()).item()


def random_inputs(cfg, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = cfg.schedule
    pooled = torch.randn(batch, cfg.context_dim, generator=g)
    context = torch.randn(batch, s.context_length, cfg.context_dim, generator=g)
    idx = [torch.randint(cfg.vocab_size, (batch, n), generator=g) for n in s.token_counts]
    return pooled, context, idx


@pytest.mark.parametrize("name", ["tiny", "small", "demo"])  # demo: switti blocks with abs_pos
@pytest.mark.parametrize("mode", MODES)
def test_incremental_equals_teacher_forced(name, mode):
    torch.manual_seed(0)
    cfg = preset(name).replace(attn_mode=mode)
    gen, vq = ScaleGenerator(cfg).eval(), MultiScaleVQVAE(cfg).eval()
    pooled, context, idx = random_inputs(cfg)
    s = cfg.schedule
    with torch.no_grad():
        teacher = gen(pooled, context, vq.teacher_inputs(idx))
        state = gen.prepare(pooled, context)
        f_hat, x, steps = vq.empty_fhat(2), None, []
        for i in range(s.n_scales):
            steps.append(gen.step(i, state, x))
            f_hat, x = vq.update_fhat(i, f_hat, idx[i])
    incremental = torch.cat(steps, dim=1)
    assert teacher.shape == (2, s.total_tokens, cfg.vocab_size)
    assert teacher.std() > 1e-2  # the check is not vacuous
    assert max_rel_err(incremental, teacher) < 1e-5


def test_absolute_positions_on_switti_blocks(tmp_path):
    """``abs_pos`` gives switti blocks a learned position per pyramid token (RoPE alone leaves a token blind to
    where it is when it reads the context): the logits depend on it, and a checkpoint keeps it."""
    from mindhier_rt.models.mindhier import MindHier

    cfg = preset("tiny")
    assert ScaleGenerator(cfg).pos_1LC is None  # switti blocks default to RoPE only
    cfg = cfg.replace(abs_pos=True)
    assert cfg.generator.rope and cfg.generator.absolute_positions
    torch.manual_seed(0)
    models = MindHier.from_config(cfg, seed=0).eval()
    gen = models.generator
    assert gen.pos_1LC is not None and tuple(gen.pos_1LC.shape) == (1, cfg.schedule.total_tokens, cfg.generator.width)
    pooled, context, idx = random_inputs(cfg)
    x = models.vqvae.teacher_inputs(idx)
    with torch.no_grad():
        before = gen(pooled, context, x)
        gen.pos_1LC.add_(torch.randn_like(gen.pos_1LC))
        moved = gen(pooled, context, x)
    assert max_rel_err(moved, before) > 1e-2
    models.save(tmp_path / "m.safetensors")
    loaded = MindHier.load(tmp_path / "m.safetensors").eval()
    assert loaded.cfg.generator.abs_pos
    with torch.no_grad():
        assert torch.equal(loaded.generator(pooled, context, x), moved)


@pytest.mark.parametrize("mode", MODES)
def test_cross_attention_reads_only_the_scale_segment(mode):
    torch.manual_seed(1)
    cfg = preset("tiny").replace(attn_mode=mode)
    gen = ScaleGenerator(cfg).eval()
    pooled, context, _ = random_inputs(cfg)
    s = cfg.schedule
    x = torch.randn(2, s.total_tokens - 1, cfg.latent_dim)
    base = gen(pooled, context, x)
    for seg in range(s.n_levels):
        poked = context.clone()
        poked[:, seg * s.context_tokens : (seg + 1) * s.context_tokens] += 3.0
        out = gen(pooled, poked, x)
        for i in range(s.n_scales):
            changed = not torch.allclose(out[:, s.scale_slice(i)], base[:, s.scale_slice(i)], atol=1e-6)
            # scale-local: only scales reading this segment change; block-causal: also every later scale
            reads = s.segment_of_scale[i] == seg
            reads_earlier = any(s.segment_of_scale[j] == seg for j in range(i))
            expected = reads or (mode == "block_causal" and reads_earlier)
            assert changed == expected, (mode, seg, i)


@pytest.mark.parametrize("mode", MODES)
def test_self_attention_respects_the_mode(mode):
    torch.manual_seed(2)
    cfg = preset("tiny").replace(attn_mode=mode)
    gen = ScaleGenerator(cfg).eval()
    pooled, context, _ = random_inputs(cfg)
    s = cfg.schedule
    x = torch.randn(2, s.total_tokens - 1, cfg.latent_dim)
    base = gen(pooled, context, x)
    poked = x.clone()
    poked[:, s.offsets[1] - 1 : s.offsets[2] - 1] += 1.0  # the input tokens of scale 1
    out = gen(pooled, context, poked)
    same = [torch.allclose(out[:, s.scale_slice(i)], base[:, s.scale_slice(i)], atol=1e-6) for i in range(4)]
    if mode == "scale_local":
        assert same == [True, False, True, True]
    else:
        assert same == [True, False, False, False]


def test_crop_condition_and_state_selection():
    torch.manual_seed(3)
    cfg = preset("tiny")
    assert cfg.generator.crop_cond
    gen = ScaleGenerator(cfg).eval()
    with torch.no_grad():
        for block in gen.blocks:
            block.crop_cond_scales.fill_(1.0)
    pooled, context, _ = random_inputs(cfg, batch=4)
    x = torch.randn(4, cfg.schedule.total_tokens - 1, cfg.latent_dim)
    full = gen(pooled, context, x)
    cropped = gen(pooled, context, x, crop_B4=torch.tensor([[1.0, 1.0, 0.25, 0.1]]).expand(4, -1))
    assert not torch.allclose(full, cropped)
    state = gen.prepare(pooled, context)
    state.select(slice(0, 2))
    assert torch.allclose(gen.step(0, state), full[:2, :1], atol=1e-5)


def test_reference_size_on_meta():
    with torch.device("meta"):
        gen = ScaleGenerator(preset("mindhier-512"))
    n = sum(p.numel() for p in gen.parameters())
    assert abs(n - 2.32e9) / 2.32e9 < 0.015


@pytest.mark.parametrize("mode", MODES)
def test_explicit_attention_matches_sdpa(mode):
    """The exported form of attention (plain matmul / softmax) equals eager SDPA, masks included."""
    from mindhier_rt.execution import exporting
    from mindhier_rt.models.attention import attention

    sched = preset("tiny").schedule
    g = torch.Generator().manual_seed(1)
    L, S = sched.total_tokens, sched.context_length
    q = torch.randn(2, 2, L, 16, generator=g)
    for k_len, mask in ((L, sched.self_attn_mask(mode)), (S, sched.cross_attn_mask()), (S, None)):
        k, v = torch.randn(2, 2, k_len, 16, generator=g), torch.randn(2, 2, k_len, 16, generator=g)
        eager = attention(q, k, v, mask, 0.3)
        with exporting():
            explicit = attention(q, k, v, mask, 0.3)
        assert max_rel_err(explicit, eager) < 1e-5


def test_rope_tables_rotate_pairs():
    """x * cos + pair_swap(x) * sin with the [L, c] tables is the pairwise rotation by the angles."""
    from mindhier_rt.models.blocks import rope_angles, rope_tables
    from mindhier_rt.models.elementwise import apply_rope

    angles_LP = rope_angles(preset("tiny").schedule, 8, 10000.0, 16.0)
    cos_Lc, sin_Lc = (t.float() for t in rope_tables(angles_LP))
    x = torch.randn(3, angles_LP.shape[0], 8)
    out = apply_rope(x, cos_Lc, sin_Lc)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = angles_LP.cos().float(), angles_LP.sin().float()
    assert torch.equal(out[..., 0::2], x0 * c - x1 * s)
    assert torch.equal(out[..., 1::2], x1 * c + x0 * s)
