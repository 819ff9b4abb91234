"""Public checkpoints (VAR, Switti, MindHier generators; VAR-style VQ-VAEs) import strictly and run.

The files are tiny random models written in each layout's own tensor naming and container (``.pth`` via
torch.save; ``config.json`` + ``model.safetensors``) by ``public_layouts`` from REFERENCE §6. The VAR
reference forward below is written here from the published formulas, independently of mindhier-rt's modules.
"""

import math

import numpy as np
import pytest
import torch
from public_layouts import save_hf_folder, switti_state_dict, var_state_dict, vqvae_state_dict

from mindhier_rt.config import var_config
from mindhier_rt.errors import CheckpointError, InputError
from mindhier_rt.importers import import_models
from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.pipeline import generate
from mindhier_rt.runtime.torch_backend import TorchBackend
from mindhier_rt.sampling import SamplingConfig

PN = (1, 2, 3)
VAR_SIZES = {"depth": 2, "width": 64, "heads": 2, "patch_nums": PN, "vocab": 64, "latent": 8, "classes": 10}
VAE_SIZES = {"ch": 32, "ch_mult": (1, 2), "num_res_blocks": 1, "latent": 8, "vocab": 64, "scales": len(PN)}


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def var_files(tmp_path_factory):
    """A tiny ``var_d2.pth`` and its ``vae.pth``, as torch.save state dicts."""
    folder = tmp_path_factory.mktemp("var")
    gen_sd, vae_sd = var_state_dict(**VAR_SIZES, std=0.05), vqvae_state_dict(**VAE_SIZES)
    gen_sd["head.weight"] *= 20.0  # peaked next-token distributions, as a trained model has
    torch.save(gen_sd, folder / "var_d2.pth")
    torch.save(vae_sd, folder / "vae.pth")
    return folder / "var_d2.pth", folder / "vae.pth", gen_sd, vae_sd


def var_reference_logits(sd: dict, labels: torch.Tensor, x_BLE: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """VAR's teacher-forced forward from its description (REFERENCE §3), on the raw state dict.

    start = class_emb[label] + pos_start; inputs += lvl_embed[scale] + pos_1LC; block-causal attention.
    Block: x += Attn(LN(x)(1+s1)+b1) g1; x += MLP(LN(x)(1+s2)+b2) g2 with (g1, g2, s1, s2, b1, b2) =
    Linear(SiLU(cond)). Attention: qkv = x W^T + [q_bias, 0, v_bias]; q, k L2-normalised per head,
    q *= exp(min(scale_mul, log 100)); softmax(q k^T) v; proj. MLP: fc2(gelu_tanh(fc1)). Head: LN(x)(1+s)+b.
    """

    def ln(x):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + eps)

    def lin(x, name, bias=True):
        out = x @ sd[f"{name}.weight"].T
        return out + sd[f"{name}.bias"] if bias else out

    lvl = sd["lvl_1L"][0]
    B, L, C = labels.shape[0], lvl.shape[0], sd["pos_start"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    H = sd["blocks.0.attn.scale_mul_1H11"].shape[1]
    c = C // H
    cond = sd["class_emb.weight"][labels]
    silu_cond = cond * torch.sigmoid(cond)
    x = torch.cat([cond[:, None] + sd["pos_start"], lin(x_BLE, "word_embed")], dim=1)
    x = x + sd["lvl_embed.weight"][lvl] + sd["pos_1LC"]
    allowed = lvl[:, None] >= lvl[None, :]
    for i in range(depth):
        b = f"blocks.{i}."
        g1, g2, s1, s2, b1, b2 = lin(silu_cond, b + "ada_lin.1").view(B, 1, 6, C).unbind(2)
        h = ln(x) * (1 + s1) + b1
        qkv = h @ sd[b + "attn.mat_qkv.weight"].T + torch.cat(
            [sd[b + "attn.q_bias"], torch.zeros(C), sd[b + "attn.v_bias"]]
        )
        q, k, v = qkv.view(B, L, 3, H, c).permute(2, 0, 3, 1, 4)
        q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        q = q * sd[b + "attn.scale_mul_1H11"].clamp_max(math.log(100)).exp()
        scores = (q @ k.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
        o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, C)
        x = x + lin(o, b + "attn.proj") * g1
        h = ln(x) * (1 + s2) + b2
        u = lin(h, b + "ffn.fc1")
        gelu = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
        x = x + lin(gelu, b + "ffn.fc2") * g2
    scale, shift = lin(silu_cond, "head_nm.ada_lin.1").view(B, 1, 2, C).unbind(2)
    return lin(ln(x) * (1 + scale) + shift, "head")


def test_var_pth_imports_strictly_and_round_trips(var_files, tmp_path):
    gen_path, vae_path, gen_sd, vae_sd = var_files
    imported = import_models(gen_path, vae_path)
    models, cfg = imported.models, imported.models.cfg
    g = cfg.generator
    assert (g.block, g.condition, g.attn_mode, g.num_classes) == ("var", "class", "block_causal", 10)
    assert (g.depth, g.width, g.heads, g.ffn_dim) == (2, 64, 2, 256)
    assert cfg.patch_nums == PN and cfg.encoder is None and models.encoder is None
    assert (cfg.vqvae.ch, cfg.vqvae.ch_mult, cfg.image_size) == (32, (1, 2), 6)
    assert imported.sources == {"generator": (str(gen_path), "var"), "vqvae": (str(vae_path), "vqvae")}
    ours = models.generator.state_dict()
    dropped = {"lvl_1L", "attn_bias_for_masking", *(f"blocks.{i}.attn.zero_k_bias" for i in range(2))}
    assert set(gen_sd) - set(ours) == dropped
    for k in ours:
        assert torch.equal(ours[k], gen_sd[k]), k
    vq = models.vqvae.state_dict()
    assert set(vae_sd) - set(vq) == {"quantize.ema_vocab_hit_SV"}
    assert all(torch.equal(vq[k], vae_sd[k]) for k in vq)
    # saved in mindhier-rt's own format (no encoder part), it loads back unchanged
    models.save(tmp_path / "var.safetensors")
    again = MindHier.load(tmp_path / "var.safetensors")
    assert again.cfg == cfg and again.encoder is None
    assert all(torch.equal(a, b) for a, b in zip(again.generator.state_dict().values(), ours.values(), strict=True))


def var_parity(gen_path, vae_path, gen_sd, zeroed: str | None = None) -> tuple[float, float, float]:
    """(teacher-forced error, per-scale error, reference logits std) of the imported VAR model against the
    formula forward; ``zeroed`` names a weight of the imported model set to zero first (a wrong block)."""
    models = import_models(gen_path, vae_path).models
    if zeroed is not None:
        with torch.no_grad():
            dict(models.generator.named_parameters())[zeroed].zero_()
    sched = models.cfg.schedule
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([3, 10])  # a class and the null class
    idx = [torch.randint(64, (2, n), generator=g) for n in sched.token_counts]
    with torch.no_grad():
        x_BLE = models.vqvae.teacher_inputs(idx)
        ref = var_reference_logits(gen_sd, labels, x_BLE)
        ours = models.generator(labels, None, x_BLE)
        state = models.generator.prepare(labels, None)
        f_hat, x, steps = models.vqvae.empty_fhat(2), None, []
        for i in range(sched.n_scales):
            steps.append(models.generator.step(i, state, x))
            f_hat, x = models.vqvae.update_fhat(i, f_hat, idx[i])
    return max_rel_err(ours, ref), max_rel_err(torch.cat(steps, dim=1), ref), ref.std().item()


ZEROED = ["blocks.0.attn.proj.weight", "blocks.1.attn.mat_qkv.weight", "blocks.1.ffn.fc2.weight"]


@pytest.mark.parametrize("zeroed", [None, *ZEROED], ids=["intact", *ZEROED])
def test_var_matches_the_reference_forward(var_files, zeroed):
    """Teacher-forced and per-scale logits of the imported model = the formula forward above, to 1e-5; and the
    test can fail: with one projection of one block zeroed, both are far off (the test weights' AdaLN gates are
    open, ``public_layouts``)."""
    gen_path, vae_path, gen_sd, _ = var_files
    teacher, steps, std = var_parity(gen_path, vae_path, gen_sd, zeroed)
    assert std > 1e-2
    if zeroed is None:
        assert teacher < 1e-5 and steps < 1e-5
    else:
        assert teacher > 1e-1 and steps > 1e-1, f"zeroing {zeroed} went unnoticed: {teacher:.1e}, {steps:.1e}"


def test_reference_gates_would_hide_a_wrong_block(tmp_path):
    """Why the test weights open the gates: with the reference's initialisation (gates scaled by 1e-5) a block
    whose output projection is zeroed stays within 1e-4 of the formula forward, where open gates put it > 0.1."""
    errors = {}
    for gates in ("reference", "open"):
        gen_sd, vae_sd = var_state_dict(**VAR_SIZES, std=0.05, gates=gates), vqvae_state_dict(**VAE_SIZES)
        gen_sd["head.weight"] *= 20.0
        torch.save(gen_sd, tmp_path / f"{gates}.pth")
        torch.save(vae_sd, tmp_path / "vae.pth")
        errors[gates] = var_parity(tmp_path / f"{gates}.pth", tmp_path / "vae.pth", gen_sd, ZEROED[0])[0]
    assert errors["reference"] < 1e-4 < 1e-1 < errors["open"], errors


@pytest.mark.parametrize("layout", ["switti", "mindhier"])
def test_switti_and_mindhier_folders_import(layout, tmp_path):
    pooler, context_dim, pooled_dim = ("text_pooler", 48, 40) if layout == "switti" else ("fmri_pooler", 32, 32)
    use_ar, pn = layout == "switti", (1, 2, 3, 4)  # 4 scales: MindHier's context has 4 levels
    sd = switti_state_dict(pooler, 2, 64, pn, 64, 8, context_dim, pooled_dim, use_ar=use_ar)
    conf = {"depth": 2, "rope": True, "rope_theta": 10000, "rope_size": 128, "use_swiglu_ffn": True,
            "use_ar": use_ar, "use_crop_cond": True, "num_heads": 4}  # fmt: skip
    gen = save_hf_folder(tmp_path / layout, sd, conf)
    # VQVAEHF.save_pretrained as Switti and MindHier write it: the constructor's keys with reso, no v_patch_nums
    vae_conf = {"vocab_size": 64, "z_channels": 8, "ch": 32, "test_mode": True, "share_quant_resi": 4, "reso": 512}
    vae = save_hf_folder(tmp_path / "vae", vqvae_state_dict(**{**VAE_SIZES, "scales": 10}), vae_conf)
    models = import_models(gen, vae).models
    cfg, g = models.cfg, models.cfg.generator
    # MindHier's published images come from its reference pipeline's per-token context map; Switti reads 1 level
    assert cfg.context_map == ("reference-pipeline" if layout == "mindhier" else "training")
    assert import_models(gen, vae, context_map="training").models.cfg.context_map == "training"
    assert (g.block, g.heads, g.crop_cond, g.crop_freqs, g.rope_layout, g.crop_unit) == ("switti", 4, True, 8,
                                                                                         "switti", 512.0)  # fmt: skip
    assert g.attn_mode == ("block_causal" if use_ar else "scale_local")
    assert cfg.context_dim == context_dim and g.pooled_dim == (pooled_dim if layout == "switti" else None)
    assert (cfg.n_levels, cfg.context_tokens) == ((1, 77) if layout == "switti" else (4, 257))
    ours = models.generator.state_dict()
    assert torch.equal(ours["fmri_pooler.weight"], sd[f"{pooler}.weight"])
    assert torch.equal(ours["blocks.1.crop_cond_scales"], sd["blocks.1.crop_cond_scales"][0])
    renamed = {f"{pooler}.weight", f"{pooler}.bias"}
    for k, v in sd.items():
        if k not in renamed | {"lvl_1L", "attn_bias_for_masking"}:
            assert torch.equal(ours[k].reshape(v.shape), v), k
    # it runs, and every block matters: zeroing one projection moves the logits far beyond parity tolerances
    pooled, context = torch.randn(2, pooled_dim), torch.randn(2, cfg.schedule.context_length, context_dim)
    idx = [torch.randint(64, (2, n), generator=torch.Generator().manual_seed(n)) for n in cfg.schedule.token_counts]
    with torch.no_grad():
        x_BLE = models.vqvae.teacher_inputs(idx)
        intact = models.generator(pooled, context, x_BLE)
        for name in ("blocks.0.attn.proj.weight", "blocks.1.cross_attn.proj.weight", "blocks.1.ffn.down_proj.weight"):
            weight = dict(models.generator.named_parameters())[name]
            saved = weight.clone()
            weight.zero_()
            assert max_rel_err(models.generator(pooled, context, x_BLE), intact) > 1e-2, name
            weight.copy_(saved)
        state = models.generator.prepare(pooled, context)
        assert models.generator.step(0, state).shape == (2, 1, 64)


def _vae_files(tmp_path, shape: str) -> tuple:
    """A tiny VAR-style VQ-VAE as each code base writes it; returns (path for --vae, its training scales)."""
    base = {"vocab_size": 64, "z_channels": 8, "ch": 32, "test_mode": True, "share_quant_resi": 4}
    scales = {"var": 3, "switti-v_patch_nums": 4, "vqvaehf-reso-512": 10, "vqvaehf-reso-1024": 14}[shape]
    sd = vqvae_state_dict(**{**VAE_SIZES, "scales": scales})
    if shape == "var":  # vae_ch160v4096z32.pth: a torch.save state dict, constructor arguments in code
        torch.save(sd, tmp_path / "vae.pth")
        return tmp_path / "vae.pth", scales
    if shape == "switti-v_patch_nums":  # Switti's first VQVAEHF: v_patch_nums among the constructor arguments
        conf = {**base, "v_patch_nums": [1, 2, 3, 4]}
    else:  # VQVAEHF of Switti's current code and of MindHier's models/vqvae.py: reso (default 1024)
        conf = {**base, "reso": int(shape.rsplit("-", 1)[1])}
    return save_hf_folder(tmp_path / shape, sd, conf), scales


@pytest.mark.parametrize("shape", ["var", "switti-v_patch_nums", "vqvaehf-reso-512", "vqvaehf-reso-1024"])
def test_vqvae_configs_as_each_code_base_writes_them(shape, tmp_path):
    """The same VQ-VAE weights load from every config shape, with a MindHier generator on 4 scales: the VQ-VAE's
    own training schedule (reso / v_patch_nums) sizes only its code-usage statistics."""
    sd = switti_state_dict("fmri_pooler", 2, 64, (1, 2, 3, 4), 64, 8, 32, 32)
    gen = save_hf_folder(tmp_path / "mindhier", sd, {"depth": 2, "use_ar": False, "use_crop_cond": True})
    vae, _ = _vae_files(tmp_path, shape)
    models = import_models(gen, vae).models
    want = vqvae_state_dict(**{**VAE_SIZES, "scales": 3})  # same seed: the same weights whatever the scales
    ours = models.vqvae.state_dict()
    assert all(torch.equal(ours[k], want[k]) for k in ours)
    assert models.cfg.vqvae.ch == 32 and models.cfg.patch_nums == (1, 2, 3, 4)


def test_vqvae_config_refusals(tmp_path):
    base = {"vocab_size": 64, "z_channels": 8, "ch": 32, "test_mode": True, "share_quant_resi": 4}
    gen = save_hf_folder(
        tmp_path / "mh", switti_state_dict("fmri_pooler", 1, 64, (1, 2, 3, 4), 64, 8, 32, 32), {"depth": 1}
    )
    cases = [
        ({**base, "reso": 768}, 10, r"reso=768; known: \[256, 512, 1024\]"),
        ({**base, "reso": 512}, 14, r"scales \(code-usage statistics rows\)=10, the tensors say 14"),
        ({**base, "ch": 48}, 10, "config.json says ch=48, the tensors say 32"),
        ({**base, "reso": 512, "use_fancy_quant": True}, 10, "unknown constructor arguments use_fancy_quant"),
    ]
    for k, (conf, scales, message) in enumerate(cases):
        vae = save_hf_folder(tmp_path / f"vae{k}", vqvae_state_dict(**{**VAE_SIZES, "scales": scales}), conf)
        with pytest.raises(CheckpointError, match=message):
            import_models(gen, vae)


@pytest.mark.parametrize(("depth", "params"), [(16, 310e6), (30, 2.0e9)])
def test_var_config_has_the_published_sizes(depth, params):
    """VAR-d16 310M and VAR-d30 2.0B parameters (REFERENCE §5), built on the meta device."""
    from mindhier_rt.models.generator import ScaleGenerator

    with torch.device("meta"):
        gen = ScaleGenerator(var_config(depth))
    assert abs(sum(p.numel() for p in gen.parameters()) - params) / params < 0.01


def test_switti_rope_table_is_the_reference_one():
    """Switti's 2D RoPE: frequencies 1 / theta^(4j/c) times 128 / (pn - 1), first half the column position
    (t mod pn), second half the row (t div pn), as unit complex numbers in float32."""
    from mindhier_rt.models.blocks import rope_angles, rope_tables
    from mindhier_rt.schedule import Schedule

    sched, c, theta = Schedule(patch_nums=(1, 2, 3, 5), n_levels=1, context_tokens=1), 16, 10000
    ref = []
    for pn in sched.patch_nums:
        freqs = 1.0 / (theta ** (torch.arange(0, c, 4)[: c // 4].float() / c)) * (128 / max(pn - 1, 1))
        t = torch.arange(pn * pn, dtype=torch.float32)
        fx, fy = torch.outer(t % pn, freqs), torch.outer(torch.div(t, pn, rounding_mode="floor"), freqs)
        ref.append(torch.cat([torch.polar(torch.ones_like(fx), fx), torch.polar(torch.ones_like(fy), fy)], dim=-1))
    ref = torch.cat(ref)
    cos, sin = rope_tables(rope_angles(sched, c, float(theta), 128.0, "switti"))
    assert torch.allclose(cos[:, 0::2], ref.real, atol=1e-6) and torch.equal(cos[:, 0::2], cos[:, 1::2])
    assert torch.allclose(sin[:, 1::2], ref.imag, atol=1e-6) and torch.equal(sin[:, 0::2], -sin[:, 1::2])


def _error(tmp_path, gen_sd, vae_sd, name="var.pth") -> str:
    torch.save(gen_sd, tmp_path / name)
    torch.save(vae_sd, tmp_path / "vae.pth")
    with pytest.raises(CheckpointError) as err:
        import_models(tmp_path / name, tmp_path / "vae.pth")
    return str(err.value)


def test_mismatches_are_listed_together(var_files, tmp_path):
    _, _, gen_sd, vae_sd = var_files
    bad = dict(gen_sd)
    del bad["blocks.1.attn.q_bias"]
    bad["blocks.0.attn.extra_bias"] = torch.zeros(64)
    bad["head.bias"] = torch.zeros(65)
    bad["blocks.0.attn.zero_k_bias"] = torch.ones(64)
    msg = _error(tmp_path, bad, vae_sd)
    assert "missing tensors (1): blocks.1.attn.q_bias" in msg
    assert "unexpected tensors (1): blocks.0.attn.extra_bias" in msg
    assert "mis-shaped tensors (1): head.bias: expected (64,), found (65,)" in msg
    assert "inconsistent buffers (1): blocks.0.attn.zero_k_bias" in msg

    wrong_mask = dict(gen_sd, attn_bias_for_masking=torch.zeros_like(gen_sd["attn_bias_for_masking"]))
    assert "neither the scale-local nor the block-causal mask" in _error(tmp_path, wrong_mask, vae_sd)
    small_vae = dict(vae_sd, **{"quantize.embedding.weight": torch.randn(32, 8)})
    assert "32 codes of width 8; the generator expects 64" in _error(tmp_path, gen_sd, small_vae)


def test_refusals_name_the_problem(var_files, tmp_path):
    gen_path, vae_path, _, _ = var_files
    with pytest.raises(CheckpointError, match="holds only the generator; pass its VQ-VAE"):
        import_models(gen_path)
    with pytest.raises(CheckpointError, match="this is a VQ-VAE; pass the generator as --ckpt"):
        import_models(vae_path, vae_path)
    torch.save({"fMRI_encoder.proj.0.weight": torch.zeros(2, 2)}, tmp_path / "enc.pth")
    with pytest.raises(CheckpointError, match="MindHier's reference fMRI encoder"):
        import_models(tmp_path / "enc.pth", vae_path)
    torch.save({"blocks": [1, 2]}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="expected a plain state dict"):
        import_models(tmp_path / "odd.pth", vae_path)
    sd = switti_state_dict("fmri_pooler", 1, 64, PN, 64, 8, 32, 32)
    folder = save_hf_folder(tmp_path / "mh", sd, {"depth": 1, "use_moe": True})
    with pytest.raises(CheckpointError, match="unknown constructor arguments use_moe"):
        import_models(folder, vae_path)
    folder = save_hf_folder(tmp_path / "mh2", sd, {"depth": 3})
    with pytest.raises(CheckpointError, match=r"config\.json says depth=3, the tensors say 1"):
        import_models(folder, vae_path)


def test_our_checkpoints_still_load_and_take_a_vae(tiny_ckpt, tmp_path):
    models = import_models(tiny_ckpt).models
    ref = MindHier.load(tiny_ckpt)
    assert all(torch.equal(a, b) for a, b in zip(models.generator.state_dict().values(),
                                                 ref.generator.state_dict().values(), strict=True))  # fmt: skip
    with pytest.raises(CheckpointError, match="the VQ-VAE is VQVAEConfig"):  # tiny's VQ-VAE has other sizes
        torch.save(vqvae_state_dict(**{**VAE_SIZES, "vocab": 64}), tmp_path / "vae.pth")
        import_models(tiny_ckpt, tmp_path / "vae.pth")


def test_class_labels_drive_the_decode_loop(var_files):
    gen_path, vae_path, _, _ = var_files
    backend = TorchBackend(import_models(gen_path, vae_path).models)
    rec = generate(backend, torch.tensor([1, 7]), SamplingConfig(seed=0), samples=2)
    assert rec.images_NS3HW.shape == (2, 2, 3, 6, 6) and len(rec.tokens) == len(PN)
    again = generate(backend, torch.tensor([7]), SamplingConfig(seed=0), samples=2, scan_ids=torch.tensor([1]))
    assert all(torch.equal(a[1:], b) for a, b in zip(rec.tokens, again.tokens, strict=True))
    with pytest.raises(InputError, match=r"class labels must be in 0\.\.9, got \[10\]"):
        generate(backend, torch.tensor([10]), SamplingConfig())
    with pytest.raises(InputError, match="class-conditional"):
        from mindhier_rt.pipeline import reconstruct

        reconstruct(backend, torch.zeros(1, 4), "subj01", SamplingConfig())


@pytest.fixture(scope="module")
def var_bundle(var_files, tmp_path_factory):
    """`mindhier-rt export --ckpt var.pth --vae vae.pth` of the tiny VAR files (ONNX export: the slow part)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from mindhier_rt.cli import main

    gen_path, vae_path, _, _ = var_files
    out = tmp_path_factory.mktemp("var_bundle") / "bundle"
    argv = ["mindhier-rt", "export", "--ckpt", str(gen_path), "--vae", str(vae_path), "--out", str(out)]
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit) as done:
        mp.setattr("sys.argv", [*argv, "--batch", "2"])
        main()
    assert done.value.code in (0, None)
    return out


def test_var_bundle_matches_torch(var_files, var_bundle):
    from mindhier_rt.bundle import Bundle
    from mindhier_rt.runtime.onnxruntime_backend import OnnxRuntimeBackend

    gen_path, vae_path, _, _ = var_files
    bundle = Bundle.open(var_bundle)
    m = bundle.manifest
    assert m["condition"] == {"kind": "class", "num_classes": 10, "null_label": 10, "input": "context.labels"}
    assert m["subjects"] == {} and m["tables"] == {} and not any(g.startswith("encoder_") for g in m["graphs"])
    step_inputs = [i["name"] for i in m["graphs"]["generator_step"]["inputs"]]
    assert step_inputs[:3] == ["h", "ada_blocks", "ada_head"] and step_inputs[3] == "past_key_values.0.key"
    sampling = SamplingConfig(seed=4)
    ref = generate(TorchBackend(import_models(gen_path, vae_path).models), torch.tensor([2, 5]), sampling)
    got = generate(OnnxRuntimeBackend(bundle), torch.tensor([2, 5]), sampling)
    assert all(torch.equal(a, b) for a, b in zip(ref.tokens, got.tokens, strict=True))
    assert (ref.images_NS3HW - got.images_NS3HW).abs().max() < 1e-4


def test_decode_class_labels_from_the_command_line(var_files, var_bundle, tmp_path, cli):
    import json

    gen_path, vae_path, _, _ = var_files
    code, _, err = cli("decode", "--engine", var_bundle, "--class-label", 3, "--class-label", 9, "--out",
                         tmp_path / "a", "--samples", 2)  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "a" / "decode.json").read_text())
    assert report["class_labels"] == [3, 9] and len(report["images"]) == 4
    assert all((tmp_path / "a" / im["file"]).is_file() for im in report["images"])
    code, _, err = cli("decode", "--ckpt", gen_path, "--vae", vae_path, "--class-label", 3, "--out", tmp_path / "b")
    assert code == 0, err
    np.save(tmp_path / "x.npy", np.zeros((1, 4), np.float32))
    code, _, err = cli("decode", "--engine", var_bundle, "--fmri", tmp_path / "x.npy", "--subject", "subj01",
                       "--out", tmp_path / "c")  # fmt: skip
    assert code == 1 and "class-conditional" in err
    code, _, err = cli("decode", "--engine", var_bundle, "--out", tmp_path / "d")
    assert code == 1 and "--fmri" in err and "--class-label" in err
