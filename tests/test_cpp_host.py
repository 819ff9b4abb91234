"""The C++ host in export/cpp: CMake build, its unit tests, its sampling against the Python reference, its
manifest checks on a real bundle, and its decode plan executed with onnxruntime against the Python loop.

The TensorRT runner is not compiled here (no TensorRT); it only executes the plan checked below.
"""

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from mindhier_rt.sampling import SamplingConfig, cfg_combine, guidance_weight, sample_tokens

CPP = Path(__file__).resolve().parents[1] / "export" / "cpp"


def _toolchain_missing() -> str | None:
    if shutil.which("cmake") is None:
        return "cmake is not installed"
    if not any(shutil.which(cxx) for cxx in ("c++", "g++", "clang++")):
        return "no C++ compiler (c++, g++ or clang++) is installed"
    return None


pytestmark = pytest.mark.skipif(_toolchain_missing() is not None, reason=f"C++ host: {_toolchain_missing()}")


@pytest.fixture(scope="module")
def build_started(tmp_path_factory):
    """Configure and build export/cpp (Release, 2 jobs) in the background, so the bundle export overlaps it."""
    out = tmp_path_factory.mktemp("cpp_build")
    script = f"cmake -S '{CPP}' -B '{out}' -DCMAKE_BUILD_TYPE=Release && cmake --build '{out}' -j 2"
    log = (out / "build.log").open("w")
    proc = subprocess.Popen(["sh", "-c", script], stdout=log, stderr=subprocess.STDOUT)
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def host(build_started) -> Path:
    """The build folder, once the build finished."""
    proc, out = build_started
    if proc.wait(timeout=600) != 0:
        pytest.fail("building export/cpp failed:\n" + (out / "build.log").read_text()[-4000:])
    return out


@pytest.fixture(scope="module")
def bundle(build_started, tiny_export) -> Path:
    """The session's tiny block-causal bundle (past/present caches exercise the most of the plan).

    Its head is scaled up for peaked next-token distributions (conftest): the plan runs the encoder on a
    different batch than the Python loop, and flat distributions would let last-bit differences flip tokens.
    Shared with other test files: never altered here (tests copy it first).
    """
    return tiny_export("block_causal")[1].root


def run_host(host: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(host / "mindhier_host"), *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


# ---- the bundle ------------------------------------------------------------------------------------
def test_check_bundle_parses_verifies_and_prints_the_schedule(bundle, host):
    res = run_host(host, "--check-bundle", bundle, "--subject", "subj01")
    assert res.returncode == 0, res.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert f"{len(manifest['files'])} files verified" in res.stdout
    sched = manifest["schedule"]
    assert f"offsets {sched['offsets']}" in res.stdout
    assert f"segment_of_scale {sched['segment_of_scale']}" in res.stdout
    assert "subj01 (96 voxels)" in res.stdout


def test_unit_tests_pass(host):
    res = subprocess.run(
        [str(host / "host_tests"), str(CPP / "tests" / "fixtures")], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert " 0 failures" in res.stdout


def test_altered_file_and_other_version_fail_in_one_line(bundle, host, tmp_path):
    altered = tmp_path / "altered"
    shutil.copytree(bundle, altered)
    data = bytearray((altered / "rope_cos.npy").read_bytes())
    data[-1] ^= 1
    (altered / "rope_cos.npy").write_bytes(bytes(data))
    res = run_host(host, "--check-bundle", altered)
    assert res.returncode != 0
    assert res.stderr.strip().count("\n") == 0
    assert "file rope_cos.npy was altered (checksum mismatch)" in res.stderr

    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["format_version"] = 4
    (other / "manifest.json").write_text(json.dumps(manifest))
    res = run_host(host, "--check-bundle", other)
    assert res.returncode != 0
    assert res.stderr.strip().count("\n") == 0
    assert "bundle format version 4 is not supported (this host reads version 3)" in res.stderr


def test_decode_without_tensorrt_says_so(bundle, host, tmp_path):
    voxels = tmp_path / "v.npy"
    np.save(voxels, np.zeros((1, 96), np.float32))
    res = run_host(host, "--bundle", bundle, "--fmri", voxels, "--subject", "subj01", "--out", tmp_path / "o.ppm")
    assert res.returncode != 0 and res.stderr.strip().count("\n") == 0
    # an ONNX-only bundle has no plans; a TensorRT build says that, a CPU build says it has no runner
    assert "without TensorRT" in res.stderr or "no TensorRT plan" in res.stderr


# ---- the decode plan, executed with onnxruntime ----------------------------------------------------
def execute_plan(plan: dict, bundle: Path, voxels_NV: np.ndarray, sampling: SamplingConfig):
    """Run the C++ host's plan as its TensorRT runner does (same buffers, offsets, copies, host steps), with
    onnxruntime sessions instead of engines. Returns tokens per scale [R, l] and images [R, 3, H, W]."""
    import onnxruntime as ort

    manifest = json.loads((bundle / "manifest.json").read_text())
    sessions: dict[str, ort.InferenceSession] = {}
    bufs = {n: np.zeros(b["elements"], np.dtype(b["dtype"])) for n, b in plan["buffers"].items()}
    for name, file in plan["tables"].items():
        table = np.load(bundle / file).ravel()
        bufs[name][: table.size] = table
    for name, values in plan["int_tables"].items():
        bufs[name][: len(values)] = values
    R = plan["cond_rows"]
    bufs["voxels"][: voxels_NV.size] = voxels_NV.ravel()  # padded rows and voxels.null stay zero

    def view(b: dict) -> np.ndarray:
        return bufs[b["buffer"]][b["offset"] : b["offset"] + math.prod(b["shape"])].reshape(b["shape"])

    def copy(c: dict) -> None:
        w = c["width"]
        for k in range(c["height"]):
            s, d = c["src_offset"] + k * c["src_pitch"], c["dst_offset"] + k * c["dst_pitch"]
            bufs[c["dst"]][d : d + w] = bufs[c["src"]][s : s + w]

    def call(c: dict) -> None:
        for stage in c["stage"]:
            copy(stage)
        if c["graph"] not in sessions:
            sessions[c["graph"]] = ort.InferenceSession(str(bundle / manifest["graphs"][c["graph"]]["file"]))
        feeds = {b["tensor"]: view(b) for b in c["inputs"]}
        outs = sessions[c["graph"]].run([b["tensor"] for b in c["outputs"]], feeds)
        for b, out in zip(c["outputs"], outs, strict=True):
            assert out.shape == tuple(b["shape"]), (c["graph"], b["tensor"])
            view(b)[...] = out

    call(plan["encoder"])
    if plan["encoder_null"] is not None:
        call(plan["encoder_null"])
    call(plan["context"])
    tokens = []
    for st in plan["scales"]:
        assert st["weight"] == guidance_weight(sampling, st["scale"], len(plan["scales"]))
        for c in st["before"]:
            copy(c)
        call(st["step"])
        logits = torch.from_numpy(view(st["step"]["outputs"][0])[: st["rows"]].copy())  # padded rows dropped
        if st["guided"]:
            logits = cfg_combine(logits[:R], logits[R:], st["weight"])
        idx = sample_tokens(logits, sampling, st["scale"], plan["row_scan"], plan["row_sample"])
        idx_view = view(next(b for b in st["update"]["inputs"] if b["tensor"] == "idx"))
        idx_view[...] = 0
        idx_view[:R] = idx.numpy()
        call(st["update"])
        for c in st["after"]:
            copy(c)
        tokens.append(idx)
    call(plan["decoder"])
    return tokens, view(plan["decoder"]["outputs"][0])[:R].copy()


def with_plans(bundle: Path, folder: Path, scans: int, samples: int) -> Path:
    """A copy of the bundle with a `plans` section as `mindhier-rt build` writes it for scans x samples with
    guidance (the plan files are stand-ins: only the profiles matter to the host's planning)."""
    from mindhier_rt.bundle import write_manifest

    shutil.copytree(bundle, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for key in ("format", "format_version", "files"):
        manifest.pop(key)
    rows = {"encoder": scans, "context": 2 * scans * samples, "update": scans * samples, "vq": scans * samples}
    manifest["plans"] = {}
    for graph, entry in manifest["graphs"].items():
        role = graph.split("_")[0]
        profiles = []
        for scale in manifest["scales"] if role == "generator" else [None]:
            sym = {"rows": rows.get(role, 2 * scans * samples)}
            if scale is not None:
                sym |= {"tokens": scale["tokens"], "past": scale["past"]}
            profile = {}
            for spec in entry["inputs"]:
                full = [d if isinstance(d, int) else sym[d] for d in spec["shape"]]
                low = [1 if d == "rows" and role == "encoder" else n for d, n in zip(spec["shape"], full, strict=True)]
                profile[spec["name"]] = {"min": low, "opt": full, "max": full}
            profiles.append(profile)
        (folder / f"{graph}.plan").write_bytes(b"stand-in")
        manifest["plans"][graph] = {"file": f"{graph}.plan", "profiles": profiles}
    write_manifest(folder, manifest)
    return folder


def test_padded_plan_matches_the_python_decode_loop(bundle, host, tmp_path):
    """Plans built for 2 scans x 2 samples, guided; a decode of 1 scan x 2 samples whose guidance stops at
    scale 2 pads the context step, every generator step, the updates and the decoder up to the built rows."""
    from mindhier_rt.pipeline import reconstruct
    from mindhier_rt.runtime.onnxruntime_backend import OnnxRuntimeBackend

    built = with_plans(bundle, tmp_path / "built", scans=2, samples=2)
    sampling = SamplingConfig(cfg_scale=4.0, cfg_stop=2, seed=9)
    res = run_host(
        host, "--print-plan", built, "--scans", 1, "--samples", 2, "--cfg-scale", 4, "--cfg-stop", 2, "--seed", 9
    )
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert plan["context"]["rows"] == 8 and plan["decoder"]["rows"] == 4
    assert [st["step"]["rows"] for st in plan["scales"]] == [8, 8, 8, 8]
    assert [st["rows"] for st in plan["scales"]] == [4, 4, 2, 2]
    assert [st["step"]["profile"] for st in plan["scales"]] == [0, 1, 2, 3]
    voxels = np.random.default_rng(1).standard_normal((1, 96)).astype(np.float32)
    tokens, images = execute_plan(plan, built, voxels, sampling)
    ref = reconstruct(OnnxRuntimeBackend(bundle), torch.from_numpy(voxels), "subj01", sampling, samples=2)
    for i, (got, want) in enumerate(zip(tokens, ref.tokens, strict=True)):
        assert torch.equal(got, want.reshape(2, -1)), f"scale {i}"
    np.testing.assert_allclose(images, ref.images_NS3HW.reshape(2, *images.shape[1:]).numpy(), atol=1e-4)

    res = run_host(host, "--print-plan", built, "--scans", 3)
    assert res.returncode == 1 and "was built for 1..2 rows, this decode needs 3" in res.stderr


@pytest.mark.parametrize(
    "scans, samples, sampling, align",
    [
        (2, 2, SamplingConfig(cfg_scale=4.0, cfg_stop=2, seed=3), 256),  # guidance stops: row compaction
        (1, 1, SamplingConfig(seed=5, top_k=10), 1024),  # guided throughout; misaligned segments are staged
        (2, 1, SamplingConfig(cfg_scale=0.0, seed=7), 256),  # never guided: one batch size
    ],
    ids=["cfg-stop", "guided-staged", "unguided"],
)
def test_plan_matches_the_python_decode_loop(bundle, host, scans, samples, sampling, align):
    from mindhier_rt.pipeline import reconstruct
    from mindhier_rt.runtime.onnxruntime_backend import OnnxRuntimeBackend

    args = ["--print-plan", bundle, "--subject", "subj01", "--scans", scans, "--samples", samples]
    args += ["--seed", sampling.seed, "--cfg-scale", sampling.cfg_scale, "--top-k", sampling.top_k]
    args += ["--cfg-stop", "none" if sampling.cfg_stop is None else sampling.cfg_stop, "--align", align]
    res = run_host(host, *args)
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    if align == 1024:
        assert any(c["src"].startswith("cross.") for st in plan["scales"] for c in st["step"]["stage"])
    voxels = np.random.default_rng(0).standard_normal((scans, 96)).astype(np.float32)
    tokens, images = execute_plan(plan, bundle, voxels, sampling)

    ref = reconstruct(OnnxRuntimeBackend(bundle), torch.from_numpy(voxels), "subj01", sampling, samples=samples)
    for i, (got, want) in enumerate(zip(tokens, ref.tokens, strict=True)):
        assert torch.equal(got, want.reshape(scans * samples, -1)), f"scale {i}"
    want_images = ref.images_NS3HW.reshape(scans * samples, *images.shape[1:]).numpy()
    np.testing.assert_allclose(images, want_images, atol=1e-4)


@pytest.fixture(scope="module")
def reference_map_bundle(build_started, tiny_export) -> Path:
    """The session's tiny block-causal bundle under the reference-pipeline context map (scales 2 and 3 read two
    levels each). Never altered here."""
    return tiny_export("block_causal", "reference-pipeline")[1].root


@pytest.mark.parametrize(
    "scans, samples, sampling, align",
    [(2, 2, SamplingConfig(cfg_scale=4.0, cfg_stop=2, seed=3), 256), (1, 1, SamplingConfig(seed=5), 1024)],
    ids=["cfg-stop", "guided-staged"],
)
def test_reference_map_plan_matches_the_python_decode_loop(reference_map_bundle, host, scans, samples, sampling, align):
    """The host feeds cross.segment from the bundle's table and the whole context to every step; its plan,
    executed with onnxruntime, gives the Python loop's tokens and images."""
    from mindhier_rt.pipeline import reconstruct
    from mindhier_rt.runtime.onnxruntime_backend import OnnxRuntimeBackend

    bundle = reference_map_bundle
    res = run_host(host, "--check-bundle", bundle, "--subject", "subj01")
    assert res.returncode == 0, res.stderr
    args = ["--print-plan", bundle, "--subject", "subj01", "--scans", scans, "--samples", samples]
    args += ["--seed", sampling.seed, "--cfg-scale", sampling.cfg_scale, "--top-k", sampling.top_k]
    args += ["--cfg-stop", "none" if sampling.cfg_stop is None else sampling.cfg_stop, "--align", align]
    res = run_host(host, *args)
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert plan["tables"]["cross.segment"] == "cross_segment.npy"
    offsets = json.loads((bundle / "manifest.json").read_text())["schedule"]["offsets"]
    for st in plan["scales"]:
        seg = next(b for b in st["step"]["inputs"] if b["tensor"] == "cross.segment")
        assert seg["shape"] == [st["tokens"]]
        staged = [c for c in st["step"]["stage"] if c["src"] == "cross.segment"]
        assert (staged[0]["src_offset"] if staged else seg["offset"]) == offsets[st["scale"]]
        key = next(b for b in st["step"]["inputs"] if b["tensor"] == "cross.0.key")
        assert key["buffer"] == "cross.0.key" and key["offset"] == 0 and key["shape"][2] == 2 * 5  # M * T
    voxels = np.random.default_rng(2).standard_normal((scans, 96)).astype(np.float32)
    tokens, images = execute_plan(plan, bundle, voxels, sampling)
    ref = reconstruct(OnnxRuntimeBackend(bundle), torch.from_numpy(voxels), "subj01", sampling, samples=samples)
    for i, (got, want) in enumerate(zip(tokens, ref.tokens, strict=True)):
        assert torch.equal(got, want.reshape(scans * samples, -1)), f"scale {i}"
    want_images = ref.images_NS3HW.reshape(scans * samples, *images.shape[1:]).numpy()
    np.testing.assert_allclose(images, want_images, atol=1e-4)


# ---- sampling against the Python reference ---------------------------------------------------------
@pytest.fixture(scope="module")
def fixed_logits(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """[N=3, l=9, V=40] float32 logits with many exact ties (multiples of 0.5) and some -inf entries."""
    rng = np.random.default_rng(1)
    x = (np.round(rng.standard_normal((3, 9, 40)) * 2) / 2).astype(np.float32)
    x[rng.random(x.shape) < 0.2] = -np.inf
    x[..., 7] = 3.5  # every position keeps a finite, often tied, maximum
    x[..., 12] = 3.5
    path = tmp_path_factory.mktemp("logits") / "logits.npy"
    np.save(path, x)
    return path, x


def tokens_of(res: subprocess.CompletedProcess) -> torch.Tensor:
    assert res.returncode == 0, res.stderr
    return torch.tensor([[int(t) for t in line.split()] for line in res.stdout.strip().splitlines()])


SAMPLING_CASES = [
    SamplingConfig(),  # defaults: top_k 400 (> V), top_p 0.95
    SamplingConfig(top_k=5, top_p=1.0, seed=11),
    SamplingConfig(top_k=0, top_p=0.3, seed=12),
    SamplingConfig(top_k=3, top_p=0.6, seed=2**64 - 1),
    SamplingConfig(greedy=True),
]


@pytest.mark.parametrize("scfg", SAMPLING_CASES, ids=lambda s: f"k{s.top_k}-p{s.top_p}-g{int(s.greedy)}-s{s.seed}")
def test_sampling_matches_python(host, fixed_logits, scfg):
    path, x = fixed_logits
    scans, samples = [5, 6, 2**32 - 1], [0, 3, 1]
    args = ["--check-sampling", path, "--scale", 2, "--scan-ids", ",".join(map(str, scans))]
    args += ["--sample-ids", ",".join(map(str, samples)), "--seed", scfg.seed, "--top-k", scfg.top_k]
    args += ["--top-p", repr(scfg.top_p)] + (["--greedy"] if scfg.greedy else [])
    got = tokens_of(run_host(host, *args))
    want = sample_tokens(torch.from_numpy(x), scfg, 2, scans, samples)
    assert torch.equal(got, want)


@pytest.mark.parametrize("scale, cfg_stop", [(4, None), (0, None), (6, 6)])
def test_guided_sampling_matches_python(host, tmp_path, scale, cfg_stop):
    rng = np.random.default_rng(scale)
    both = rng.standard_normal((4, 5, 30)).astype(np.float32)  # [cond rows 0..1, uncond rows 2..3]
    path = tmp_path / "guided.npy"
    np.save(path, both)
    scfg = SamplingConfig(cfg_scale=3.0, cfg_stop=cfg_stop, top_k=8, top_p=0.9, seed=21)
    args = ["--check-sampling", path, "--scale", scale, "--n-scales", 10, "--cfg-scale", "3.0"]
    args += ["--cfg-stop", "none" if cfg_stop is None else cfg_stop, "--top-k", 8, "--top-p", "0.9", "--seed", 21]
    got = tokens_of(run_host(host, *args))
    cond, uncond = torch.from_numpy(both[:2]), torch.from_numpy(both[2:])
    combined = cfg_combine(cond, uncond, guidance_weight(scfg, scale, 10))
    assert torch.equal(got, sample_tokens(combined, scfg, scale, [0, 1], [0, 0]))


def test_bad_logits_and_arguments_fail_in_one_line(host, tmp_path):
    bad = tmp_path / "nan.npy"
    np.save(bad, np.full((1, 2, 4), np.nan, np.float32))
    res = run_host(host, "--check-sampling", bad)
    assert res.returncode == 1 and "NaN or +inf" in res.stderr and res.stderr.strip().count("\n") == 0
    res = run_host(host, "--check-sampling", bad, "--top-p", "0")
    assert res.returncode == 1 and "top_p" in res.stderr
    res = run_host(host, "--bogus")
    assert res.returncode == 2 and "unknown argument --bogus" in res.stderr
    wrong = tmp_path / "i.npy"
    np.save(wrong, np.zeros((1, 2, 4), np.int64))
    res = run_host(host, "--check-sampling", wrong)
    assert res.returncode == 1 and "expected a float32 array with 3 dimensions" in res.stderr


def test_cpu_build_skips_the_runner_clearly(host):
    log = (host / "build.log").read_text()
    if os.environ.get("TENSORRT_ROOT") is None and "TensorRT runner enabled" not in log:
        assert "TensorRT runner SKIPPED" in log
    res = run_host(host, "--help")
    assert res.returncode == 0 and "TensorRT runner:" in res.stdout
