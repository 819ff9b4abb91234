"""Decode through a running server with NVIDIA's ``tritonclient`` (HTTP or gRPC).

``RemoteDecoder.decode`` sends one request per scan, ``concurrency`` at a time, so that the server's dynamic
batcher can join them; every request carries its scan id, so the tokens (and images) are those ``decode`` makes
from the same file, seed and settings. ``RemoteDecoder.stream`` asks ``mindhier_progressive`` for previews over
one gRPC stream and yields (scale, images) as they arrive, the final image last.
"""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from mindhier_rt.errors import BackendError, InputError, MissingDependencyError
from mindhier_rt.sampling import SamplingConfig, with_overrides
from mindhier_rt.serve.repository import MODEL, PROGRESSIVE_MODEL
from mindhier_rt.serve.server import INSTALL_HINT

PROTOCOLS = ("http", "grpc")


@dataclass(frozen=True)
class Settings:
    """Per-request settings; None leaves the server's default (the bundle's recorded sampling settings)."""

    samples: int = 1
    seed: int | None = None
    cfg: float | None = None
    cfg_stop: int | None = None
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool | None = None


def _client_module(protocol: str):
    if protocol not in PROTOCOLS:
        raise InputError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    try:
        if protocol == "http":
            import tritonclient.http as module
        else:
            import tritonclient.grpc as module
    except ImportError as e:
        raise MissingDependencyError(f"the client needs tritonclient: {INSTALL_HINT} ({e})") from e
    return module


def _inputs(module, voxels_NV: np.ndarray, subject: str, scan_ids: np.ndarray, s: Settings, previews=None) -> list:
    n = voxels_NV.shape[0]
    arrays: dict[str, tuple[np.ndarray, str]] = {
        "voxels": (np.ascontiguousarray(voxels_NV, dtype=np.float32), "FP32"),
        "subject": (np.array([[subject.encode()]] * n, dtype=np.object_), "BYTES"),
        "scan_id": (scan_ids.astype(np.int64).reshape(n, 1), "INT64"),
        "samples": (np.full((n, 1), s.samples, np.int32), "INT32"),
    }
    for name, value, dtype, triton in (
        ("seed", s.seed, np.uint64, "UINT64"), ("cfg", s.cfg, np.float32, "FP32"),
        ("cfg_stop", s.cfg_stop, np.int32, "INT32"), ("top_k", s.top_k, np.int32, "INT32"),
        ("top_p", s.top_p, np.float32, "FP32"), ("greedy", s.greedy, np.bool_, "BOOL"),
    ):  # fmt: skip
        if value is not None:
            arrays[name] = (np.full((n, 1), value, dtype), triton)
    if previews is not None:
        arrays["previews"] = (np.tile(np.asarray(previews, np.int32), (n, 1)), "INT32")
    out = []
    for name, (array, dtype) in arrays.items():
        tensor = module.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        out.append(tensor)
    return out


class RemoteDecoder:
    def __init__(self, url: str, protocol: str = "http", concurrency: int = 4, timeout_s: float = 600.0) -> None:
        if concurrency < 1:
            raise InputError(f"concurrency must be >= 1, got {concurrency}")
        self.url, self.protocol, self.concurrency, self.timeout_s = url, protocol, concurrency, timeout_s
        self.module = _client_module(protocol)

    def _client(self):
        if self.protocol == "http":
            return self.module.InferenceServerClient(
                self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
            )
        return self.module.InferenceServerClient(self.url)

    def server_parameters(self) -> dict[str, str]:
        """The ``mindhier`` model's config parameters (what it serves, its limits, its sampling defaults)."""
        from tritonclient.utils import InferenceServerException

        try:
            client = self._client()
            try:
                config = client.get_model_config(MODEL)
            finally:
                client.close()
        except InferenceServerException as e:
            raise BackendError(f"no mindhier model at {self.url} ({self.protocol}): {e.message()}") from e
        except Exception as e:  # refused connection, bad address: the transports raise their own types
            raise BackendError(f"cannot reach a server at {self.url} ({self.protocol}): {type(e).__name__}: {e}") from e
        if not isinstance(config, dict):  # gRPC: a protobuf message
            from google.protobuf.json_format import MessageToDict

            config = MessageToDict(config.config, preserving_proto_field_name=True)
        return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}

    def sampling_used(self, s: Settings) -> dict:
        """The sampling settings a request with ``s`` is decoded with: ``s`` over the server's defaults."""
        defaults = SamplingConfig.from_dict(json.loads(self.server_parameters().get("sampling_defaults") or "{}"))
        sampling, _ = with_overrides(
            defaults, seed=s.seed, cfg_scale=s.cfg, cfg_stop=s.cfg_stop, top_k=s.top_k, top_p=s.top_p, greedy=s.greedy
        )
        return sampling.to_dict()

    def decode_one(self, client, voxels_NV: np.ndarray, subject: str, scan_ids: np.ndarray, s: Settings):
        """One request: (images uint8 [N, samples, H, W, 3], tokens int64 [N, samples, L])."""
        from tritonclient.utils import InferenceServerException

        try:
            result = client.infer(MODEL, _inputs(self.module, voxels_NV, subject, scan_ids, s))
        except InferenceServerException as e:
            raise BackendError(f"the server refused scans {scan_ids.tolist()}: {e.message()}") from e
        return result.as_numpy("images"), result.as_numpy("tokens")

    def decode(self, voxels_NV: np.ndarray, subject: str, scan_ids: np.ndarray, s: Settings):
        """Every scan as its own request, ``concurrency`` in flight; results in scan order."""
        clients = queue.Queue()
        for _ in range(self.concurrency):
            clients.put(self._client())

        def run(k: int):
            client = clients.get()
            try:
                return self.decode_one(client, voxels_NV[k : k + 1], subject, scan_ids[k : k + 1], s)
            finally:
                clients.put(client)

        try:
            with ThreadPoolExecutor(self.concurrency) as pool:
                parts = list(pool.map(run, range(len(voxels_NV))))
        finally:
            while not clients.empty():
                clients.get().close()
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def stream(
        self, voxels_1V: np.ndarray, subject: str, scan_id: int, s: Settings, previews: list[int] | None = None
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(scale, images uint8 [1, samples, H, W, 3], tokens) per message of ``mindhier_progressive`` (gRPC)."""
        if self.protocol != "grpc":
            raise InputError("progressive previews stream over gRPC: use --protocol grpc")
        client = self._client()
        results: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        try:
            inputs = _inputs(self.module, voxels_1V, subject, np.array([scan_id]), s, previews)
            client.async_stream_infer(PROGRESSIVE_MODEL, inputs, enable_empty_final_response=True)
            while True:
                result, error = results.get(timeout=self.timeout_s)
                if error is not None:
                    raise BackendError(f"the server refused scan {scan_id}: {error}")
                response = result.get_response()
                final = response.parameters.get("triton_final_response")
                if response.outputs:
                    yield int(result.as_numpy("scale")[0, 0]), result.as_numpy("images"), result.as_numpy("tokens")
                if final is not None and final.bool_param:
                    return
        finally:
            client.stop_stream(cancel_requests=True)
            client.close()
