"""TensorRT plans: profiles, binding tables, the in-place cache graph, manifest updates, load-time checks, CLI.

Everything but the last tests runs without TensorRT or a GPU. The backend itself runs here on a test double:
``FakeTensorRT`` has the slice of TensorRT's runtime API the backend calls and executes each "plan" with
onnxruntime on host memory at the bound addresses, so the binding plan (buffers, offsets, aliasing, ping-pong
caches, rope layout, write indices) and the backend's row handling and graph replays are checked end to end
against the onnxruntime backend. Tests that need TensorRT and a GPU are marked ``gpu`` and skipped without them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from fake_tensorrt import FAKE_VERSION, FakePlanBuilder, FakeTensorRT, HostMemory, fake_backend

from mindhier_rt.bundle import Bundle, PlanSpec, parse_manifest
from mindhier_rt.bundle.tensor_names import KV_STEP_GRAPH as KV_GRAPH
from mindhier_rt.bundle.tensor_names import STEP_GRAPH
from mindhier_rt.bundle.tensorrt_plan import ALIGNMENT, ITEMSIZE
from mindhier_rt.errors import BackendError, ConfigError, MissingDependencyError
from mindhier_rt.export import attention_plugin
from mindhier_rt.export.kv_step_graph import derive_kv_step_graph
from mindhier_rt.export.tensorrt_build import HAS_TENSORRT, BuildOptions, build_plans
from mindhier_rt.export.tensorrt_plan import (
    binding_plan,
    graph_symbols,
    plan_profiles,
    resolve_dim,
    row_counts,
    tensor_shape,
    with_graph,
)
from mindhier_rt.export.tensorrt_policy import BuildEnvironment, choose_self_cache, choose_typing
from mindhier_rt.pipeline import reconstruct
from mindhier_rt.runtime.onnxruntime_backend import OnnxRuntimeBackend
from mindhier_rt.runtime.tensorrt_backend import TensorRTBackend
from mindhier_rt.runtime.tensorrt_compat import (
    PlanMismatchError,
    RuntimeEnvironment,
    check_plan_metadata,
    version_tuple,
)
from mindhier_rt.sampling import SamplingConfig

MODES = ["scale_local", "block_causal"]


@pytest.fixture(scope="module")
def bundle_copy(tiny_export, tmp_path_factory):
    """``bundle_copy(mode, context_map="training")``: a private copy of the session's tiny bundle (2 scans x 2
    samples, guided)."""
    copies: dict[tuple[str, str], Bundle] = {}

    def get(mode: str, context_map: str = "training") -> Bundle:
        if (mode, context_map) not in copies:
            _, bundle = tiny_export(mode, context_map)
            dst = tmp_path_factory.mktemp(f"trt_{mode}_{context_map}") / "bundle"
            shutil.copytree(bundle.root, dst)
            copies[mode, context_map] = Bundle.open(dst)
        return copies[mode, context_map]

    return get


# ---- pure planning -------------------------------------------------------------------------------------
def test_dims_and_versions():
    assert resolve_dim("past + tokens", {"past": 5, "tokens": 9}) == 14
    assert resolve_dim(7, {}) == 7 and resolve_dim("rows", {"rows": 8}) == 8
    with pytest.raises(ConfigError, match="unknown symbol 'nope'"):
        resolve_dim("nope", {"rows": 1})
    assert version_tuple("10.15.1.29") == (10, 15, 1, 29)
    assert version_tuple("11.4.0.106") > version_tuple("10.15.1")
    assert version_tuple("10.8.0.post1") == (10, 8, 0)


@pytest.mark.parametrize("mode", MODES)
def test_one_static_profile_per_scale(bundle_copy, mode):
    bundle = bundle_copy(mode)
    manifest, sched = bundle.spec, bundle.manifest["schedule"]
    rows = row_counts(manifest)
    assert (rows.scans, rows.samples, rows.guided, rows.rows, rows.sample_rows) == (2, 2, True, 8, 4)
    profiles = plan_profiles(manifest, "generator_step", rows)
    assert len(profiles) == sched["n_scales"]
    for i, profile in enumerate(profiles):
        for name, s in profile.items():
            assert s["min"] == s["opt"] == s["max"], name
        assert profile["h"]["opt"][:2] == [8, sched["token_counts"][i]]
        assert profile["rope.cos"]["opt"][0] == sched["token_counts"][i]
        assert profile["cross.0.key"]["opt"][0] == 8
        if mode == "block_causal":
            assert profile["past_key_values.0.key"]["opt"][2] == sched["cached_lengths"][i]
        else:
            assert not any(n.startswith("past_key_values") for n in profile)
    (context,) = plan_profiles(manifest, "context", rows)
    assert context["pooled"]["opt"][0] == 8
    (update,) = plan_profiles(manifest, "update_1", rows)
    assert update["f_hat"]["opt"][0] == 4 and update["idx"]["opt"] == [4, sched["token_counts"][1]]
    (encoder,) = plan_profiles(manifest, "encoder_subj01", rows)
    assert encoder["voxels"] == {"min": [1, 96], "opt": [2, 96], "max": [2, 96]}
    bigger = row_counts(manifest, scans=3, samples=1)
    assert plan_profiles(manifest, "context", bigger)[0]["pooled"]["opt"][0] == 6


def _ranges_overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _check_plan(manifest, plan) -> None:
    """Every binding aligned and inside its buffer; within one run no output overlaps another tensor except
    the declared in-place pairs (present.X written over past_key_values.X)."""
    for graph, table in plan.bindings.items():
        n = len(next(iter(table.values())).shapes)
        for p in range(n):
            spans = []
            for b in table.values():
                assert b.offsets[p] % ALIGNMENT == 0
                assert b.offsets[p] + b.nbytes(p) <= plan.buffers[b.buffer[p]], (graph, b.name)
                spans.append((b, (b.buffer[p], b.offsets[p], b.offsets[p] + b.nbytes(p))))
            for k, (b1, s1) in enumerate(spans):
                for b2, s2 in spans[k + 1 :]:
                    if b1.is_input and b2.is_input:
                        continue
                    if s1[0] != s2[0] or not _ranges_overlap(s1[1:], s2[1:]) or b1.nbytes(p) == 0 == b2.nbytes(p):
                        continue
                    names = {b1.name, b2.name}
                    caches = {n.removeprefix("present.").removeprefix("past_key_values.") for n in names}
                    in_place = (
                        plan.self_cache == "in_place"
                        and len(caches) == 1
                        and any(n.startswith("present.") for n in names)
                    )
                    assert in_place, f"{graph} profile {p}: {b1.name} and {b2.name} overlap"


@pytest.mark.parametrize("mode", MODES)
def test_binding_plan_shares_buffers_between_graphs(bundle_copy, mode):
    bundle = bundle_copy(mode)
    manifest, sched = bundle.spec, bundle.manifest["schedule"]
    K = sched["n_scales"]
    plan = binding_plan(manifest, row_counts(manifest))
    _check_plan(manifest, plan)
    step = plan.bindings["generator_step"]
    assert step["h"].buffer[0] == "context.start" and set(step["h"].buffer[1:]) == {"step.h"}
    assert step["ada_blocks"].buffer[0] == "context.ada_blocks"
    cross = step["cross.1.value"]
    block = math.prod(cross.shapes[0]) * 4
    assert cross.copy_from is None
    assert list(cross.offsets) == [s * block for s in sched["segment_of_scale"]]
    # rope rows of each scale start on an aligned boundary, in scale order
    starts = [r[2] for r in plan.rope_layout]
    assert starts == sorted(starts) and all(s % ALIGNMENT == 0 for s in starts)
    assert [r[0] for r in plan.rope_layout] == list(sched["offsets"][:K])
    assert list(step["rope.sin"].offsets) == starts
    # f_hat alternates between two buffers and the decoder reads the last one
    for i in range(K):
        upd = plan.bindings[f"update_{i}"]
        assert upd["f_hat"].buffer[0] != upd["f_hat_next"].buffer[0]
        if i:
            assert upd["f_hat"].buffer[0] == plan.bindings[f"update_{i - 1}"]["f_hat_next"].buffer[0]
    assert plan.bindings["vq_decoder"]["f_hat"].buffer[0] == plan.bindings[f"update_{K - 1}"]["f_hat_next"].buffer[0]
    if mode == "block_causal":
        assert plan.self_cache == "ping_pong"
        past, present = step["past_key_values.1.key"], step["present.1.key"]
        for i in range(K - 1):
            assert present.buffer[i] == past.buffer[i + 1] != past.buffer[i]  # ping-pong, never in place
    else:
        assert plan.self_cache == "none" and not any(b.startswith("cache.") for b in plan.buffers)
    recorded = json.loads(json.dumps(plan.to_dict()))
    assert recorded["buffers"] == plan.buffers and recorded["rows"]["rows"] == 8
    assert recorded["bindings"] == {g: [b.to_dict() for b in t.values()] for g, t in plan.bindings.items()}


def test_misaligned_segments_are_copied(bundle_copy):
    """One row in float16: a cross segment of 1 x 2 x 5 x 32 halves is 640 bytes, not a multiple of 256, so the
    step reads each layer's segment from an aligned copy instead of a pointer offset into the context cache."""
    manifest = json.loads(json.dumps(bundle_copy("scale_local").manifest))
    manifest["batch"] = {"scans": 1, "samples": 1, "rows": 1}
    manifest["dtype"] = "float16"
    for entry in manifest["graphs"].values():
        for spec in entry["inputs"] + entry["outputs"]:
            if spec["dtype"] == "float32":
                spec["dtype"] = "float16"
    spec = parse_manifest(manifest, "float16 manifest")
    plan = binding_plan(spec, row_counts(spec))
    cross = plan.bindings["generator_step"]["cross.0.key"]
    block = math.prod(cross.shapes[0]) * ITEMSIZE[cross.dtype]
    assert block % ALIGNMENT != 0
    assert cross.buffer[0] == "step.cross.0.key" and set(cross.offsets) == {0}
    assert [c[1] for c in cross.copy_from] == [s * block for s in manifest["schedule"]["segment_of_scale"]]
    _check_plan(manifest, plan)


@pytest.mark.parametrize("context_map", ["training", "reference-pipeline"])
def test_kv_graph_matches_the_concat_graph(bundle_copy, context_map):
    """generator_step_kv (TensorScatter into a full-length cache, masked keys) gives the concat graph's logits
    and caches at every scale, with stale values in the unwritten part of the cache; under the reference-pipeline
    map too (the masked cross-attention is left as it is)."""
    import onnxruntime as ort

    bundle = bundle_copy("block_causal", context_map)
    entry = derive_kv_step_graph(bundle)
    kv_path = bundle.path(entry.file)
    from onnx import load

    ops = {n.op_type for n in load(str(kv_path), load_external_data=False).graph.node}
    assert "TensorScatter" in ops
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    concat = ort.InferenceSession(str(bundle.path("generator_step.onnx")), opts, providers=["CPUExecutionProvider"])
    kv = ort.InferenceSession(str(kv_path), opts, providers=["CPUExecutionProvider"])
    manifest, rng = bundle.manifest, np.random.default_rng(0)
    cos, sin = (np.load(bundle.path(f"rope_{t}.npy")) for t in ("cos", "sin"))
    specs = {s.name: s for s in bundle.spec.graphs["generator_step"].inputs}
    R, L = 3, manifest["schedule"]["total_tokens"]
    fixed = {
        n: rng.standard_normal(resolve_shape(s, R), dtype=np.float32)
        for n, s in specs.items()
        if n in ("ada_blocks", "ada_head") or (n.startswith("cross.") and n != "cross.segment")
    }
    segment = np.load(bundle.path("cross_segment.npy")) if "cross.segment" in specs else None
    past = {n: np.zeros(resolve_shape(s, R, past=0), np.float32) for n, s in specs.items() if n.startswith("past_")}
    cache = {n: np.full((R, *p.shape[1:2], L, p.shape[3]), 7.0, np.float32) for n, p in past.items()}
    out_names = [o.name for o in concat.get_outputs()]
    for scale in manifest["scales"]:
        l, off = scale["tokens"], scale["offset"]
        feeds = {"h": rng.standard_normal((R, l, specs["h"].shape[2]), dtype=np.float32)}
        feeds.update({"rope.cos": cos[off : off + l], "rope.sin": sin[off : off + l], **fixed})
        if segment is not None:
            feeds["cross.segment"] = segment[off : off + l]
        ref = concat.run(None, {**feeds, **past})
        got = kv.run(None, {**feeds, **cache, "write_indices": np.full(R, off, np.int64)})
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-5)
        past = {n.replace("present", "past_key_values"): a for n, a in zip(out_names[1:], ref[1:], strict=True)}
        cache = {n.replace("present", "past_key_values"): a for n, a in zip(out_names[1:], got[1:], strict=True)}
        for name, a in past.items():
            np.testing.assert_allclose(cache[name][:, :, : off + l], a, rtol=1e-6, atol=1e-6)
    kv_path.unlink()


def resolve_shape(spec, rows: int, past: int = 0) -> tuple[int, ...]:
    return tuple(resolve_dim(d, {"rows": rows, "past": past, "tokens": 1}) for d in spec.shape)


# ---- decisions and load-time checks ------------------------------------------------------------------
def test_precision_follows_the_onnx_on_strongly_typed_builds():
    trt10 = BuildEnvironment("10.8.0.43", "GPU", "9.0", frozenset({"fp16", "bf16"}))
    trt11 = BuildEnvironment("11.4.0.106", "GPU", "9.0")
    assert choose_typing("float32", "fp32", trt11) == "strong"
    assert choose_typing("float16", "fp16", trt11) == "strong"
    assert choose_typing("float32", "fp16", trt10) == "weak"  # TensorRT 10's builder flag
    with pytest.raises(ConfigError, match=r"re-export with `mindhier-rt export --dtype float16`"):
        choose_typing("float32", "fp16", trt11)
    with pytest.raises(ConfigError, match="--precision fp16"):
        choose_typing("float16", "fp32", trt10)
    with pytest.raises(ConfigError, match="must be one of"):
        choose_typing("float32", "int8", trt10)


def test_self_cache_choice(bundle_copy):
    bc, sl = bundle_copy("block_causal").spec, bundle_copy("scale_local").spec
    old, new, trt11 = (BuildEnvironment(v, "GPU", "9.0") for v in ("10.14.1.48", "10.15.1.29", "11.4.0.106"))
    assert choose_self_cache(sl, new) == "none"
    assert choose_self_cache(bc, old) == "ping_pong"
    assert choose_self_cache(bc, new) == choose_self_cache(bc, trt11) == "in_place"
    assert choose_self_cache(bc, trt11, "ping_pong") == "ping_pong"
    with pytest.raises(ConfigError, match=r"needs TensorRT >= 10\.15"):
        choose_self_cache(bc, old, "in_place")


def _context_plan(meta: dict) -> PlanSpec:
    """The typed entry parse_manifest makes of a plans.context entry like ``meta``."""
    facts = {k: meta.get(k) for k in ("tensorrt_version", "gpu", "compute_capability")}
    return PlanSpec("context", meta["file"], (), flags=tuple(meta.get("flags", ())), **facts)


def test_plan_metadata_is_checked_at_load():
    meta = {
        "file": "x.plan",
        "tensorrt_version": "10.15.1.29",
        "gpu": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0",
    }
    here = RuntimeEnvironment("10.15.1.29", "NVIDIA H100 80GB HBM3", "9.0")
    assert check_plan_metadata(_context_plan(meta), here) == []
    with pytest.raises(PlanMismatchError, match=r"built with TensorRT 10\.15\.1\.29, this is TensorRT 10\.16"):
        check_plan_metadata(_context_plan(meta), dataclasses.replace(here, tensorrt_version="10.16.0.1"))
    with pytest.raises(PlanMismatchError, match=r"compute capability 9\.0 .* this GPU is 8\.0"):
        check_plan_metadata(_context_plan(meta), dataclasses.replace(here, gpu="NVIDIA A100", compute_capability="8.0"))
    (warning,) = check_plan_metadata(_context_plan(meta), dataclasses.replace(here, gpu="NVIDIA H200"))
    assert "same architecture" in warning
    with pytest.raises(PlanMismatchError, match="lean TensorRT runtime"):
        check_plan_metadata(_context_plan(meta), dataclasses.replace(here, lean=True))
    compatible = {**meta, "flags": ["version_compatible"]}
    assert check_plan_metadata(_context_plan(compatible), dataclasses.replace(here, tensorrt_version="10.16.0.1")) == []
    assert check_plan_metadata(_context_plan(compatible), dataclasses.replace(here, lean=True)) == []
    for older_or_other in ("10.14.1.48", "11.0.0.1"):
        with pytest.raises(PlanMismatchError, match="version compatible"):
            check_plan_metadata(_context_plan(compatible), dataclasses.replace(here, tensorrt_version=older_or_other))
    with pytest.raises(PlanMismatchError, match="lacks compute_capability"):
        check_plan_metadata(_context_plan({k: v for k, v in meta.items() if k != "compute_capability"}), here)


# ---- build_plans and the manifest --------------------------------------------------------------------
def test_build_writes_plans_and_the_manifest(bundle_copy, tmp_path):
    src = bundle_copy("scale_local")
    root = tmp_path / "bundle"
    shutil.copytree(src.root, root)
    builder = FakePlanBuilder()
    report = build_plans(root, BuildOptions(version_compatible=True), builder=builder)
    assert builder.finished and report.self_cache == "none"
    bundle = Bundle.open(root)  # every plan file is in the checksums
    manifest = bundle.manifest
    K = manifest["schedule"]["n_scales"]
    plans = manifest["plans"]
    expected = {"generator_step", "context", "encoder_subj01", "encoder_subj02", "vq_decoder"}
    assert set(plans) == expected | {f"update_{i}" for i in range(K)}
    for graph, entry in plans.items():
        assert entry["file"] == f"{graph}.plan" and entry["file"] in manifest["files"]
        assert {"min", "opt", "max"} == set(next(iter(entry["profiles"][0].values())))
        assert entry["tensorrt_version"] == FAKE_VERSION and entry["compute_capability"] == "9.0"
        assert entry["precision"] == "fp32" and entry["typing"] == "strong" and entry["flags"] == ["version_compatible"]
    assert len(plans["generator_step"]["profiles"]) == K
    assert plans["generator_step"]["profiles"] == plan_profiles(bundle.spec, "generator_step", row_counts(bundle.spec))
    assert manifest["tensorrt"]["self_cache"] == "none" and manifest["versions"]["tensorrt"] == FAKE_VERSION
    assert builder.built[0][0] == "generator_step"  # the longest build first
    assert not (root / ".plans-building").exists()

    # a failed build leaves the bundle as it was
    before = json.loads((root / "manifest.json").read_text())
    with pytest.raises(BackendError, match="failed to build update_1"):
        build_plans(root, BuildOptions(), builder=FakePlanBuilder(fail_on="update_1"))
    assert json.loads((root / "manifest.json").read_text()) == before
    Bundle.open(root)
    assert not (root / ".plans-building").exists()
    with pytest.raises(ConfigError, match=r"re-export with `mindhier-rt export --dtype float16`"):
        build_plans(root, BuildOptions(precision="fp16"), builder=FakePlanBuilder("11.4.0.106"))


def test_block_causal_build_switches_between_cache_modes(bundle_copy, tmp_path):
    root = tmp_path / "bundle"
    shutil.copytree(bundle_copy("block_causal").root, root)
    report = build_plans(root, BuildOptions(), builder=FakePlanBuilder(FAKE_VERSION))
    built = Bundle.open(root)
    manifest = built.manifest
    assert report.self_cache == "in_place" and manifest["tensorrt"]["step_graph"] == KV_GRAPH
    assert KV_GRAPH in manifest["plans"] and "generator_step" not in manifest["plans"]
    kv = manifest["graphs"][KV_GRAPH]
    L = manifest["schedule"]["total_tokens"]
    assert kv["file"] == f"{KV_GRAPH}.onnx" and f"{KV_GRAPH}.onnx" in manifest["files"]
    assert next(s for s in kv["inputs"] if s["name"] == "past_key_values.0.key")["shape"][2] == L
    assert {f["buffer"] for f in manifest["tensorrt"]["fills"]} == {"table.write_indices"}
    assert [f["value"] for f in manifest["tensorrt"]["fills"]] == manifest["schedule"]["offsets"][:-1]
    plan = binding_plan(built.spec, row_counts(built.spec), KV_GRAPH)
    assert plan == built.spec.tensorrt  # what the backend executes is what build recorded
    _check_plan(manifest, plan)
    step = plan.bindings[KV_GRAPH]
    assert step["present.0.value"].buffer == step["past_key_values.0.value"].buffer  # one buffer, in place
    report = build_plans(root, BuildOptions(), builder=FakePlanBuilder("10.14.1.48"))  # no TensorScatter
    manifest = Bundle.open(root).manifest
    assert report.self_cache == "ping_pong" and KV_GRAPH not in manifest["graphs"]
    assert not (root / f"{KV_GRAPH}.onnx").exists() and not (root / f"{KV_GRAPH}.plan").exists()
    with pytest.raises(BackendError):  # a failed in-place build leaves no derived graph behind
        build_plans(root, BuildOptions(), builder=FakePlanBuilder(FAKE_VERSION, fail_on="context"))
    assert not (root / f"{KV_GRAPH}.onnx").exists()
    build_plans(root, BuildOptions(), builder=FakePlanBuilder(FAKE_VERSION))
    with pytest.raises(BackendError):  # a failed ping-pong build keeps the in-place one the manifest lists
        build_plans(root, BuildOptions(), builder=FakePlanBuilder("10.14.1.48", fail_on="context"))
    assert Bundle.open(root).manifest["tensorrt"]["self_cache"] == "in_place"


# ---- the backend, on the double -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mode", "version", "context_map"),
    [
        ("scale_local", FAKE_VERSION, "training"),
        ("block_causal", FAKE_VERSION, "training"),
        ("block_causal", "10.14.1.48", "training"),
        ("block_causal", FAKE_VERSION, "reference-pipeline"),
    ],
    ids=["scale_local", "in_place", "ping_pong", "in_place-reference_map"],
)
def test_backend_decodes_like_onnxruntime(bundle_copy, tmp_path, mode, version, context_map):
    """Same tokens and images as the onnxruntime backend, through the binding plan; with fewer rows than
    built (1 scan x 2 samples of 2 x 2), guidance switched off mid-way, and replayed "graphs". Under the
    reference-pipeline map the step reads table.cross_segment as uploaded by the backend and the whole context."""
    root = tmp_path / "bundle"
    shutil.copytree(bundle_copy(mode, context_map).root, root)
    build_plans(root, BuildOptions(), builder=FakePlanBuilder(version))
    FakeTensorRT.__version__ = version
    try:
        memory = HostMemory()
        backend = fake_backend(Bundle.open(root), memory)
        reference = OnnxRuntimeBackend(root)
        voxels = torch.randn(2, 96, generator=torch.Generator().manual_seed(3))
        for sampling, n_scans, samples in ((SamplingConfig(seed=5), 2, 2), (SamplingConfig(seed=1, cfg_stop=2), 1, 2)):
            for _ in range(2):  # the second decode replays the captured runs
                got = reconstruct(backend, voxels[:n_scans], "subj01", sampling, samples=samples)
            ref = reconstruct(reference, voxels[:n_scans], "subj01", sampling, samples=samples)
            for a, b in zip(ref.tokens, got.tokens, strict=True):
                assert torch.equal(a, b)
            assert (ref.images_NS3HW - got.images_NS3HW).abs().max().item() < 1e-5
        assert memory.captures > 0 and memory.launches > memory.captures
        with pytest.raises(BackendError, match=r"plans were built for 2 .* --batch"):
            backend.encode(torch.zeros(3, 96), "subj01")
    finally:
        FakeTensorRT.__version__ = FAKE_VERSION


def test_backend_refuses_mismatching_plans(bundle_copy, tmp_path):
    root = tmp_path / "bundle"
    shutil.copytree(bundle_copy("scale_local").root, root)
    with pytest.raises(PlanMismatchError, match="no TensorRT plans"):
        fake_backend(Bundle.open(root))
    build_plans(root, BuildOptions(), builder=FakePlanBuilder("10.14.1.48"))
    with pytest.raises(PlanMismatchError, match=r"built with TensorRT 10\.14\.1\.48, this is TensorRT 10\.15"):
        fake_backend(Bundle.open(root))
    build_plans(root, BuildOptions(), builder=FakePlanBuilder(FAKE_VERSION))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["graphs"]["context"]["outputs"][0]["dtype"] = "float16"  # the engine says float32
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PlanMismatchError, match="rebuild"):
        fake_backend(Bundle.open(root, verify=False))


# ---- without TensorRT / a GPU ----------------------------------------------------------------------------
@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_cli_build_and_decode_without_tensorrt(cli, bundle_copy, tmp_path):
    root = bundle_copy("scale_local").root
    code, out, err = cli("build", "--engine", root)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "TensorRT is not installed" in err and "pip install tensorrt" in err
    np.save(tmp_path / "v.npy", np.zeros((1, 96), np.float32))
    code, _, err = cli(
        "decode", "--engine", root, "--backend", "tensorrt", "--fmri", tmp_path / "v.npy", "--subject", "subj01",
        "--out", tmp_path / "out",
    )  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "needs TensorRT" in err and "pip install" in err
    code, _, err = cli("build", "--engine", root, "--kv-cache", "sideways")
    assert code == 1 and "--kv-cache must be" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible here")
def test_torch_memory_without_a_gpu(bundle_copy):
    with pytest.raises(MissingDependencyError, match="needs a CUDA GPU"):
        TensorRTBackend(bundle_copy("scale_local").root, memory="torch", tensorrt=(FakeTensorRT, False))


# ---- with TensorRT and a GPU ------------------------------------------------------------------------------
needs_tensorrt_gpu = pytest.mark.skipif(
    not (HAS_TENSORRT and torch.cuda.is_available()), reason="needs TensorRT and a CUDA GPU"
)


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_tensorrt_gpu
@pytest.mark.parametrize("memory", ["torch", "cuda-python"])
@pytest.mark.parametrize("mode", MODES)
def test_tensorrt_plans_decode_like_onnxruntime(bundle_copy, tmp_path, mode, memory):
    """Real plans (fp32, TF32 allowed): per-scale logits in lockstep within 1e-2, and the full loop runs."""
    from mindhier_rt.sampling import cfg_combine, guidance_weight, sample_tokens

    root = tmp_path / "bundle"
    shutil.copytree(bundle_copy(mode).root, root)
    build_plans(root, BuildOptions(timing_cache=tmp_path / "timing.cache"))
    assert (tmp_path / "timing.cache").stat().st_size > 0
    backend = TensorRTBackend(root, memory=memory)
    reference = OnnxRuntimeBackend(root)
    K = backend.cfg.schedule.n_scales
    voxels = torch.randn(2, 96, generator=torch.Generator().manual_seed(0))
    sampling, rows = SamplingConfig(seed=5), torch.arange(4)
    states, f_hats, xs = [], [], [None, None]
    for be in (reference, backend):
        pooled, context = be.encode(voxels.to(be.device), "subj01")
        null_pooled, null_context = be.encode(torch.zeros(1, 96, device=be.device), "subj01")
        pooled, context = (
            torch.cat([pooled, null_pooled.expand(2, -1)]),
            torch.cat([context, null_context.expand(2, -1, -1)]),
        )
        states.append(be.prepare(pooled, context))
        f_hats.append(be.empty_fhat(2))
    for i in range(K):
        logits = [be.step(i, st, x).cpu() for be, st, x in zip((reference, backend), states, xs, strict=True)]
        ref, got = (cfg_combine(lg[:2], lg[2:], guidance_weight(sampling, i, K)) for lg in logits)
        assert ((ref - got).abs().max() / ref.abs().max()).item() < 1e-2
        idx = sample_tokens(ref, sampling, i, rows[:2], rows[:2] * 0)
        for j, be in enumerate((reference, backend)):
            f_hats[j], x = be.update(i, f_hats[j], idx.to(be.device))
            xs[j] = None if x is None else torch.cat([x, x])
    rec = reconstruct(backend, voxels, "subj01", sampling, samples=2)
    assert rec.images_NS3HW.shape[:2] == (2, 2) and torch.isfinite(rec.images_NS3HW).all()


# ---- the attention plugin (build --attention-plugin) ---------------------------------------------------
def _reference_evaluator_with_plugin():
    """onnx's reference evaluator with a NumPy implementation of the plugin node (the kernel's semantics)."""
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    class SingleRangeAttention(OpRun):
        op_domain = attention_plugin.PLUGIN_NAMESPACE

        def _run(self, q, k, v, scale=None, head_dim=None, plugin_namespace=None, plugin_version=None):
            s = (q.astype(np.float64) @ np.swapaxes(k, -1, -2).astype(np.float64)) * scale
            p = np.exp(s - s.max(-1, keepdims=True))
            return (((p / p.sum(-1, keepdims=True)) @ v.astype(np.float64)).astype(q.dtype),)

    SingleRangeAttention.__name__ = attention_plugin.PLUGIN_NAME
    return lambda path: ReferenceEvaluator(str(path), new_ops=[SingleRangeAttention])


@pytest.mark.parametrize(
    "mode, kv, context_map",
    [
        ("scale_local", None, "training"),
        ("block_causal", None, "training"),
        ("block_causal", "in_place", "training"),
        ("block_causal", None, "reference-pipeline"),
    ],
)
def test_attention_plugin_graph_computes_the_step(mode, kv, context_map, bundle_copy):
    """The rewritten step graph, with the plugin evaluated by its NumPy semantics, gives the exported step's
    logits (and caches); unmasked attentions become plugin nodes, the masked in-place self-attention and the
    per-token masked cross-attention (reference-pipeline map) stay."""
    import onnx
    import onnxruntime as ort

    bundle = bundle_copy(mode, context_map)
    masked_cross = context_map == "reference-pipeline"
    graph = STEP_GRAPH
    manifest = bundle.spec
    if kv == "in_place":
        manifest = with_graph(manifest, derive_kv_step_graph(bundle))
        graph = KV_GRAPH
    depth = bundle.cfg.generator.depth
    path = attention_plugin.derive_plugin_graph(bundle, manifest.graphs[graph], bundle.cfg.generator.head_dim)
    assert path.name == f"{graph}_attention_plugin.onnx"
    ops = Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
    assert ops[attention_plugin.PLUGIN_NAME] == (depth if kv == "in_place" or masked_cross else 2 * depth)
    assert ops["Softmax"] == (depth if kv == "in_place" or masked_cross else 0)

    rng = np.random.default_rng(0)
    scale = 2  # a scale with a past in block-causal mode
    spec = manifest.graphs[graph]
    symbols = graph_symbols(manifest, graph, scale, row_counts(manifest))
    feeds = {}
    for s in spec.inputs:
        shape = tensor_shape(s, symbols)
        if s.name == "write_indices":
            feeds[s.name] = np.full(shape, symbols.get("past", 5), np.int64)
        elif s.name == "cross.segment":  # the scale's two levels (tiny schedule, reference-pipeline map)
            offset = manifest.scales[scale].offset
            feeds[s.name] = np.load(bundle.path("cross_segment.npy"))[offset : offset + shape[0]]
            assert len(set(feeds[s.name].tolist())) == 2
        else:
            feeds[s.name] = rng.standard_normal(shape).astype(np.float32)
    want = ort.InferenceSession(str(bundle.path(spec.file)), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = _reference_evaluator_with_plugin()(path).run(None, feeds)
    for w, g in zip(want, got, strict=True):
        assert np.abs(w - g).max() <= 1e-4 * np.abs(w).max()
    path.unlink()
    bundle.path(f"{KV_GRAPH}.onnx").unlink(missing_ok=True)


def test_build_with_the_attention_plugin(bundle_copy, tmp_path):
    root = tmp_path / "bundle"
    shutil.copytree(bundle_copy("scale_local").root, root)
    build_plans(root, BuildOptions(attention_plugin=True), builder=FakePlanBuilder())
    manifest = Bundle.open(root).manifest
    step = manifest["plans"][STEP_GRAPH]
    assert step["onnx"] == "generator_step_attention_plugin.onnx" and step["attention"] == "plugin"
    assert step["onnx"] in manifest["files"]
    assert all(p["attention"] == "onnx" for g, p in manifest["plans"].items() if g != STEP_GRAPH)
    assert manifest["graphs"][STEP_GRAPH]["file"] == "generator_step.onnx"  # onnxruntime still runs the plain graph
    build_plans(root, BuildOptions(), builder=FakePlanBuilder())  # without the option the derived graph goes
    assert not (root / "generator_step_attention_plugin.onnx").exists()
    assert Bundle.open(root).manifest["plans"][STEP_GRAPH]["attention"] == "onnx"


def test_attention_plugin_needs_tensorrt_plugin_api(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorrt(name, *args, **kwargs):
        if name.startswith("tensorrt"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(attention_plugin, "_REGISTERED", False)
    monkeypatch.setattr(builtins, "__import__", no_tensorrt)
    with pytest.raises(BackendError, match=r"--attention-plugin needs TensorRT >= 10.8"):
        attention_plugin.register_plugin((9, 0))


def test_binding_plan_of_a_per_token_context_map(tiny_export, tmp_path):
    """reference-pipeline: every scale binds the whole context output in place and its rows of the int64 table
    cross_segment at an aligned offset of table.cross_segment; the uploaded image holds each scale's rows."""
    _, bundle = tiny_export("block_causal", "reference-pipeline")
    manifest = bundle.manifest
    plan = binding_plan(bundle.spec, row_counts(bundle.spec))
    _check_plan(manifest, plan)
    step = plan.bindings["generator_step"]
    key = step["cross.0.key"]
    assert set(key.buffer) == {"context.cross.0.key"} and set(key.offsets) == {0} and key.copy_from is None
    assert key.shapes[0][2] == manifest["schedule"]["context_length"]
    seg = step["cross.segment"]
    assert seg.dtype == "int64" and set(seg.buffer) == {"table.cross_segment"}
    assert list(seg.offsets) == [r[2] for r in plan.segment_layout]
    assert [r[:2] for r in plan.segment_layout] == [(s["offset"], s["tokens"]) for s in manifest["scales"]]
    # the table image as the TensorRT backend uploads it, read back per scale
    table = bundle.load_table("cross_segment").astype(np.int64)
    image = np.zeros(plan.buffers["table.cross_segment"], np.uint8)
    for first, count, offset in plan.segment_layout:
        image[offset : offset + count * 8] = table[first : first + count].view(np.uint8)
    sched = bundle.cfg.schedule
    for i in range(sched.n_scales):
        got = image[seg.offsets[i] : seg.offsets[i] + seg.nbytes(i)].view(np.int64)
        assert list(got) == list(sched.segment_of_token[sched.scale_slice(i)])
    (upload,) = [t for t in json.loads(json.dumps(plan.to_dict()))["tables"] if t["table"] == "cross_segment"]
    assert upload["layout"] == [list(r) for r in plan.segment_layout]


# ---- what the double refuses, as TensorRT does ------------------------------------------------------------
def _rewrite_plan(root, change) -> None:
    from mindhier_rt.bundle import write_manifest

    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest["tensorrt"])
    for key in ("format", "format_version", "files"):
        manifest.pop(key)
    write_manifest(root, manifest)


def test_double_refuses_shapes_outside_a_profile(bundle_copy, tmp_path):
    root = tmp_path / "bundle"
    shutil.copytree(bundle_copy("scale_local").root, root)
    build_plans(root, BuildOptions(), builder=FakePlanBuilder())
    backend = fake_backend(Bundle.open(root))
    encoder = backend.engines["encoder_subj01"]
    encoder.set_rows(0, "voxels", (1, 96))  # min 1 .. max 2 scans
    with pytest.raises(BackendError, match=r"does not admit voxels \(3, 96\)"):
        encoder.set_rows(0, "voxels", (3, 96))
    with pytest.raises(BackendError, match="does not admit"):
        backend.engines["context"].set_rows(0, "pooled", (7, 32))  # static profile: 8 rows only
    context = backend.engines[STEP_GRAPH].contexts[1]
    assert not context.set_input_shape("h", (8, 1, 64))  # scale 0's token count in scale 1's profile


def test_double_refuses_an_output_over_an_input_it_does_not_alias(bundle_copy, tmp_path):
    """A plan that binds update_0's f_hat_next over its f_hat (in place, without TensorRT aliasing them) is
    refused when it runs; the in-place cache, which the engine aliases, runs (test_backend_decodes_like_onnxruntime)."""
    root = tmp_path / "bundle"
    shutil.copytree(bundle_copy("scale_local").root, root)
    build_plans(root, BuildOptions(), builder=FakePlanBuilder())

    def in_place_update(plan: dict) -> None:
        bindings = {b["name"]: b for b in plan["bindings"]["update_0"]}
        bindings["f_hat_next"]["buffer"] = list(bindings["f_hat"]["buffer"])
        bindings["f_hat_next"]["offsets"] = list(bindings["f_hat"]["offsets"])

    _rewrite_plan(root, in_place_update)
    backend = fake_backend(Bundle.open(root))
    with pytest.raises(BackendError, match="output f_hat_next overlaps f_hat"):
        reconstruct(backend, torch.zeros(1, 96), "subj01", SamplingConfig(seed=1))


def _inflate_context_rows(plan: dict) -> None:
    """The context step's pooled input at 4,096 rows (the plan has 8), in a buffer grown to hold it."""
    pooled = next(b for b in plan["bindings"]["context"] if b["name"] == "pooled")
    pooled["shapes"][0][0] = 4096
    nbytes = 4 * pooled["shapes"][0][0] * pooled["shapes"][0][1]
    plan["buffers"][pooled["buffer"][0]] = -(-(pooled["offsets"][0] + nbytes) // 256) * 256


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t["bindings"]["context"][0]["offsets"].__setitem__(0, 1 << 20), "a place inside buffer"),
        (lambda t: t["bindings"]["context"][0]["offsets"].__setitem__(0, 8), "a multiple of 256"),
        (lambda t: t["bindings"]["context"][0]["buffer"].__setitem__(0, "nowhere"), "a buffer in tensorrt.buffers"),
        (lambda t: t["bindings"]["context"][0].__setitem__("name", "mystery"), "each input and output of graph"),
        (lambda t: t["buffers"].__setitem__("context.pooled", -1), "an integer >= 0"),
        (lambda t: t.__setitem__("plan_version", 1), "plan version 1 is not supported"),
        (lambda t: t["tables"][0]["layout"].append([0, 1 << 20, 0]), "a place inside buffer"),
        (lambda t: t["buffers"].__setitem__("context.pooled", 1 << 40), "the furthest byte its bindings"),
        (_inflate_context_rows, "shapes of pooled that fit"),
    ],
    ids=["offset", "alignment", "buffer", "tensor", "size", "version", "table", "unused bytes", "shape"],
)
def test_hostile_plans_are_refused_when_read(bundle_copy, tmp_path, change, message):
    from mindhier_rt.errors import BundleError

    root = tmp_path / "bundle"
    shutil.copytree(bundle_copy("scale_local").root, root)
    build_plans(root, BuildOptions(), builder=FakePlanBuilder())
    _rewrite_plan(root, change)
    with pytest.raises(BundleError, match=message):
        Bundle.open(root)
