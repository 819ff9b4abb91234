"""The batch job behind ``mindhier-rt client``: scans decoded through a running server into a decode folder.

The folder gets what ``decode`` writes for the same file, seed and settings (``scanNNNNN[_sK].png`` and
decode.json, ``running`` then ``complete``); with previews each scan streams over gRPC and its previews are
written beside it as ``scanNNNNN_scaleK[_sK].png``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from mindhier_rt.decode_job import DecodeResult, scan_png_name
from mindhier_rt.io import atomic_write_bytes, png_bytes_uint8
from mindhier_rt.run_folder import RunFolder
from mindhier_rt.serve.client import RemoteDecoder, Settings


def remote_report(remote: RemoteDecoder, settings: Settings, fmri: Path, key: str | None, subject: str) -> dict:
    """decode.json's settings of a run through ``remote``."""
    return {
        "ckpt": None, "engine": None, "server": remote.url, "protocol": remote.protocol, "fmri": str(fmri),
        "fmri_resolved": str(fmri.resolve()), "key": key, "subject": subject,
        "backend": f"triton ({remote.protocol})", "sampling": remote.sampling_used(settings),
        "samples": settings.samples, "pooled": None,
    }  # fmt: skip


def decode_remote(
    remote: RemoteDecoder,
    voxels_NV: np.ndarray,
    good_ids: np.ndarray,
    subject: str,
    folder: RunFolder,
    settings: Settings,
    report: dict[str, Any],
    skipped: list[dict[str, Any]],
    previews: list[int] | None = None,
) -> DecodeResult:
    """Decode the rows ``good_ids`` of ``voxels_NV`` through ``remote`` into ``folder`` (previews after the scales
    ``previews`` lists, streamed scan by scan, when given)."""
    out = folder.path
    samples = settings.samples
    folder.report("running", {**report, "images": [], "skipped": skipped})
    t0 = time.perf_counter()
    written: list[dict[str, Any]] = []

    def write(scan: int, images_SHW3: np.ndarray, suffix: str = "") -> None:
        for s in range(images_SHW3.shape[0]):
            name = scan_png_name(scan, s, samples, suffix)
            atomic_write_bytes(out / name, png_bytes_uint8(images_SHW3[s]))
            if not suffix:
                written.append({"scan": int(scan), "sample": s, "file": name})

    if previews is None:
        images, _ = remote.decode(voxels_NV[good_ids].astype(np.float32), subject, good_ids.astype(np.int64), settings)
        for row, scan in enumerate(good_ids):
            write(int(scan), images[row])
    else:
        for scan in good_ids:
            one = voxels_NV[scan : scan + 1].astype(np.float32)
            for scale, images, tokens in remote.stream(one, subject, int(scan), settings, previews):
                final = tokens.shape[-1] > 0  # previews carry no tokens
                write(int(scan), images[0], suffix="" if final else f"_scale{scale}")
    seconds = time.perf_counter() - t0
    report |= {"images": written, "skipped": skipped, "seconds": round(seconds, 3)}
    folder.report("complete", report)
    return DecodeResult(len(good_ids), len(skipped), seconds)
