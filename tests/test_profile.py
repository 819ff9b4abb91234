"""The cost model, the phase profiler, its table and the `profile` command."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from mindhier_rt.config import PRESETS, preset
from mindhier_rt.costs import (
    attention_flops,
    context_cost,
    decode_costs,
    decoder_cost,
    encoder_cost,
    linear_flops,
    step_cost,
    update_cost,
)
from mindhier_rt.errors import InputError
from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.profile import (
    TimedBackend,
    _Timer,
    format_table,
    profile_backend,
    profile_backends,
)
from mindhier_rt.runtime.torch_backend import TorchBackend
from mindhier_rt.sampling import SamplingConfig, choose_tokens

# ---- cost model -----------------------------------------------------------------------------------


def test_linear_and_attention_flops():
    assert linear_flops(7, 3, 5) == 2 * 7 * 3 * 5
    assert attention_flops(2, 4, 9, 16) == 4 * 2 * 4 * 9 * 16


@pytest.mark.parametrize("i", [0, 2, 6])
def test_step_linears_count_2_b_l_in_out(i):
    cfg = preset("small")
    g, B = cfg.generator, 4
    l, C, d = cfg.schedule.token_counts[i], g.width, g.depth
    parts = step_cost(cfg, B, i).flops_by_part
    assert parts["qkv"] == d * 2 * B * l * C * 3 * C
    assert parts["proj"] == parts["cross_q"] == parts["cross_proj"] == d * 2 * B * l * C * C
    assert parts["ffn_gate"] == parts["ffn_up"] == parts["ffn_down"] == d * 2 * B * l * C * g.ffn_dim
    assert parts["head"] == 2 * B * l * C * cfg.vocab_size
    # the word embedding of scale i's tokens is the previous update's (where every backend computes it)
    assert "word_embed" not in parts
    embed = update_cost(cfg, B, i - 1).flops_by_part["word_embed"] if i > 0 else 0
    assert embed == (0 if i == 0 else 2 * B * l * cfg.latent_dim * C)
    assert "word_embed" not in update_cost(cfg, B, cfg.schedule.n_scales - 1).flops_by_part  # no next scale
    assert parts["cross_attn"] == d * 4 * B * l * cfg.context_tokens * C
    assert sum(parts.values()) == step_cost(cfg, B, i).flops


def test_attention_scales_with_the_attended_length():
    local = preset("small")
    causal = local.replace(attn_mode="block_causal")
    sched, d, C = local.schedule, local.generator.depth, local.generator.width
    for i, l in enumerate(sched.token_counts):
        a = step_cost(local, 2, i).flops_by_part["self_attn"]
        b = step_cost(causal, 2, i).flops_by_part["self_attn"]
        assert a == d * 4 * 2 * l * l * C  # own scale only
        assert b == d * 4 * 2 * l * (sched.offsets[i] + l) * C  # cached + own
        if i > 0:
            assert step_cost(causal, 2, i).flops > step_cost(local, 2, i).flops
            assert step_cost(causal, 2, i).cache_bytes > step_cost(local, 2, i).cache_bytes


def test_costs_are_linear_in_rows_and_follow_the_dtype():
    cfg = preset("tiny")
    for fn in (lambda r: decoder_cost(cfg, r), lambda r: update_cost(cfg, r, 1), lambda r: step_cost(cfg, r, 2)):
        assert fn(6).flops == 3 * fn(2).flops
    c32, c16 = step_cost(cfg, 2, 3, "float32"), step_cost(cfg, 2, 3, "float16")
    assert c32.flops == c16.flops and c32.bytes == 2 * c16.bytes


def test_decoder_cost_counts_every_conv():
    cfg = preset("tiny")
    n, E = cfg.schedule.last_side, cfg.latent_dim
    cost = decoder_cost(cfg, 1)
    post_quant = 2 * n * n * E * E * 9
    conv_out = 2 * cfg.image_size**2 * 3 * cfg.vqvae.ch * 9
    assert cost.flops_by_part["conv"] > post_quant + conv_out
    assert cost.flops_by_part["attn"] > 0


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("mode", ["scale_local", "block_causal"])
def test_totals_positive_and_finite_for_every_preset(name, mode):
    cfg = preset(name).replace(attn_mode=mode)
    costs = decode_costs(cfg, scans=2, samples=2)
    phases = [costs.encode, costs.context, *costs.steps, *costs.updates, costs.decode, costs.total]
    for c in phases:
        assert c.flops > 0 and c.bytes > 0, c.name
        assert math.isfinite(c.intensity) and c.intensity > 0, c.name
    assert costs.context.rows == 8 and costs.steps[0].rows == 8 and costs.updates[0].rows == 4
    assert costs.encode.flops == encoder_cost(cfg, 2).flops + encoder_cost(cfg, 1).flops
    assert context_cost(cfg, 8).flops == costs.context.flops
    json.dumps(costs.to_dict())


def test_guidance_switched_off_halves_the_step_rows():
    cfg = preset("tiny")
    costs = decode_costs(cfg, 1, sampling=SamplingConfig(cfg_stop=2))
    assert [c.rows for c in costs.steps] == [2, 2, 1, 1]
    assert decode_costs(cfg, 1, sampling=SamplingConfig(cfg_scale=0.0)).context.rows == 1


# ---- profiler -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models():
    return MindHier.from_config(preset("tiny"), seed=0).eval()


@pytest.fixture(scope="module")
def torch_result(tiny_models):
    return profile_backend(TorchBackend(tiny_models), "subj01", 2, 1, SamplingConfig(seed=1), repeats=2, warmup=1)


def test_profile_times_every_scale(torch_result):
    r, K = torch_result, preset("tiny").schedule.n_scales
    names = [p["name"] for p in r["phases"]]
    assert names[:2] == ["encode", "context"] and names[-1] == "end to end"
    for i in range(K):
        assert f"step {i}" in names and f"update {i}" in names
        scale = r["scales"][i]
        assert scale["step"]["median_ms"] > 0 and scale["update"]["median_ms"] > 0
        assert scale["sample"]["median_ms"] > 0
    assert [s["step_rows"] for s in r["scales"]] == [4] * K  # 2 scans, guided
    by_name = {p["name"]: p for p in r["phases"]}
    e2e = r["end_to_end"]
    assert e2e["min_ms"] <= e2e["median_ms"] <= e2e["max_ms"]
    assert e2e["median_ms"] >= sum(by_name[f"step {i}"]["median_ms"] for i in range(K))
    for name in ("encode", "context", "decode", "end to end", *(f"step {i}" for i in range(K))):
        p = by_name[name]
        assert p["flops"] > 0 and p["bytes"] > 0 and p["intensity"] > 0 and p["gflops_per_s"] > 0, name
    assert r["memory"]["peak_bytes"] is None or r["memory"]["peak_bytes"] > 0
    json.dumps(r)


def test_proxy_forwards_and_times_the_token_choice(tiny_models):
    backend = TorchBackend(tiny_models)
    timer = _Timer(backend.device)
    proxy = TimedBackend(backend, timer)
    assert proxy.name == "torch" and proxy.cfg is backend.cfg and proxy.empty_fhat(1).shape[0] == 1
    logits = torch.randn(4, 3, backend.cfg.vocab_size)
    ids = torch.arange(2)
    got = proxy.choose_tokens(logits, SamplingConfig(seed=2), 1, 0.5, ids, ids)
    assert torch.equal(got, choose_tokens(logits, SamplingConfig(seed=2), 1, 0.5, ids, ids))
    assert got.shape == (2, 3) and timer.seconds["sample 1"] > 0


def test_backends_take_turns_and_get_a_paired_ratio(tiny_models):
    """Rounds run every backend once, the first backend rotating, so drift hits all of them alike."""
    calls: list[str] = []

    class Recording(TorchBackend):
        def decode_image(self, f_hat_BEhw):  # once per run
            calls.append(self.name)
            return super().decode_image(f_hat_BEhw)

    a, b = Recording(tiny_models), Recording(tiny_models)
    a.name, b.name = "a", "b"
    results = profile_backends([a, b], "subj01", 1, 1, SamplingConfig(seed=1), repeats=3, warmup=1)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert [r["backend"] for r in results] == ["a", "b"]
    assert "paired_ratio" not in results[0]
    paired = results[1]["paired_ratio"]
    assert paired["to"] == "a" and paired["min"] <= paired["median"] <= paired["max"]
    assert all(len(r["scales"]) == preset("tiny").schedule.n_scales for r in results)


# ---- onnxruntime: one export for the whole file ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bundle(tiny_export):
    return tiny_export("scale_local")[1].root


def test_format_table_names_every_backend(torch_result, tiny_bundle):
    from mindhier_rt.runtime.onnxruntime_backend import OnnxRuntimeBackend

    ort = profile_backend(OnnxRuntimeBackend(tiny_bundle), "subj01", 2, 1, SamplingConfig(seed=1), repeats=2)
    assert [s["step"]["median_ms"] > 0 for s in ort["scales"]] == [True] * len(ort["scales"])
    table = format_table([torch_result, ort])
    assert "torch ms" in table and "onnxruntime ms" in table and "onnxruntime/torch" in table
    for name in ("encode", "context", "step 3", "update 0", "decode", "end to end"):
        assert name in table


def test_cli_profiles_a_bundle(cli, tiny_bundle, tmp_path):
    out = tmp_path / "ort.json"
    code, stdout, err = cli("profile", "--engine", tiny_bundle, "--repeats", "1", "--warmup", "0", "--json", out)
    assert code == 0, err
    assert "onnxruntime ms" in stdout
    report = json.loads(out.read_text())
    assert [r["backend"] for r in report["results"]] == ["onnxruntime"]
    assert report["ratio_onnxruntime_over_torch"] is None


# ---- CLI ------------------------------------------------------------------------------------------


def test_cli_profile_preset_writes_json(cli, tmp_path):
    out = tmp_path / "sub" / "profile.json"
    code, stdout, err = cli("profile", "--preset", "tiny", "--backend", "torch", "--repeats", "2", "--json", out)
    assert code == 0, err
    assert "torch ms" in stdout and "end to end" in stdout
    report = json.loads(out.read_text())
    assert set(report) >= {"machine", "settings", "results", "ratio_onnxruntime_over_torch"}
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["torch"] == torch.__version__
    assert report["settings"]["subject"] == "subj01" and report["settings"]["repeats"] == 2
    (result,) = report["results"]
    assert result["backend"] == "torch" and len(result["scales"]) == preset("tiny").schedule.n_scales


@pytest.mark.parametrize(
    "args",
    [
        ("--engine", "nowhere", "--backend", "torch"),
        ("--backend", "torch"),
        ("--preset", "tiny", "--ckpt", "x.safetensors"),
        ("--preset", "tiny", "--backend", "tensorrt"),
        ("--preset", "tiny", "--backend", "torch", "--export-dir", "d"),
        ("--engine", "nowhere", "--export-dir", "d"),
    ],
)
def test_cli_profile_bad_combinations(cli, args):
    code, _, err = cli("profile", *args)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err


def test_cli_profile_opens_a_checkpoint_as_decode_does(cli, tiny_ckpt, tmp_path):
    """--ckpt goes through open_backend: torch and torch-fast on the checkpoint, in turns, one report."""
    out = tmp_path / "ckpt.json"
    code, stdout, err = cli("profile", "--ckpt", tiny_ckpt, "--backend", "torch,torch-fast", "--repeats", "1",
                            "--warmup", "0", "--json", out)  # fmt: skip
    assert code == 0, err
    assert "torch-fast ms" in stdout and "torch-fast/torch" in stdout
    report = json.loads(out.read_text())
    assert [r["backend"] for r in report["results"]] == ["torch", "torch-fast"]
    assert report["settings"]["source"] == {"preset": None, "ckpt": str(tiny_ckpt), "engine": None}
    assert report["results"][1]["paired_ratio"]["to"] == "torch"


def test_cli_profile_tensorrt_without_tensorrt_says_so_in_one_line(cli, tiny_bundle):
    if importlib.util.find_spec("tensorrt") or importlib.util.find_spec("tensorrt_lean"):
        pytest.skip("TensorRT is installed here")
    code, _, err = cli("profile", "--engine", tiny_bundle, "--backend", "tensorrt", "--repeats", "1")
    assert code == 2  # a missing optional dependency, as decode --backend tensorrt
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the tensorrt backend needs TensorRT"), err


def test_profile_plan_runs_what_the_sources_allow():
    from mindhier_rt.profile_plan import ProfileSources, plan_backends

    both = ProfileSources(ckpt=Path("m.safetensors"), engine=Path("b"))
    assert plan_backends(both, None, None) == ["torch", "onnxruntime"]
    assert plan_backends(ProfileSources(engine=Path("b")), "tensorrt,onnxruntime", None) == ["tensorrt", "onnxruntime"]
    assert plan_backends(ProfileSources(preset="tiny"), "torch-fast,onnxruntime", Path("d")) == [
        "torch-fast",
        "onnxruntime",
    ]
    with pytest.raises(InputError, match="tensorrt runs built plans"):
        plan_backends(ProfileSources(ckpt=Path("m.safetensors")), "tensorrt", None)
