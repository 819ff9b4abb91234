"""The C++ host in export/cpp: CMake build, its unit tests, its sampling against the Python reference, its
manifest checks on a real bundle, and its execution of the plan `mindhier-rt build` records, checked against the
Python loop: the host runs its whole decode loop on its pipe device, whose graph calls are run here with
onnxruntime (no planning here: the test only runs the graphs the host asks for, on the bytes it sends).

The TensorRT device is not compiled here (no TensorRT); it runs the same loop with engines instead of the pipe.
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
from fake_tensorrt import FAKE_VERSION, FakePlanBuilder

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


# ---- the recorded plan, executed by the host with onnxruntime behind its pipe device ---------------
ORT_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


def built(bundle: Path, folder: Path, scans: int, samples: int, version: str = FAKE_VERSION) -> Path:
    """A copy of the bundle with the plan `mindhier-rt build --batch scans --samples samples` records (the plan
    files are the TensorRT double's stand-ins: the host here runs the ONNX graphs behind its pipe device)."""
    from mindhier_rt.export.tensorrt_build import BuildOptions, build_plans

    shutil.copytree(bundle, folder)
    build_plans(folder, BuildOptions(scans=scans, samples=samples), builder=FakePlanBuilder(version))
    return folder


def _read_exact(f, n: int) -> bytes:
    data = f.read(n)
    assert len(data) == n, "the host closed the pipe mid-tensor"
    return data


def host_decode(host: Path, bundle: Path, voxels: np.ndarray, samples: int, sampling: SamplingConfig, tmp: Path):
    """``mindhier_host`` decoding through its pipe device: every graph call it makes (with the buffers, offsets
    and tables of the recorded plan) is run here with onnxruntime. Returns (tokens per scale [R, l], the
    decoder's float output [R, 3, H, W], the calls made, the host's stdout)."""
    import onnxruntime as ort

    manifest = json.loads((bundle / "manifest.json").read_text())
    np.save(tmp / "voxels.npy", voxels)
    req_r, req_w = os.pipe()
    resp_r, resp_w = os.pipe()
    args = ["--bundle", bundle, "--fmri", tmp / "voxels.npy", "--subject", "subj01", "--out", tmp / "img.ppm"]
    args += [
        "--samples",
        samples,
        "--seed",
        sampling.seed,
        "--cfg-scale",
        sampling.cfg_scale,
        "--top-k",
        sampling.top_k,
    ]
    args += ["--cfg-stop", "none" if sampling.cfg_stop is None else sampling.cfg_stop]
    args += ["--engine-pipe", f"{resp_r},{req_w}"]
    stdout = (tmp / "host.out").open("w+")
    proc = subprocess.Popen(
        [str(host / "mindhier_host"), *map(str, args)], stdout=stdout, stderr=subprocess.PIPE, pass_fds=(resp_r, req_w)
    )
    os.close(resp_r), os.close(req_w)
    sessions: dict[str, ort.InferenceSession] = {}
    calls, image = [], None
    with os.fdopen(req_r, "rb") as requests, os.fdopen(resp_w, "wb") as responses:
        while (line := requests.readline().decode()) and line != "done\n":
            _, graph, profile, n = line.split()
            feeds = {}
            for _ in range(int(n)):
                name, dtype, ndim, *dims = requests.readline().decode().split()
                shape = tuple(int(d) for d in dims)
                assert len(shape) == int(ndim)
                count = math.prod(shape)
                raw = _read_exact(requests, count * np.dtype(ORT_DTYPES[dtype]).itemsize)
                feeds[name] = np.frombuffer(raw, ORT_DTYPES[dtype], count).reshape(shape)
            if graph not in sessions:
                sessions[graph] = ort.InferenceSession(str(bundle / manifest["graphs"][graph]["file"]))
            session = sessions[graph]
            outs = session.run(None, feeds)
            calls.append((graph, int(profile)))
            responses.write(f"outputs {len(outs)}\n".encode())
            for spec, out in zip(session.get_outputs(), outs, strict=True):
                out = np.ascontiguousarray(out)
                dtype = {v: k for k, v in ORT_DTYPES.items()}[out.dtype.type]
                responses.write(f"{spec.name} {dtype} {out.ndim} {' '.join(map(str, out.shape))}\n".encode())
                responses.write(out.tobytes())
                if graph == "vq_decoder":
                    image = out.astype(np.float32)
            responses.flush()
    err = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 0, err
    stdout.seek(0)
    out = stdout.read()
    tokens = [
        torch.tensor([int(t) for t in line.split(":")[1].split()])
        for line in out.splitlines()
        if line.startswith("tokens ")
    ]
    return tokens, image, calls, out


def check_against_python(host, bundle, plans, scans, samples, sampling, tmp):
    """The host's decode on the recorded plan gives the Python loop's tokens and images."""
    from mindhier_rt.pipeline import reconstruct
    from mindhier_rt.runtime.onnxruntime_backend import OnnxRuntimeBackend

    voxels = np.random.default_rng(scans * 10 + samples).standard_normal((scans, 96)).astype(np.float32)
    tokens, image, calls, _ = host_decode(host, plans, voxels, samples, sampling, tmp)
    ref = reconstruct(OnnxRuntimeBackend(bundle), torch.from_numpy(voxels), "subj01", sampling, samples=samples)
    R = scans * samples
    for i, (got, want) in enumerate(zip(tokens, ref.tokens, strict=True)):
        assert torch.equal(got.reshape(R, -1), want.reshape(R, -1)), f"scale {i}"
    want_images = ref.images_NS3HW.reshape(R, *ref.images_NS3HW.shape[2:]).numpy()
    np.testing.assert_allclose(image[:R], want_images, atol=1e-4)  # rows past R: padding, computed and ignored
    return calls


def test_print_plan_is_the_recorded_plan(bundle, host, tmp_path):
    """One plan: what the host reads (and checks) is exactly what `build` recorded for the Python backend."""
    plans = built(bundle, tmp_path / "built", scans=2, samples=2)
    res = run_host(host, "--print-plan", plans)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == json.loads((plans / "manifest.json").read_text())["tensorrt"]
    res = run_host(host, "--check-bundle", plans)
    assert res.returncode == 0 and "ping_pong self cache" not in res.stdout and "in_place self cache" in res.stdout
    res = run_host(host, "--print-plan", bundle)  # an ONNX-only bundle has none
    assert res.returncode == 1 and "no TensorRT plans" in res.stderr


def test_padded_plan_matches_the_python_decode_loop(bundle, host, tmp_path):
    """Plans built for 2 scans x 2 samples, guided; a decode of 1 scan x 2 samples whose guidance stops at scale 2
    runs every call at the built rows, each step with the profile of its scale."""
    plans = built(bundle, tmp_path / "built", scans=2, samples=2)
    sampling = SamplingConfig(cfg_scale=4.0, cfg_stop=2, seed=9)
    calls = check_against_python(host, bundle, plans, 1, 2, sampling, tmp_path)
    steps = [p for g, p in calls if g.startswith("generator_step")]
    assert steps == [0, 1, 2, 3]
    assert [g for g, _ in calls].count("encoder_subj01") == 2  # the scan, and the all-zero scan
    voxels = np.zeros((3, 96), np.float32)
    np.save(tmp_path / "three.npy", voxels)
    res = run_host(host, "--bundle", plans, "--fmri", tmp_path / "three.npy", "--subject", "subj01", "--out",
                   tmp_path / "x.ppm", "--engine-pipe", "0,1")  # fmt: skip
    assert res.returncode == 1 and "the plans were built for 2 x 2" in res.stderr and "--batch" in res.stderr


@pytest.mark.parametrize(
    "scans, samples, sampling, version",
    [
        (2, 2, SamplingConfig(cfg_scale=4.0, cfg_stop=2, seed=3), FAKE_VERSION),  # guidance stops; in-place cache
        (1, 1, SamplingConfig(seed=5, top_k=10), "10.14.1.48"),  # guided throughout; ping-pong cache
        (2, 1, SamplingConfig(cfg_scale=0.0, seed=7), FAKE_VERSION),  # never guided
    ],
    ids=["cfg-stop", "guided-ping-pong", "unguided"],
)
def test_plan_matches_the_python_decode_loop(bundle, host, tmp_path, scans, samples, sampling, version):
    plans = built(bundle, tmp_path / "built", scans=scans, samples=samples, version=version)
    check_against_python(host, bundle, plans, scans, samples, sampling, tmp_path)


def test_copied_segments_match_the_python_decode_loop(bundle, host, tmp_path):
    """An input the plan copies into place before each run (``copy_from``: what `build` records for a context
    segment whose offset is not 256-byte aligned) is executed by the host and by the Python backend alike."""
    from fake_tensorrt import fake_backend

    from mindhier_rt.bundle import Bundle, write_manifest
    from mindhier_rt.pipeline import reconstruct

    plans = built(bundle, tmp_path / "built", scans=1, samples=1)
    manifest = json.loads((plans / "manifest.json").read_text())
    trt = manifest["tensorrt"]
    step = next(b for b in trt["bindings"][trt["step_graph"]] if b["name"] == "cross.1.value")
    size = max(math.prod(s) for s in step["shapes"]) * 4
    step["copy_from"] = [[b, o] for b, o in zip(step["buffer"], step["offsets"], strict=True)]
    step["buffer"], step["offsets"] = ["step.cross.1.value"] * len(step["shapes"]), [0] * len(step["shapes"])
    trt["buffers"]["step.cross.1.value"] = -(-size // 256) * 256
    for key in ("format", "format_version", "files"):
        manifest.pop(key)
    write_manifest(plans, manifest)
    sampling = SamplingConfig(seed=4)
    check_against_python(host, bundle, plans, 1, 1, sampling, tmp_path)
    voxels = torch.from_numpy(np.random.default_rng(11).standard_normal((1, 96)).astype(np.float32))
    from mindhier_rt.runtime.onnxruntime_backend import OnnxRuntimeBackend

    got = reconstruct(fake_backend(Bundle.open(plans)), voxels, "subj01", sampling)
    ref = reconstruct(OnnxRuntimeBackend(bundle), voxels, "subj01", sampling)
    assert all(torch.equal(a, b) for a, b in zip(got.tokens, ref.tokens, strict=True))


@pytest.fixture(scope="module")
def reference_map_bundle(build_started, tiny_export) -> Path:
    """The session's tiny block-causal bundle under the reference-pipeline context map (scales 2 and 3 read two
    levels each). Never altered here."""
    return tiny_export("block_causal", "reference-pipeline")[1].root


@pytest.mark.parametrize(
    "scans, samples, sampling",
    [(2, 2, SamplingConfig(cfg_scale=4.0, cfg_stop=2, seed=3)), (1, 1, SamplingConfig(seed=5))],
    ids=["cfg-stop", "guided"],
)
def test_reference_map_plan_matches_the_python_decode_loop(
    reference_map_bundle, host, tmp_path, scans, samples, sampling
):
    """The plan places cross.segment from the bundle's table and binds the whole context to every step; the host
    executing it gives the Python loop's tokens and images."""
    bundle = reference_map_bundle
    res = run_host(host, "--check-bundle", bundle, "--subject", "subj01")
    assert res.returncode == 0, res.stderr
    plans = built(bundle, tmp_path / "built", scans=scans, samples=samples)
    plan = json.loads((plans / "manifest.json").read_text())["tensorrt"]
    (segment,) = [t for t in plan["tables"] if t["table"] == "cross_segment"]
    offsets = json.loads((bundle / "manifest.json").read_text())["schedule"]["offsets"]
    assert [row[0] for row in segment["layout"]] == offsets[:-1]
    key = next(b for b in plan["bindings"][plan["step_graph"]] if b["name"] == "cross.0.key")
    assert set(key["offsets"]) == {0} and key["shapes"][0][2] == 2 * 5  # M * T: the whole context
    check_against_python(host, bundle, plans, scans, samples, sampling, tmp_path)


# ---- hostile plans: one clear line, never an out-of-bounds access ------------------------------------
def _hostile(plans: Path, folder: Path, change) -> Path:
    from mindhier_rt.bundle import write_manifest

    shutil.copytree(plans, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest["tensorrt"])
    for key in ("format", "format_version", "files"):
        manifest.pop(key)
    write_manifest(folder, manifest)
    return folder


def _first(plan: dict, graph: str = "context") -> dict:
    return plan["bindings"][graph][0]


def _inflate_first_shape(plan: dict) -> None:
    """The first binding's leading size far past the plan's rows, with its buffer grown to hold it."""
    b = _first(plan)
    b["shapes"][0][0] = 1 << 16
    nbytes = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8}[b["dtype"]] * math.prod(b["shapes"][0])
    plan["buffers"][b["buffer"][0]] = -(-(b["offsets"][0] + nbytes) // 256) * 256


HOSTILE = {
    "buffer larger than its use": (
        lambda t: t["buffers"].__setitem__("context.pooled", 1 << 40),
        "its bindings, tables and fills use",
    ),
    "shape past the rows": (_inflate_first_shape, "does not fit the graph's"),
    "offset past the buffer": (lambda t: _first(t)["offsets"].__setitem__(0, 1 << 20), "do not fit in buffer"),
    "misaligned offset": (lambda t: _first(t)["offsets"].__setitem__(0, 8), "not a multiple of 256"),
    "unknown buffer": (lambda t: _first(t)["buffer"].__setitem__(0, "nowhere"), 'no buffer "nowhere"'),
    "huge shape": (lambda t: _first(t)["shapes"].__setitem__(0, [1 << 30, 1 << 30, 1 << 30]), "larger than 2^48"),
    "negative size": (lambda t: t["buffers"].__setitem__("context.pooled", -1), "expected a buffer size"),
    "profile count": (lambda t: _first(t)["shapes"].append([1]), "one entry per profile"),
    "copy source past the buffer": (
        lambda t: _first(t).__setitem__("copy_from", [["context.pooled", 1 << 40]]),
        "do not fit in buffer",
    ),
    "fill past the buffer": (
        lambda t: t["fills"].append(
            {"buffer": "context.pooled", "offset": 0, "value": 1, "count": 1 << 30, "dtype": "int64"}
        ),
        "do not fit in buffer",
    ),
    "table rows past the buffer": (lambda t: t["tables"][0]["layout"].append([0, 1 << 20, 0]), "do not fit in buffer"),
    "unknown tensor": (lambda t: _first(t).__setitem__("name", "mystery"), "not the graph's inputs and outputs"),
    "old plan version": (lambda t: t.pop("plan_version"), "TensorRT plan version (none) is not supported"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_plans_fail_in_one_line(bundle, host, tmp_path, case):
    from mindhier_rt.bundle import Bundle
    from mindhier_rt.errors import BundleError

    plans = built(bundle, tmp_path / "built", scans=1, samples=1)
    change, message = HOSTILE[case]
    bad = _hostile(plans, tmp_path / "bad", change)
    for mode in ("--print-plan", "--check-bundle"):
        res = run_host(host, mode, bad)
        assert res.returncode == 1 and res.stderr.strip().count("\n") == 0, res.stderr
        assert message in res.stderr, res.stderr
    with pytest.raises(BundleError):  # the Python reader refuses the same plan
        Bundle.open(bad)


def test_tensor_names_agree_between_python_and_cpp():
    """mindhier_rt/bundle/tensor_names.py and export/cpp/tensor_names.hpp name the same tensors."""
    import re

    from mindhier_rt.bundle import tensor_names

    header = (CPP / "tensor_names.hpp").read_text()
    cpp = dict(re.findall(r'constexpr const char\* k(\w+) = "([^"]*)";', header))
    python = {k: v for k, v in vars(tensor_names).items() if k.isupper() and isinstance(v, str)}
    assert cpp, "no names in tensor_names.hpp"
    for name, value in cpp.items():
        snake = re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()
        assert python.get(snake) == value, (name, value, python.get(snake))


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
