"""Serving: request checks and grouping (no server), the model repository, and a real Triton Inference Server
(PyTriton's tritonserver, on the CPU, free ports on 127.0.0.1) decoding over HTTP and gRPC, streaming previews,
answering malformed requests on their own, exporting metrics, and finishing requests in flight on SIGTERM."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from mindhier_rt.errors import InputError
from mindhier_rt.pipeline import reconstruct
from mindhier_rt.runtime.onnxruntime_backend import OnnxRuntimeBackend
from mindhier_rt.sampling import SamplingConfig
from mindhier_rt.serve import service as sv
from mindhier_rt.serve.repository import MODEL, PROGRESSIVE_MODEL, RepositorySpec, model_config, write_repository

SETTINGS = SamplingConfig(cfg_scale=2.0, top_k=20, top_p=0.9, seed=3)


@pytest.fixture(scope="module")
def bundle(tiny_export):
    return tiny_export("scale_local")[1]


@pytest.fixture(scope="module")
def backend(bundle):
    return OnnxRuntimeBackend(bundle)


def request_inputs(voxels: np.ndarray, subject: str = "subj01", **settings) -> dict:
    n = voxels.shape[0]
    out = {"voxels": voxels.astype(np.float32), "subject": np.array([[subject.encode()]] * n, dtype=object)}
    for name, value in settings.items():
        out[name] = np.full((n, 1), value)
    return out


def voxels(n: int, seed: int = 0, count: int = 96) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, count)).astype(np.float32)


# ---- requests, without a server ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "inputs, message",
    [
        (request_inputs(voxels(1, count=95)), "expects 96 voxels"),
        (request_inputs(np.full((1, 96), np.nan, np.float32)), "NaN or inf"),
        (request_inputs(voxels(1), subject="subj09"), "unknown subject 'subj09'"),
        (request_inputs(voxels(1), samples=np.int32(17)), "1 to 16 per scan"),
        ({**request_inputs(voxels(1)), "voxels": voxels(1).astype(np.float64)}, "expected float32"),
        ({**request_inputs(voxels(1)), "colour": np.zeros((1, 1))}, "unknown inputs ['colour']"),
        (request_inputs(voxels(1), cfg=np.float32(np.inf)), "cfg_scale must be a finite float"),
        (request_inputs(voxels(1), top_p=np.float32(1.5)), "top_p"),
        ({"subject": request_inputs(voxels(1))["subject"]}, "voxels is required"),
    ],
    ids=["voxel count", "nan", "subject", "samples", "dtype", "unknown input", "cfg", "top_p", "no voxels"],
)
def test_malformed_requests_are_refused_with_a_reason(backend, inputs, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace("[", r"\[")):
        sv.parse_request(inputs, backend.cfg, SETTINGS, sv.Limits())


def test_a_setting_must_be_one_value_per_request(backend):
    inputs = request_inputs(voxels(2))
    inputs["seed"] = np.array([[1], [2]], dtype=np.uint64)
    with pytest.raises(InputError, match="one value per request"):
        sv.parse_request(inputs, backend.cfg, SETTINGS, sv.Limits())


def test_missing_settings_take_the_defaults_and_given_ones_override(backend):
    req = sv.parse_request(request_inputs(voxels(2)), backend.cfg, SETTINGS, sv.Limits())
    assert req.sampling == SETTINGS and req.samples == 1 and req.scan_ids.tolist() == [0, 1]
    req = sv.parse_request(
        request_inputs(voxels(1), seed=np.uint64(9), cfg_stop=np.int32(-1), greedy=True, scan_id=np.int64(7)),
        backend.cfg, SETTINGS, sv.Limits(),
    )  # fmt: skip
    assert req.sampling.seed == 9 and req.sampling.cfg_stop is None and req.sampling.greedy
    assert req.scan_ids.tolist() == [7]


def test_grouped_requests_decode_as_one_call_would(backend):
    """Tokens and images do not depend on how requests are grouped or chunked: three requests (one with other
    settings) against reconstruct over the same scans with the same scan ids."""
    v = voxels(4, seed=5)
    limits = sv.Limits(max_rows=2)  # forces chunks inside the group
    reqs = [
        sv.DecodeRequest(v[:2], "subj01", np.array([0, 1]), 1, SETTINGS),
        sv.DecodeRequest(v[2:3], "subj01", np.array([2]), 2, SETTINGS),  # another group: 2 samples
        sv.DecodeRequest(v[3:4], "subj01", np.array([3]), 1, SETTINGS),
    ]
    results = sv.decode_requests(backend, reqs, limits)
    ref = reconstruct(backend, torch.from_numpy(v[[0, 1, 3]]), "subj01", SETTINGS, scan_ids=torch.tensor([0, 1, 3]))
    ref_tokens = torch.cat(ref.tokens, -1).numpy()
    assert np.array_equal(results[0].tokens, ref_tokens[:2]) and np.array_equal(results[2].tokens, ref_tokens[2:])
    assert np.array_equal(results[0].images, sv.images_uint8(ref.images_NS3HW)[:2])
    assert results[1].images.shape[:2] == (1, 2) and results[1].tokens.shape[:2] == (1, 2)


def test_previews_reach_their_request_and_change_nothing(backend):
    v = voxels(2, seed=6)
    got: list[tuple[int, int, tuple]] = []
    req = sv.parse_request(
        {**request_inputs(v), "previews": np.array([[0, 2], [0, 2]], np.int32)}, backend.cfg, SETTINGS, sv.Limits(),
        progressive=True,
    )  # fmt: skip
    assert req.previews == (0, 2)
    (with_previews,) = sv.decode_requests(backend, [req], sv.Limits(), lambda i, s, im: got.append((i, s, im.shape)))
    (plain,) = sv.decode_requests(backend, [req], sv.Limits())
    assert [(i, s) for i, s, _ in got] == [(0, 0), (0, 2)] and got[0][2] == with_previews.images.shape
    assert np.array_equal(with_previews.images, plain.images) and np.array_equal(with_previews.tokens, plain.tokens)
    assert sv.default_previews(10) == [2, 4, 7] and sv.default_previews(4) == [0, 1, 2]


# ---- the repository ------------------------------------------------------------------------------------
def test_repository_configs(tmp_path, bundle):
    spec = RepositorySpec(engine=bundle.root, gpus=(0, 1), instances=2, max_batch=4, limits=sv.Limits(max_scans=4))
    repo = write_repository(spec, tmp_path / "repo", copy=True)
    text = (repo / MODEL / "config.pbtxt").read_text()
    assert 'backend: "python"' in text and "max_batch_size: 4" in text and "dynamic_batching" in text
    assert "kind: KIND_GPU" in text and "gpus: [ 0, 1 ]" in text and "count: 2" in text
    assert 'string_value: "mindhier/bundle"' in text and "optional: true" in text and "decoupled" not in text
    progressive = (repo / PROGRESSIVE_MODEL / "config.pbtxt").read_text()
    assert "decoupled: true" in progressive and 'name: "previews"' in progressive
    assert (repo / MODEL / "bundle" / "manifest.json").is_file()
    assert "TritonPythonModel" in (repo / MODEL / "1" / "model.py").read_text()
    defaults = json.loads(text.split('key: "sampling_defaults"')[1].split("string_value: ")[1].split(" }")[0])
    assert SamplingConfig.from_dict(json.loads(defaults)) == SamplingConfig.from_dict(bundle.manifest["sampling"])
    with pytest.raises(InputError, match="not an empty folder"):
        write_repository(spec, repo, copy=True)
    # only what the manifest lists is copied: an unlisted file or a link out of the bundle stays behind
    source = tmp_path / "source"
    shutil.copytree(bundle.root, source)
    (source / "notes.txt").write_text("not part of the bundle")
    (source / "leak").symlink_to("/etc/hostname")
    copied = write_repository(RepositorySpec(engine=source), tmp_path / "repo2", copy=True) / MODEL / "bundle"
    assert sorted(p.name for p in copied.iterdir()) == sorted([*bundle.spec.files, "manifest.json"])
    cpu = model_config(MODEL, RepositorySpec(engine=bundle.root), {"engine": "x"}, progressive=False)
    assert "kind: KIND_CPU" in cpu and "gpus" not in cpu


# ---- a real server -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    pytest.importorskip("pytriton")
    pytest.importorskip("tritonclient.grpc")
    from mindhier_rt.serve.server import running

    # the repository export-triton writes: the bundle copied inside it, referenced relatively
    repo = write_repository(RepositorySpec(engine=bundle.root, max_batch=8), tmp_path_factory.mktemp("r") / "r", True)
    with running(repo, exit_timeout_s=5) as srv:  # a client's idle keep-alive connection holds a stop that long
        yield srv


def test_http_client_writes_the_decode_command_s_files(server, bundle, cli, tmp_path):
    v = voxels(3, seed=2)
    v[1, 0] = np.nan  # skipped by both, with a warning
    np.save(tmp_path / "scans.npy", v)
    flags = ["--fmri", tmp_path / "scans.npy", "--subject", "subj01", "--seed", "3", "--cfg", "2", "--top-k", "20",
             "--top-p", "0.9", "--samples", "2"]  # fmt: skip
    code, _, _ = cli("decode", "--engine", bundle.root, "--out", tmp_path / "ref", *flags)
    assert code == 0
    code, out, err = cli("client", "--url", server.http_url, "--out", tmp_path / "got", *flags)
    assert code == 0 and "decoded 2 scans (1 skipped)" in out and "scan 1" in err
    ref, got = sorted((tmp_path / "ref").glob("*.png")), sorted((tmp_path / "got").glob("*.png"))
    assert [p.name for p in got] == [p.name for p in ref] and len(ref) == 4
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(ref, got, strict=True))
    ref_json, got_json = (json.loads((tmp_path / d / "decode.json").read_text()) for d in ("ref", "got"))
    for field in ("status", "sampling", "samples", "images", "skipped", "subject"):
        assert got_json[field] == ref_json[field], field


def test_grpc_stream_sends_previews_then_the_final_image(server, backend):
    from mindhier_rt.serve.client import RemoteDecoder, Settings

    v = voxels(1, seed=4)
    messages = list(RemoteDecoder(server.grpc_url, "grpc").stream(v, "subj01", 5, Settings(seed=3), previews=[0, 2]))
    assert [m[0] for m in messages] == [0, 2, 3]
    assert all(m[2].shape[-1] == 0 for m in messages[:2]) and messages[-1][2].shape[-1] == 30
    ref = reconstruct(backend, torch.from_numpy(v), "subj01", SamplingConfig.from_dict(
        {**backend.bundle.manifest["sampling"], "seed": 3}), scan_ids=torch.tensor([5]))  # fmt: skip
    assert np.array_equal(messages[-1][1], sv.images_uint8(ref.images_NS3HW))
    assert not np.array_equal(messages[0][1], messages[-1][1])  # a coarse preview, not the final image


def test_malformed_requests_fail_alone_while_others_are_served(server):
    """Good and bad requests sent together (the batcher joins them): each bad one gets its own error, the good
    ones their images; a wrong dtype is refused by Triton itself."""
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    def infer(arrays: dict) -> str:
        client = http.InferenceServerClient(server.http_url)
        try:
            inputs = []
            for name, a in arrays.items():
                dtype = {np.float32: "FP32", np.float64: "FP64", np.int32: "INT32", np.object_: "BYTES"}[a.dtype.type]
                t = http.InferInput(name, list(a.shape), dtype)
                t.set_data_from_numpy(a)
                inputs.append(t)
            return "ok" if client.infer(MODEL, inputs).as_numpy("images").size else "empty"
        except InferenceServerException as e:
            return e.message()
        finally:
            client.close()

    cases = {
        "good1": request_inputs(voxels(1, 1)),
        "count": request_inputs(voxels(1, count=90)),
        "nan": request_inputs(np.full((1, 96), np.nan, np.float32)),
        "subject": request_inputs(voxels(1), subject="nobody"),
        "samples": request_inputs(voxels(1), samples=np.int32(1000)),
        "dtype": {**request_inputs(voxels(1)), "voxels": voxels(1).astype(np.float64)},
        "good2": request_inputs(voxels(1, 2)),
    }
    answers: dict[str, str] = {}
    threads = [threading.Thread(target=lambda k=k, a=a: answers.__setitem__(k, infer(a))) for k, a in cases.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert answers["good1"] == "ok" and answers["good2"] == "ok", answers
    assert "expects 96 voxels" in answers["count"] and "NaN or inf" in answers["nan"]
    assert "unknown subject" in answers["subject"] and "1 to 16" in answers["samples"]
    assert "FP64" in answers["dtype"] or "data-type" in answers["dtype"], answers["dtype"]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.ports.metrics}/metrics", timeout=10).read().decode()
    success = [
        line for line in metrics.splitlines() if line.startswith('nv_inference_request_success{model="mindhier"')
    ]
    assert success and int(float(success[0].split()[-1])) >= 2
    assert "nv_inference_queue_duration_us" in metrics and "nv_inference_compute_infer_duration_us" in metrics


def test_a_client_leaving_mid_stream_leaves_the_server_serving(server):
    import queue

    import tritonclient.grpc as grpc

    from mindhier_rt.serve.client import Settings, _inputs

    client = grpc.InferenceServerClient(server.grpc_url)
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    inputs = _inputs(grpc, voxels(8), "subj01", np.arange(8), Settings(samples=2), previews=[0, 1, 2])
    client.async_stream_infer(PROGRESSIVE_MODEL, inputs)
    got.get(timeout=60)  # the first preview
    client.stop_stream(cancel_requests=True)
    client.close()
    from mindhier_rt.serve.client import RemoteDecoder

    images, tokens = RemoteDecoder(server.http_url).decode(voxels(2), "subj01", np.arange(2), Settings())
    assert images.shape[0] == 2 and tokens.shape[-1] == 30


def test_sigterm_finishes_the_requests_in_flight(bundle, tmp_path):
    pytest.importorskip("pytriton")
    import tritonclient.http as http

    from mindhier_rt.serve.client import RemoteDecoder, Settings
    from mindhier_rt.serve.server import Ports, start_server, wait_ready

    repo = write_repository(RepositorySpec(engine=bundle.root), tmp_path / "repo", copy=False)
    srv = start_server(repo, Ports.free(), tmp_path)
    wait_ready(srv, [MODEL, PROGRESSIVE_MODEL])
    result: dict = {}
    v = voxels(8, seed=9)

    def decode() -> None:  # the largest request the limits allow: 8 scans x 16 samples, about a second of work
        client = http.InferenceServerClient(srv.http_url, network_timeout=300.0)
        try:
            result["images"] = RemoteDecoder(srv.http_url).decode_one(client, v, "subj01", np.arange(8),
                                                                      Settings(samples=16))[0]  # fmt: skip
        except Exception as e:
            result["error"] = e
        finally:
            client.close()

    thread = threading.Thread(target=decode)
    try:
        thread.start()
        time.sleep(0.3)  # the request has reached the model
        assert thread.is_alive(), result
    finally:
        code = srv.stop()  # SIGTERM, then wait for the exit
        thread.join(120)
    assert code == 0 and "error" not in result, result
    assert result["images"].shape[:2] == (8, 16)  # answered, although SIGTERM came while it was being decoded
    assert "Signal (15) received" in srv.log_tail(400)


def test_serve_without_pytriton_says_how_to_install(monkeypatch, cli, bundle):
    import builtins

    real_import = builtins.__import__

    def no_pytriton(name, *args, **kwargs):
        if name == "pytriton" or name.startswith("pytriton."):
            raise ImportError("No module named 'pytriton'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pytriton)
    code, _, err = cli("serve", "--engine", bundle.root, "--http-port", "1")
    assert code == 2 and "pip install 'mindhier-rt[serve]'" in err


@pytest.mark.slow
def test_load_test_passes_on_the_tiny_bundle(bundle, tmp_path):
    """benchmarks/serve_load.py, bounded: every answer right, malformed requests refused, cut streams harmless,
    SIGTERM answered."""
    pytest.importorskip("pytriton")
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--engine", str(bundle.root), "--clients", "4", "--requests", "40", "--bad-every", "5", "--streams", "1",
            "--out", str(tmp_path / "load")]  # fmt: skip
    assert module.main(argv) == 0
    result = json.loads((tmp_path / "load.json").read_text())
    assert result["counts"]["ok"] == 32 and result["counts"]["bad_refused"] == 8


def test_client_errors_are_one_line(cli, tmp_path):
    """An unreachable server and a malformed --previews end in one error line, nothing written."""
    pytest.importorskip("tritonclient.http")
    from mindhier_rt.serve.server import free_port

    np.save(tmp_path / "scans.npy", voxels(1))
    common = ["--fmri", tmp_path / "scans.npy", "--subject", "subj01", "--out", tmp_path / "out"]
    code, _, err = cli("client", "--url", f"127.0.0.1:{free_port()}", *common)
    assert code == 1 and err.strip().startswith("error: cannot reach a server") and len(err.strip().splitlines()) == 1
    code, _, err = cli("client", "--url", "127.0.0.1:1", "--protocol", "grpc", "--previews", "a,b", *common)
    assert code == 1 and "--previews takes scale indices" in err
    assert not (tmp_path / "out").exists()


def test_serve_refuses_a_device_it_cannot_place_instances_on(cli, bundle):
    for device in ("gpu", "cuda:x"):
        code, _, err = cli("serve", "--engine", bundle.root, "--device", device)
        assert code == 1 and "--device takes cpu, cuda or cuda:N" in err
