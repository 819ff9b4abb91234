"""The Triton Inference Server model: the decode loop as a Python-backend model (``TritonPythonModel``).

A model repository written by ``mindhier_rt.serve.repository`` holds two models whose ``model.py`` is one line
importing this class: ``mindhier`` (one response per request; Triton's dynamic batcher hands ``execute`` several
requests, decoded together where their settings agree) and ``mindhier_progressive`` (decoupled: per request a
response with the image decoded from the prediction so far after each scale the request names, then the final
image). What a model serves is in its ``config.pbtxt`` parameters: ``ckpt`` or ``engine`` (a path, relative to
the repository or absolute), ``backend`` (torch, torch-fast, onnxruntime, tensorrt) and the request ``Limits``.
A model instance of kind GPU runs on ``cuda:<its device id>``.

Every request is answered on its own: a malformed one (wrong voxel count, NaN, unknown subject, too many samples)
gets an error response naming the problem and the other requests of its batch are decoded. A progressive request
whose client went away (``is_cancelled``) stops getting previews and ends with its next message.

Imported inside Triton's Python-backend stub, where ``triton_python_backend_utils`` exists; nothing here runs
outside a server (``service`` holds the logic that tests call directly).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def _parameters(model_config: dict[str, Any]) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


def _resolve(path: str, repository: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else (repository / p).resolve()


class TritonPythonModel:
    """Triton's Python-backend entry points: ``initialize``, ``execute``, ``finalize``."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        from mindhier_rt.runtime.open import open_backend
        from mindhier_rt.sampling import SamplingConfig
        from mindhier_rt.serve.service import Limits

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = _parameters(config)
        repository = Path(args["model_repository"]).parent  # the model's folder -> the repository
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args.get('model_instance_device_id', '0')}"
        ckpt = _resolve(params["ckpt"], repository) if params.get("ckpt") else None
        engine = _resolve(params["engine"], repository) if params.get("engine") else None
        self.backend = open_backend(ckpt, engine, params.get("backend") or None, device)
        self.cfg = self.backend.cfg
        self.defaults = SamplingConfig.from_dict(json.loads(params.get("sampling_defaults") or "{}"))
        self.limits = Limits(
            max_scans=int(params.get("max_scans", 8)),
            max_samples=int(params.get("max_samples", 16)),
            max_rows=int(params.get("max_rows", 16)),
        )
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        log.info("%s: %s on %s, decoupled=%s", args.get("model_name"), self.backend.name, device, self.decoupled)

    # ---- requests -> checked requests or errors ---------------------------------------------------------
    def _inputs(self, request: Any, names: list[str]) -> dict[str, np.ndarray | None]:
        out = {}
        for name in names:
            tensor = self.pb.get_input_tensor_by_name(request, name)
            out[name] = None if tensor is None else tensor.as_numpy()
        return out

    def _parse(self, requests: list[Any]) -> tuple[list[Any], list[str | None]]:
        from mindhier_rt.errors import MindhierError
        from mindhier_rt.serve.service import INPUTS, PROGRESSIVE_INPUTS, parse_request

        names = list(PROGRESSIVE_INPUTS if self.decoupled else INPUTS)
        parsed, errors = [], []
        for request in requests:
            try:
                inputs = self._inputs(request, names)
                parsed.append(parse_request(inputs, self.cfg, self.defaults, self.limits, self.decoupled))
                errors.append(None)
            except MindhierError as e:
                parsed.append(None)
                errors.append(str(e))
        return parsed, errors

    def _response(self, images: np.ndarray, tokens: np.ndarray, scale: int | None = None) -> Any:
        tensors = [self.pb.Tensor("images", images), self.pb.Tensor("tokens", tokens)]
        if scale is not None:
            tensors.append(self.pb.Tensor("scale", np.full((images.shape[0], 1), scale, dtype=np.int32)))
        return self.pb.InferenceResponse(output_tensors=tensors)

    def _error(self, message: str, invalid_request: bool = True) -> Any:
        """An error response: a malformed request is the client's error (HTTP 400), a failed decode the server's."""
        code = getattr(self.pb.TritonError, "INVALID_ARG" if invalid_request else "INTERNAL", None)
        error = self.pb.TritonError(message) if code is None else self.pb.TritonError(message, code)
        return self.pb.InferenceResponse(output_tensors=[], error=error)

    # ---- execute -------------------------------------------------------------------------------------
    def execute(self, requests: list[Any]) -> list[Any] | None:
        if self.decoupled:
            for request in requests:
                self._execute_progressive(request)
            return None
        from mindhier_rt.serve.service import decode_requests

        parsed, errors = self._parse(requests)
        good = [i for i, p in enumerate(parsed) if p is not None]
        responses: list[Any] = [self._error(e) if e else None for e in errors]
        try:
            results = decode_requests(self.backend, [parsed[i] for i in good], self.limits)
        except Exception as e:  # a failure of the decode itself: every request of the batch is told
            log.exception("decode failed")
            message = f"decode failed: {type(e).__name__}: {e}"
            return [r or self._error(message, invalid_request=False) for r in responses]
        for i, result in zip(good, results, strict=True):
            responses[i] = self._response(result.images, result.tokens)
        return responses

    def _execute_progressive(self, request: Any) -> None:
        from mindhier_rt.serve.service import decode_requests

        sender = request.get_response_sender()
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        (parsed,), (error,) = self._parse([request])
        if error is not None:
            sender.send(self._error(error), flags=final)
            return
        cancelled = False
        empty_tokens = np.zeros((parsed.voxels_NV.shape[0], parsed.samples, 0), dtype=np.int64)

        def on_preview(_: int, scale: int, images: np.ndarray) -> None:
            nonlocal cancelled
            if cancelled or sender.is_cancelled():
                cancelled = True
                return
            sender.send(self._response(images, empty_tokens, scale))

        try:
            (result,) = decode_requests(self.backend, [parsed], self.limits, on_preview=on_preview)
        except Exception as e:
            log.exception("progressive decode failed")
            sender.send(self._error(f"decode failed: {type(e).__name__}: {e}", invalid_request=False), flags=final)
            return
        if cancelled or sender.is_cancelled():
            sender.send(flags=final)  # the client is gone: close the stream without the image
            return
        last = self.cfg.schedule.n_scales - 1
        sender.send(self._response(result.images, result.tokens, last), flags=final)

    def finalize(self) -> None:
        self.backend = None
