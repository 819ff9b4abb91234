"""Property tests of the scale schedule (the one source of patch_nums arithmetic)."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mindhier_rt.errors import ScheduleError
from mindhier_rt.schedule import PATCH_NUMS_256, PATCH_NUMS_512, Schedule


def sched(pn=PATCH_NUMS_256, m=4, t=257, guidance="coarse_to_fine"):
    return Schedule(patch_nums=pn, n_levels=m, context_tokens=t, guidance=guidance)


def test_token_counts_of_the_reference_resolutions():
    assert sched(PATCH_NUMS_256).total_tokens == 680
    assert sched(PATCH_NUMS_512).total_tokens == 2240
    assert sched(PATCH_NUMS_256).cached_lengths == (0, 1, 5, 14, 30, 55, 91, 155, 255, 424)


def test_segment_map_matches_the_paper_for_k10_m4():
    s = sched()
    # scales 1-3 -> e_4, 4-5 -> e_3, 6-8 -> e_2, 9-10 -> e_1  (h_k = M - floor(M (k-1) / K))
    assert s.level_of_scale == (4, 4, 4, 3, 3, 2, 2, 2, 1, 1)
    assert s.level_of_scale == tuple(4 - (4 * (k - 1)) // 10 for k in range(1, 11))
    assert s.segment_of_scale == (0, 0, 0, 1, 1, 2, 2, 2, 3, 3)
    assert s.context_slice(0) == slice(0, 257) and s.context_slice(9) == slice(771, 1028)


def test_fine_to_coarse_reverses_the_levels():
    c2f, f2c = sched(), sched(guidance="fine_to_coarse")
    assert f2c.level_of_scale == tuple(5 - lv for lv in c2f.level_of_scale)
    assert f2c.level_of_scale[0] == 1 and f2c.level_of_scale[-1] == 4


def test_clip_layer_map_and_phi_index():
    s = sched()
    assert s.clip_layers == (12, 16, 20, 24)
    assert Schedule(PATCH_NUMS_256, 4, 257, clip_layer_base=16, clip_layer_stride=2).clip_layers == (18, 20, 22, 24)
    assert s.phi_index == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
    assert sched(PATCH_NUMS_512).phi_index == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)


@settings(max_examples=60, deadline=None)
@given(
    pn=st.lists(st.integers(2, 12), min_size=1, max_size=7, unique=True).map(lambda x: (1, *sorted(x))),
    data=st.data(),
)
def test_masks_agree_with_the_token_layout(pn, data):
    m = data.draw(st.integers(1, len(pn)))
    t = data.draw(st.integers(1, 5))
    s = sched(pn, m, t)
    assert s.offsets[-1] == sum(p * p for p in pn) == s.total_tokens
    assert all(s.offsets[i + 1] - s.offsets[i] == pn[i] ** 2 for i in range(len(pn)))
    assert sorted(set(s.segment_of_scale)) == list(range(m))  # every level is used
    assert list(s.segment_of_scale) == sorted(s.segment_of_scale)  # coarse-to-fine is monotone
    local, causal = s.self_attn_mask("scale_local"), s.self_attn_mask("block_causal")
    assert torch.equal(local, local.T) and torch.equal(causal & causal.T, local)
    assert causal.sum(1).tolist() == [s.offsets[i + 1] for i in s.scale_of_token]
    cross = s.cross_attn_mask()
    assert cross.shape == (s.total_tokens, m * t) and (cross.sum(1) == t).all()
    for i in range(len(pn)):
        row = cross[s.offsets[i]]
        assert row[s.context_slice(i)].all() and row.sum() == t


@pytest.mark.parametrize(
    "kwargs",
    [
        {"patch_nums": (2, 3)},
        {"patch_nums": (1, 3, 2)},
        {"patch_nums": (1,)},
        {"n_levels": 0},
        {"n_levels": 11},
        {"guidance": "sideways"},
        {"context_tokens": 0},
    ],
)
def test_invalid_schedules_raise(kwargs):
    base = {"patch_nums": PATCH_NUMS_256, "n_levels": 4, "context_tokens": 257}
    with pytest.raises(ScheduleError):
        Schedule(**{**base, **kwargs})
    with pytest.raises(ScheduleError, match="attention mode"):
        sched().self_attn_mask("global")


@pytest.mark.parametrize("kind", ["scale_local", "block_causal", "cross"])
@pytest.mark.parametrize("guidance", ["coarse_to_fine", "fine_to_coarse"])
def test_key_ranges_are_the_masks(kind, guidance):
    sched = Schedule(PATCH_NUMS_256, n_levels=4, context_tokens=5, guidance=guidance)
    mask = sched.cross_attn_mask() if kind == "cross" else sched.self_attn_mask(kind)
    from_ranges = torch.zeros_like(mask)
    for q0, q1, k0, k1 in sched.key_ranges(kind):
        from_ranges[q0:q1, k0:k1] = True
    assert torch.equal(from_ranges, mask)
    assert [r[:2] for r in sched.key_ranges(kind)] == list(itertools.pairwise(sched.offsets))
