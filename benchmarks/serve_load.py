"""Load test of `mindhier-rt serve` on 127.0.0.1: throughput, latency, and no lost or wrong answer.

    python benchmarks/serve_load.py --engine BUNDLE [--clients 8] [--requests 200] [--bad-every 10]
        [--streams 4] [--out benchmarks/results/serve_load_tiny_cpu] [--protocol http]

Starts a server on free ports (the repository ``serve`` uses), then ``--clients`` threads send ``--requests``
requests in all (one scan each, bounded: no request loop runs past its count or ``--deadline-s``):

- every response is checked against the images and tokens the same bundle gives locally (``pipeline.reconstruct``
  with the same scan id and settings, the bytes ``decode`` writes): a response that differs, or an answer that
  never comes, is counted as wrong or lost;
- every ``--bad-every``-th request is malformed (cycling through a wrong voxel count, NaN voxels, an unknown subject,
  float64 voxels, too many samples) and must be refused with an error while the others are served;
- ``--streams`` progressive requests are cut off by their client after the first preview; afterwards the server
  must still answer;
- at the end a large request is sent, the server gets SIGTERM while it decodes, and the answer must still arrive.

Writes ``<out>.json`` and ``<out>.md`` (the command, the machine, throughput, p50/p95/p99 latency, counts).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mindhier_rt.bundle import Bundle
from mindhier_rt.pipeline import reconstruct
from mindhier_rt.runtime.open import open_backend
from mindhier_rt.serve.client import RemoteDecoder, Settings, _inputs
from mindhier_rt.serve.repository import MODEL, PROGRESSIVE_MODEL, RepositorySpec, write_repository
from mindhier_rt.serve.server import Ports, start_server, wait_ready
from mindhier_rt.serve.service import images_uint8

BAD_KINDS = ("voxel count", "nan", "subject", "float64", "samples")


def _percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def _bad_inputs(kind: str, module: Any, good: np.ndarray, subject: str) -> list:
    v = good.copy()
    settings = Settings()
    if kind == "voxel count":
        v = v[:, :-1]
    elif kind == "nan":
        v[0, 0] = np.nan
    elif kind == "subject":
        subject = "nobody"
    elif kind == "samples":
        settings = Settings(samples=1000)
    inputs = _inputs(module, v, subject, np.array([0]), settings)
    if kind == "float64":
        x = module.InferInput("voxels", list(v.shape), "FP64")
        x.set_data_from_numpy(v.astype(np.float64))
        inputs[0] = x
    return inputs


def run(args: argparse.Namespace) -> dict[str, Any]:
    bundle = Bundle.open(args.engine)
    cfg = bundle.cfg
    subject, n_vox = cfg.encoder.subjects[0]
    sampling = bundle.spec.sampling
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((args.distinct, n_vox)).astype(np.float32)  # scans the clients draw from
    local = open_backend(engine=Path(args.engine), backend="onnxruntime")  # what the served model runs
    ref = reconstruct(local, torch.from_numpy(pool), subject, sampling, scan_ids=torch.arange(args.distinct))
    ref_images = images_uint8(ref.images_NS3HW)
    ref_tokens = torch.cat(ref.tokens, -1).numpy()

    with tempfile.TemporaryDirectory(prefix="serve-load-") as work:
        repo = write_repository(RepositorySpec(engine=Path(args.engine), max_batch=8), Path(work) / "repo", False)
        server = start_server(repo, Ports.free(), Path(work))
        wait_ready(server, [MODEL, PROGRESSIVE_MODEL])
        url = server.http_url if args.protocol == "http" else server.grpc_url
        remote = RemoteDecoder(url, args.protocol)
        counts = {"ok": 0, "wrong": 0, "lost": 0, "bad_refused": 0, "bad_accepted": 0}
        latencies: list[float] = []
        lock = threading.Lock()
        jobs: queue.Queue = queue.Queue()
        for k in range(args.requests):
            jobs.put(k)
        deadline = time.monotonic() + args.deadline_s

        def worker() -> None:
            from tritonclient.utils import InferenceServerException

            client = remote._client()
            try:
                while time.monotonic() < deadline:
                    try:
                        k = jobs.get_nowait()
                    except queue.Empty:
                        return
                    scan = k % args.distinct
                    bad = args.bad_every > 0 and k % args.bad_every == args.bad_every - 1
                    t0 = time.perf_counter()
                    try:
                        if bad:
                            kind = BAD_KINDS[(k // args.bad_every) % len(BAD_KINDS)]
                            client.infer(MODEL, _bad_inputs(kind, remote.module, pool[scan : scan + 1], subject))
                            with lock:
                                counts["bad_accepted"] += 1
                            continue
                        images, tokens = remote.decode_one(
                            client, pool[scan : scan + 1], subject, np.array([scan]), Settings()
                        )
                    except InferenceServerException:
                        with lock:
                            counts["bad_refused" if bad else "lost"] += 1
                        continue
                    except Exception:
                        with lock:
                            counts["lost"] += 1
                        continue
                    dt = time.perf_counter() - t0
                    right = np.array_equal(images[0], ref_images[scan]) and np.array_equal(tokens[0], ref_tokens[scan])
                    with lock:
                        latencies.append(dt)
                        counts["ok" if right else "wrong"] += 1
            finally:
                client.close()

        t_start = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(args.clients)]
        for t in threads:
            t.start()
        streams_cut = _cut_streams(server.grpc_url, pool, subject, args.streams)
        for t in threads:
            t.join()
        wall = time.perf_counter() - t_start
        counts["lost"] += jobs.qsize()  # never sent before the deadline
        after = RemoteDecoder(server.http_url).decode(pool[:2], subject, np.arange(2), Settings())
        served_after_cuts = bool(np.array_equal(after[0], ref_images[:2]))
        sigterm = _sigterm_in_flight(server, pool, subject)

    good = args.requests - sum(
        1 for k in range(args.requests) if args.bad_every and k % args.bad_every == args.bad_every - 1
    )
    return {
        "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
        },
        "bundle": {"config": cfg.name, "path": str(args.engine)},
        "protocol": args.protocol,
        "clients": args.clients,
        "requests": args.requests,
        "good_requests": good,
        "counts": counts,
        "wall_s": wall,
        "throughput_rps": counts["ok"] / wall if wall > 0 else 0.0,
        "latency_ms": {
            "p50": 1e3 * _percentile(latencies, 50),
            "p95": 1e3 * _percentile(latencies, 95),
            "p99": 1e3 * _percentile(latencies, 99),
            "mean": 1e3 * statistics.fmean(latencies) if latencies else None,
        },
        "streams_cut": streams_cut,
        "served_after_cut_streams": served_after_cuts,
        "sigterm_in_flight_answered": sigterm,
        "passed": counts["wrong"] == 0
        and counts["lost"] == 0
        and counts["bad_accepted"] == 0
        and served_after_cuts
        and sigterm,
    }


def _cut_streams(url: str, pool: np.ndarray, subject: str, n: int) -> int:
    """Progressive requests whose client leaves after the first preview."""
    import tritonclient.grpc as grpc

    cut = 0
    for _ in range(n):
        client = grpc.InferenceServerClient(url)
        got: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error, q=got: q.put((result, error)))
        inputs = _inputs(grpc, pool[: min(4, len(pool))], subject, np.arange(min(4, len(pool))), Settings(),
                         previews=[0, 1, 2])  # fmt: skip
        client.async_stream_infer(PROGRESSIVE_MODEL, inputs)
        _, error = got.get(timeout=120)
        cut += error is None
        client.stop_stream(cancel_requests=True)
        client.close()
    return cut


def _sigterm_in_flight(server: Any, pool: np.ndarray, subject: str) -> bool:
    """SIGTERM while a large request decodes: its answer must still arrive."""
    import tritonclient.http as http

    result: dict[str, Any] = {}
    n = min(8, len(pool))

    def decode() -> None:
        client = http.InferenceServerClient(server.http_url, network_timeout=300.0)
        try:
            result["images"] = RemoteDecoder(server.http_url).decode_one(
                client, pool[:n], subject, np.arange(n), Settings(samples=16)
            )[0]
        except Exception as e:
            result["error"] = repr(e)
        finally:
            client.close()

    thread = threading.Thread(target=decode)
    thread.start()
    time.sleep(0.3)
    in_flight = thread.is_alive()
    code = server.stop()
    thread.join(300)
    return bool(in_flight and code == 0 and "images" in result and result["images"].shape[:2] == (n, 16))


def to_markdown(r: dict[str, Any]) -> str:
    c, lat = r["counts"], r["latency_ms"]
    return "\n".join([
        f"# Serving load test: {r['bundle']['config']} bundle, {r['protocol']}, 127.0.0.1",
        "",
        f"Command: `{r['command']}`",
        "",
        f"Machine: {r['machine']['cpus']} CPUs ({r['machine']['processor']}), Python {r['machine']['python']}, "
        f"torch {r['machine']['torch']}; the server (PyTriton's tritonserver, CPU) and the clients share it.",
        "",
        "| clients | requests (good) | answered right | wrong | lost | malformed refused | malformed accepted "
        "| throughput req/s | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {r['clients']} | {r['requests']} ({r['good_requests']}) | {c['ok']} | {c['wrong']} | {c['lost']} "
        f"| {c['bad_refused']} | {c['bad_accepted']} | {r['throughput_rps']:.1f} | {lat['p50']:.1f} "
        f"| {lat['p95']:.1f} | {lat['p99']:.1f} |",
        "",
        f"- Streams cut by their client after the first preview: {r['streams_cut']}; the server answered right "
        f"afterwards: {r['served_after_cut_streams']}.",
        f"- SIGTERM while a request of 8 scans x 16 samples decoded: answered: {r['sigterm_in_flight_answered']}.",
        f"- Passed (no wrong or lost answer, every malformed request refused, served after cuts, SIGTERM answered): "
        f"**{r['passed']}**.",
        "",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", type=Path, required=True)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--bad-every", type=int, default=10, help="every n-th request is malformed (0: none)")
    p.add_argument("--streams", type=int, default=4, help="progressive requests cut off after the first preview")
    p.add_argument("--distinct", type=int, default=16, help="distinct scans the requests cycle through")
    p.add_argument("--protocol", default="http", choices=("http", "grpc"))
    p.add_argument("--deadline-s", type=float, default=600.0, help="no request is sent after this many seconds")
    p.add_argument("--out", type=Path, default=None, help="write <out>.json and <out>.md")
    args = p.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.distinct < 1:
        p.error("clients, requests and distinct must be >= 1")
    result = run(args)
    md = to_markdown(result)
    print(md)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        args.out.with_suffix(".md").write_text(md)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
