"""Decode requests as a server receives them: each request checked on its own, compatible requests decoded together.

A request is the inputs of the ``mindhier`` / ``mindhier_progressive`` models (``INPUTS``): voxels [N, V] of one
subject (N scans, the batch axis of the request) and optional settings, one value per request. Missing settings
take the bundle's recorded sampling defaults. ``parse_request`` turns the arrays into a ``DecodeRequest`` or
raises ``InputError`` with one line a client can act on; ``decode_requests`` groups the valid requests that share
(subject, samples, sampling, previews), decodes each group in chunks of at most ``max_rows`` scans and returns
per request the images (uint8 [N, samples, H, W, 3], the bytes ``decode`` writes as PNGs) and the tokens
(int64 [N, samples, total tokens]). Tokens are keyed by scan id, seed, sample and scale, so how requests are
grouped or batched changes no output.

Knows nothing of Triton: ``mindhier_rt.serve.triton_model`` feeds it Triton's requests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from mindhier_rt.config import ModelConfig
from mindhier_rt.errors import ConfigError, InputError
from mindhier_rt.io import to_uint8_hwc
from mindhier_rt.pipeline import reconstruct
from mindhier_rt.runtime.base import DecodeBackend
from mindhier_rt.sampling import SamplingConfig, with_overrides

# name -> (Triton data type, dims without the batch axis, optional); the settings are one value per request
INPUTS: dict[str, tuple[str, list[int], bool]] = {
    "voxels": ("TYPE_FP32", [-1], False),
    "subject": ("TYPE_STRING", [1], False),
    "scan_id": ("TYPE_INT64", [1], True),
    "seed": ("TYPE_UINT64", [1], True),
    "samples": ("TYPE_INT32", [1], True),
    "cfg": ("TYPE_FP32", [1], True),
    "cfg_stop": ("TYPE_INT32", [1], True),  # < 0: guidance on at every scale
    "top_k": ("TYPE_INT32", [1], True),
    "top_p": ("TYPE_FP32", [1], True),
    "greedy": ("TYPE_BOOL", [1], True),
}
PROGRESSIVE_INPUTS = {**INPUTS, "previews": ("TYPE_INT32", [-1], True)}  # scales after which to send a preview
OUTPUTS: dict[str, tuple[str, list[int]]] = {
    "images": ("TYPE_UINT8", [-1, -1, -1, 3]),  # [samples, H, W, 3] per scan
    "tokens": ("TYPE_INT64", [-1, -1]),  # [samples, total tokens] per scan, scale after scale
}
PROGRESSIVE_OUTPUTS = {**OUTPUTS, "scale": ("TYPE_INT32", [1])}  # the last scale the images include


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, so that memory is bounded by the work a server is sized for."""

    max_scans: int = 8  # scans in one request (at most the model's max batch size)
    max_samples: int = 16  # samples per scan
    max_rows: int = 16  # scans x samples decoded in one forward pass (larger groups are split)

    def __post_init__(self) -> None:
        for name in ("max_scans", "max_samples", "max_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class DecodeRequest:
    voxels_NV: np.ndarray  # float32, finite
    subject: str
    scan_ids: np.ndarray  # int64 [N]
    samples: int
    sampling: SamplingConfig
    previews: tuple[int, ...] = ()

    @property
    def group(self) -> tuple:
        """Requests with equal groups are decoded in one call."""
        return (self.subject, self.samples, self.sampling, self.previews)


@dataclass
class DecodeResult:
    images: np.ndarray  # uint8 [N, samples, H, W, 3]
    tokens: np.ndarray  # int64 [N, samples, total tokens]


@dataclass
class _Group:
    members: list[int] = field(default_factory=list)  # indices into the request list


def _one_value(inputs: Mapping[str, np.ndarray | None], name: str, rows: int) -> object | None:
    """The single value of an optional setting: given once per scan row, equal across the rows."""
    arr = inputs.get(name)
    if arr is None:
        return None
    arr = np.asarray(arr)
    if arr.shape != (rows, 1):
        raise InputError(f"input {name}: expected shape [{rows}, 1] (one value per scan row), got {list(arr.shape)}")
    values = {v.item() if not isinstance(v, bytes) else v for v in arr.reshape(-1)}
    if len(values) != 1:
        raise InputError(f"input {name}: one value per request, got {len(values)} different values across its rows")
    return values.pop()


def parse_request(
    inputs: Mapping[str, np.ndarray | None],
    cfg: ModelConfig,
    defaults: SamplingConfig,
    limits: Limits,
    progressive: bool = False,
) -> DecodeRequest:
    """A checked ``DecodeRequest`` from one request's input arrays (name -> array with the request's batch axis
    first, None or absent when not sent); ``InputError`` names the first problem."""
    known = PROGRESSIVE_INPUTS if progressive else INPUTS
    unknown = sorted(set(inputs) - set(known))
    if unknown:
        raise InputError(f"unknown inputs {unknown}; expected {sorted(known)}")
    voxels = inputs.get("voxels")
    if voxels is None:
        raise InputError("input voxels is required")
    voxels = np.asarray(voxels)
    if voxels.dtype != np.float32 or voxels.ndim != 2:
        raise InputError(f"input voxels: expected float32 [scans, voxels], got {voxels.dtype} {list(voxels.shape)}")
    n = voxels.shape[0]
    if not 1 <= n <= limits.max_scans:
        raise InputError(f"input voxels: 1 to {limits.max_scans} scans per request, got {n}")
    subject = _one_value(inputs, "subject", n)
    if subject is None:
        raise InputError("input subject is required")
    subject = subject.decode("utf-8", "replace") if isinstance(subject, bytes) else str(subject)
    subjects = dict(cfg.encoder.subjects) if cfg.encoder is not None else {}
    if subject not in subjects:
        raise InputError(f"unknown subject {subject!r}; this model has {sorted(subjects)}")
    if voxels.shape[1] != subjects[subject]:
        raise InputError(f"subject {subject} expects {subjects[subject]} voxels per scan, got {voxels.shape[1]}")
    bad = np.flatnonzero(~np.isfinite(voxels).all(axis=1))
    if len(bad):
        raise InputError(f"scan rows {bad.tolist()[:8]} of the request have NaN or inf voxels")

    scan_ids = np.arange(n, dtype=np.int64)
    if inputs.get("scan_id") is not None:
        ids = np.asarray(inputs["scan_id"])
        if ids.shape != (n, 1) or ids.dtype != np.int64:
            raise InputError(f"input scan_id: expected int64 [{n}, 1], got {ids.dtype} {list(ids.shape)}")
        scan_ids = ids.reshape(-1)
        if (scan_ids < 0).any():
            raise InputError("input scan_id: scan ids must be >= 0")

    samples = _one_value(inputs, "samples", n)
    samples = 1 if samples is None else int(samples)
    if not 1 <= samples <= limits.max_samples:
        raise InputError(f"input samples: 1 to {limits.max_samples} per scan, got {samples}")

    def given(name: str, cast: type) -> object | None:
        value = _one_value(inputs, name, n)
        return None if value is None else cast(value)

    try:  # the request's settings over the defaults; SamplingConfig checks every value (cfg_stop < 0: never)
        sampling, _ = with_overrides(
            defaults, seed=given("seed", int), cfg_scale=given("cfg", float), cfg_stop=given("cfg_stop", int),
            top_k=given("top_k", int), top_p=given("top_p", float), greedy=given("greedy", bool),
        )  # fmt: skip
    except ConfigError as e:
        raise InputError(f"sampling settings: {e}") from e

    previews: tuple[int, ...] = ()
    if progressive:
        if n * samples > limits.max_rows:  # decoded in one pass, so that each preview is one message
            raise InputError(f"progressive requests: scans x samples at most {limits.max_rows}, got {n * samples}")
        K = cfg.schedule.n_scales
        raw = inputs.get("previews")
        wanted = default_previews(K) if raw is None else sorted({int(x) for x in np.asarray(raw).reshape(-1)})
        out_of_range = [i for i in wanted if not 0 <= i < K]
        if out_of_range:
            raise InputError(f"input previews: scales are 0..{K - 1}, got {out_of_range}")
        previews = tuple(i for i in wanted if i < K - 1)  # the last scale is the final image
    return DecodeRequest(voxels.astype(np.float32, copy=False), subject, scan_ids, samples, sampling, previews)


def default_previews(n_scales: int) -> list[int]:
    """A few scales spread over the pyramid, coarse first: about a third, half and three quarters of the way."""
    return sorted({max(0, round(n_scales * f) - 1) for f in (1 / 3, 1 / 2, 3 / 4)} - {n_scales - 1})


# (request index, scale, images uint8 [N, samples, H, W, 3]) for the previews of progressive requests
PreviewSink = Callable[[int, int, np.ndarray], None]


def images_uint8(images_NS3HW: torch.Tensor) -> np.ndarray:
    """[N, S, 3, H, W] in [0, 1] -> uint8 [N, S, H, W, 3], rounded as ``decode``'s PNGs are."""
    N, S = images_NS3HW.shape[:2]
    flat = [to_uint8_hwc(img) for img in images_NS3HW.reshape(N * S, *images_NS3HW.shape[2:])]
    return np.stack(flat).reshape(N, S, *flat[0].shape)


def decode_requests(
    backend: DecodeBackend,
    requests: Sequence[DecodeRequest],
    limits: Limits,
    on_preview: PreviewSink | None = None,
) -> list[DecodeResult]:
    """Decode every request, grouping compatible ones; one result per request, in order."""
    groups: dict[tuple, _Group] = {}
    for index, request in enumerate(requests):
        groups.setdefault(request.group, _Group()).members.append(index)
    results: list[DecodeResult | None] = [None] * len(requests)
    for group in groups.values():
        first = requests[group.members[0]]
        voxels = np.concatenate([requests[i].voxels_NV for i in group.members])
        scan_ids = np.concatenate([requests[i].scan_ids for i in group.members])
        owner = np.concatenate([np.full(len(requests[i].scan_ids), i) for i in group.members])
        step = max(1, limits.max_rows // first.samples)  # scans per forward pass
        images, tokens = [], []
        for start in range(0, len(voxels), step):
            part = slice(start, start + step)
            preview = None
            if on_preview is not None and first.previews:
                preview = (first.previews, _preview_router(on_preview, owner[part]))
            rec = reconstruct(
                backend, torch.from_numpy(voxels[part]), first.subject, first.sampling, samples=first.samples,
                scan_ids=torch.from_numpy(scan_ids[part]), on_preview=preview,
            )  # fmt: skip
            images.append(images_uint8(rec.images_NS3HW))
            tokens.append(torch.cat(rec.tokens, dim=-1).numpy())
        images_all, tokens_all = np.concatenate(images), np.concatenate(tokens)
        for i in group.members:
            rows = owner == i
            results[i] = DecodeResult(images_all[rows], tokens_all[rows])
    return results  # type: ignore[return-value]


def _preview_router(sink: PreviewSink, owner: np.ndarray) -> Callable[[int, torch.Tensor], None]:
    """The loop's preview callback for one chunk: its rows sent to the requests they belong to."""

    def send(scale: int, images_NS3HW: torch.Tensor) -> None:
        u8 = images_uint8(images_NS3HW)
        for i in dict.fromkeys(owner.tolist()):
            sink(int(i), scale, u8[owner == i])

    return send
