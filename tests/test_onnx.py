"""Export to an engine bundle and the onnxruntime backend: graph checks, parity with torch, bad bundles."""

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from mindhier_rt.bundle import Bundle, BundleError
from mindhier_rt.config import preset
from mindhier_rt.errors import InputError
from mindhier_rt.export.checks import GraphCheckError, check_graph, op_counts, tensorrt_incompatible
from mindhier_rt.export.onnx_export import export_bundle
from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.pipeline import reconstruct
from mindhier_rt.runtime.base import ScaleUpdate
from mindhier_rt.runtime.onnxruntime_backend import OnnxRuntimeBackend
from mindhier_rt.runtime.torch_backend import TorchBackend
from mindhier_rt.sampling import SamplingConfig

# demo: switti blocks with learned absolute positions as well as RoPE (abs_pos)
CASES = [
    ("tiny", "scale_local"), ("tiny", "block_causal"), ("small", "scale_local"), ("small", "block_causal"),
    ("demo", "scale_local"),
]  # fmt: skip


@pytest.fixture(scope="module", params=CASES, ids=lambda c: "-".join(c))
def exported(request, tmp_path_factory, tiny_export):
    """(models, bundle); tiny comes from the session's shared exports (scale-local through `mindhier-rt export`)."""
    name, mode = request.param
    if name == "tiny":
        return tiny_export(mode)
    models = MindHier.from_config(preset(name).replace(attn_mode=mode), seed=0).eval()
    with torch.no_grad():
        models.generator.head.weight.mul_(8.0)  # peaked, as in conftest._export_tiny
    folder = tmp_path_factory.mktemp(f"{name}_{mode}")
    # one subject: each encoder graph costs seconds of export, and tiny covers several
    bundle = export_bundle(models, folder / "bundle", batch=2, samples=2, subjects=["subj01"])
    return models, bundle


def lockstep_errors(models, bundle) -> tuple[list[float], float]:
    """Drive the torch and onnxruntime backends through the same tokens (drawn from the torch logits).

    Returns every scale's max relative error of the guided logits and the max image difference.
    """
    from mindhier_rt.sampling import cfg_combine, guidance_weight, sample_tokens

    cfg, K = models.cfg, models.cfg.schedule.n_scales
    voxels = torch.randn(2, cfg.encoder.voxel_count("subj01"), generator=torch.Generator().manual_seed(0))
    sampling = SamplingConfig(seed=5)
    backends = [TorchBackend(models), OnnxRuntimeBackend(bundle)]
    states, f_hats, xs = [], [], [None, None]
    for be in backends:
        pooled, context = be.encode(torch.cat([voxels, torch.zeros_like(voxels)]), "subj01")
        states.append(be.prepare(pooled, context))
        f_hats.append(be.empty_fhat(2))
    rows, errors = torch.arange(2), []
    for i in range(K):
        logits = [be.step(i, st, x) for be, st, x in zip(backends, states, xs, strict=True)]
        ref, got = (cfg_combine(lg[:2], lg[2:], guidance_weight(sampling, i, K)) for lg in logits)
        assert ref.shape == got.shape
        errors.append(((ref - got).abs().max() / ref.abs().max()).item())
        idx = sample_tokens(ref, sampling, i, rows, rows * 0)
        for j, be in enumerate(backends):
            f_hats[j], x = be.update(i, f_hats[j], idx)
            xs[j] = None if x is None else torch.cat([x, x])
    images = [be.decode_image(f) for be, f in zip(backends, f_hats, strict=True)]
    return errors, (images[0] - images[1]).abs().max().item()


def test_logits_match_per_scale(exported):
    """Both backends step through the same tokens; every scale's guided logits agree to 1e-4 (float32)."""
    models, bundle = exported
    errors, image_diff = lockstep_errors(models, bundle)
    assert max(errors) < 1e-4, errors
    assert image_diff < 1 / 255


def test_update_hands_the_loop_the_same_next_input(exported):
    """``update`` is one contract: f_hat and scale i + 1's embedded input [B, n_{i+1}, C], the same tensor (to
    float32 rounding) from the eager backend and from the exported graphs."""
    models, bundle = exported
    if models.cfg.name != "tiny":
        pytest.skip("the tiny bundles cover both modes")
    cfg, K = models.cfg, models.cfg.schedule.n_scales
    backends = [TorchBackend(models), OnnxRuntimeBackend(bundle)]
    f_hats = [be.empty_fhat(2) for be in backends]
    g = torch.Generator().manual_seed(0)
    for i in range(K):
        idx = torch.randint(0, cfg.vocab_size, (2, cfg.schedule.token_counts[i]), generator=g)
        updates = [be.update(i, f, idx) for be, f in zip(backends, f_hats, strict=True)]
        assert all(isinstance(u, ScaleUpdate) for u in updates)
        ref, got = updates
        assert (ref.f_hat_BEhw - got.f_hat_BEhw).abs().max() < 1e-4
        if i == K - 1:
            assert ref.h_next_BlC is None and got.h_next_BlC is None
        else:
            want = (2, cfg.schedule.token_counts[i + 1], cfg.generator.width)
            assert tuple(ref.h_next_BlC.shape) == tuple(got.h_next_BlC.shape) == want
            assert (ref.h_next_BlC - got.h_next_BlC).abs().max() < 1e-4
        f_hats = [u.f_hat_BEhw for u in updates]


def test_decode_matches_the_torch_backend(exported):
    """The full loop: identical tokens for the same seed, images within 1/255."""
    models, bundle = exported
    voxels = torch.randn(2, models.cfg.encoder.voxel_count("subj01"), generator=torch.Generator().manual_seed(0))
    sampling = SamplingConfig(seed=5)  # guidance on at every scale
    ref = reconstruct(TorchBackend(models), voxels, "subj01", sampling, samples=2)
    got = reconstruct(OnnxRuntimeBackend(bundle), voxels, "subj01", sampling, samples=2)
    for a, b in zip(ref.tokens, got.tokens, strict=True):
        assert torch.equal(a, b)
    assert (ref.images_NS3HW - got.images_NS3HW).abs().max().item() < 1 / 255


def test_graphs_pass_the_checks(exported):
    models, bundle = exported
    graphs = bundle.manifest["graphs"]
    cfg = models.cfg
    subjects = [s for s, _ in cfg.encoder.subjects] if cfg.name == "tiny" else ["subj01"]
    assert list(bundle.manifest["subjects"]) == subjects
    expected = {f"encoder_{s}" for s in subjects} | {"context", "generator_step", "vq_decoder"}
    expected |= {f"update_{i}" for i in range(cfg.schedule.n_scales)}
    assert set(graphs) == expected
    for entry in graphs.values():
        path = bundle.path(entry["file"])
        check_graph(path)  # onnx full check + TensorRT operator set
        ops = op_counts(path)
        assert not {"If", "Loop", "Scan"} & set(ops)
    step = graphs["generator_step"]
    names = [t["name"] for t in step["inputs"]]
    if cfg.generator.attn_mode == "block_causal":
        assert "past_key_values.0.key" in names and "present.0.value" in [t["name"] for t in step["outputs"]]
    else:
        assert not any(n.startswith("past_key_values") for n in names)


def test_generator_weights_are_stored_once(exported):
    """One step graph for every scale: the generator's weights are split between the context graph
    (AdaLN, cross-attention K/V projections) and the step graph, never copied per scale."""
    import onnx
    from onnx import numpy_helper

    models, bundle = exported

    def weight_bytes(graph: str) -> int:
        model = onnx.load(str(bundle.path(bundle.graph(graph)["file"])))
        return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)

    param_bytes = sum(p.numel() * 4 for p in models.generator.parameters())
    assert param_bytes * 0.9 < weight_bytes("generator_step") + weight_bytes("context") < param_bytes * 1.1
    n_update = models.cfg.schedule.n_scales
    assert max(weight_bytes(f"update_{i}") for i in range(n_update)) < 0.1 * param_bytes  # VQ maps only


def test_polygraphy_compares_onnxruntime_with_torch(exported):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, RunResults, SimpleCompareFunc
    from polygraphy.comparator.struct import IterationResult

    from mindhier_rt.export.graphs import ContextGraph

    models, bundle = exported
    cfg = models.cfg
    g = torch.Generator().manual_seed(1)
    pooled = torch.randn(3, cfg.context_dim, generator=g)
    context = torch.randn(3, cfg.schedule.context_length, cfg.context_dim, generator=g)
    feeds = {"pooled": pooled.numpy(), "context": context.numpy()}
    entry = bundle.graph("context")
    runner = OnnxrtRunner(SessionFromOnnx(str(bundle.path(entry["file"]))))
    results = Comparator.run([runner], data_loader=[feeds])
    with torch.no_grad():
        outs = ContextGraph(models.generator).eval()(pooled, context)
    names = [t["name"] for t in entry["outputs"]]
    reference = {n: o.numpy() for n, o in zip(names, outs, strict=True)}
    results.extend(RunResults([("torch", [IterationResult(reference, runner_name="torch")])]))
    accuracy = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=1e-5, rtol=1e-4))
    assert bool(accuracy)


def test_tensorrt_operator_check_rejects_foreign_ops(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    for op in ("Hardmax", "Loop"):  # outside the parser's set / control flow the bundle forbids
        nodes = [helper.make_node("Abs", ["x"], ["t"]), helper.make_node(op, ["t"], ["y"])]
        model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 18)])
        path = tmp_path / f"{op}.onnx"
        onnx.save(model, path)
        assert tensorrt_incompatible(path) == [op]
    with pytest.raises(GraphCheckError, match="Hardmax"):
        check_graph(tmp_path / "Hardmax.onnx")


def _copy(bundle: Bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(bundle.root, dst)
    return dst


def test_bad_bundles_are_refused(exported, tmp_path):
    models, bundle = exported
    if models.cfg.name != "tiny" or models.cfg.generator.attn_mode != "scale_local":
        pytest.skip("one bundle is enough for the error paths")
    missing = _copy(bundle, tmp_path / "a")
    (missing / "vq_decoder.onnx").unlink()
    with pytest.raises(BundleError, match=r"vq_decoder\.onnx .*missing"):
        Bundle.open(missing)
    altered = _copy(bundle, tmp_path / "b")
    data = bytearray((altered / "update_0.onnx").read_bytes())
    data[-1] ^= 0xFF
    (altered / "update_0.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="altered"):
        Bundle.open(altered)
    future = _copy(bundle, tmp_path / "c")
    manifest = json.loads((future / "manifest.json").read_text())
    manifest["format_version"] = 99
    (future / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="version 99"):
        Bundle.open(future)
    with pytest.raises(BundleError, match="no manifest"):
        Bundle.open(tmp_path)
    backend = OnnxRuntimeBackend(bundle)
    assert backend.host_threads == 1  # the CPU provider keeps PyTorch's host work to one thread (module docstring)
    assert OnnxRuntimeBackend(bundle, host_threads=None).host_threads is None
    with pytest.raises(InputError, match="no encoder for subject 'subj07'"):
        backend.encode(torch.zeros(1, 96), "subj07")
    # voxels are checked once, by the loop, against the backend's voxel_count (the bundle's)
    with pytest.raises(InputError, match="expects 96 voxels"):
        reconstruct(backend, torch.zeros(1, 95), "subj01", SamplingConfig())
    with pytest.raises(InputError, match="no encoder for subject 'subj07'"):
        reconstruct(backend, torch.zeros(1, 96), "subj07", SamplingConfig())


def test_decode_engine_from_the_command_line(exported, tmp_path, cli):
    models, bundle = exported
    if models.cfg.name != "tiny" or models.cfg.generator.attn_mode != "scale_local":
        pytest.skip("the bundle made by `mindhier-rt export` is enough")
    assert bundle.manifest["batch"] == {"scans": 2, "samples": 2, "rows": 8}
    voxels = np.random.default_rng(0).standard_normal((3, 96)).astype(np.float32)
    np.save(tmp_path / "v.npy", voxels)
    common = ["--fmri", tmp_path / "v.npy", "--subject", "subj01", "--seed", "3"]
    ckpt = bundle.root.parent / "model.safetensors"
    assert cli("decode", "--engine", bundle.root, "--out", tmp_path / "ort", *common)[0] == 0
    assert cli("decode", "--ckpt", ckpt, "--out", tmp_path / "ref", *common)[0] == 0
    from PIL import Image

    for i in range(3):
        a = np.asarray(Image.open(tmp_path / "ort" / f"scan{i:05d}.png"), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "ref" / f"scan{i:05d}.png"), dtype=np.int16)
        assert np.abs(a - b).max() <= 1
    assert json.loads((tmp_path / "ort" / "decode.json").read_text())["backend"] == "onnxruntime"
    broken = _copy(bundle, tmp_path / "broken")
    (broken / "context.onnx").unlink()
    code, _, err = cli("decode", "--engine", broken, "--out", tmp_path / "x", *common)
    assert code == 1 and err.startswith("error: ") and "missing" in err and "Traceback" not in err
    code, _, err = cli("decode", "--out", tmp_path / "x", *common)
    assert code == 1 and "exactly one of --ckpt" in err


FLOAT16_LOGIT_TOLERANCE = 1e-2  # max relative error of a scale's guided logits, float16 bundle vs float32 torch
FLOAT16_IMAGE_TOLERANCE = 3 / 255  # same tokens -> images within this


def test_float16_bundle_within_documented_tolerance(tmp_path):
    models = MindHier.from_config(preset("tiny"), seed=0).eval()
    bundle = export_bundle(models, tmp_path / "fp16", dtype="float16", subjects=["subj01"])
    assert bundle.manifest["dtype"] == "float16"
    errors, image_diff = lockstep_errors(models, bundle)
    assert max(errors) < FLOAT16_LOGIT_TOLERANCE, errors
    assert image_diff < FLOAT16_IMAGE_TOLERANCE
