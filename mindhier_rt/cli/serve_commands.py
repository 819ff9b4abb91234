"""Serving commands: serve (Triton Inference Server), export-triton (a model repository) and client."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mindhier_rt.cli.options import DECODE_OUT_HELP, FMRI_HELP, SUBJECT_HELP, ArrayKey, warn_skipped
from mindhier_rt.errors import InputError

ServeEngine = Annotated[Path | None, typer.Option("--engine", help="engine bundle (onnxruntime, tensorrt)")]
ServeCkpt = Annotated[Path | None, typer.Option("--ckpt", help="checkpoint (torch, torch-fast)")]
ServeBackend = Annotated[
    str | None, typer.Option(help="onnxruntime (default for --engine), tensorrt, torch, torch-fast")
]
ServeGpus = Annotated[str | None, typer.Option(help="GPU ids for the model instances, e.g. 0,1 (default: CPU)")]
ServeMaxBatch = Annotated[int, typer.Option(min=1, help="scans in one batch: of one request, or joined by the batcher")]
ServeInstances = Annotated[int, typer.Option(min=1, help="model instances per GPU (or on the CPU)")]
ServeMaxSamples = Annotated[int, typer.Option(min=1, help="most samples per scan a request may ask for")]


def serve(
    engine: ServeEngine = None,
    ckpt: ServeCkpt = None,
    backend: ServeBackend = None,
    device: Annotated[str, typer.Option(help="cpu, or cuda[:N] (the instances' GPU unless --gpus)")] = "cpu",
    gpus: ServeGpus = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    grpc_port: Annotated[int, typer.Option(min=1, max=65535)] = 8001,
    metrics_port: Annotated[int, typer.Option(min=1, max=65535)] = 8002,
    max_batch: ServeMaxBatch = 8,
    instances: ServeInstances = 1,
    max_samples: ServeMaxSamples = 16,
) -> None:
    """Serve decodes from NVIDIA Triton Inference Server (HTTP, gRPC, metrics) until Ctrl-C or SIGTERM.

    Models: `mindhier` (voxels + subject [+ seed, samples, cfg, ...] -> images, tokens; dynamic batching) and
    `mindhier_progressive` (streams the image decoded so far after chosen scales, then the final image).
    Needs the serve extra (pip install 'mindhier-rt\\[serve]'). See docs/serving.md.
    """
    from mindhier_rt.serve.repository import MODEL, PROGRESSIVE_MODEL, repository_spec
    from mindhier_rt.serve.server import Ports, RunningServer, serve_until_signal

    spec = repository_spec(engine, ckpt, backend, device, gpus, max_batch, instances, max_samples)

    def on_ready(server: RunningServer) -> None:
        typer.echo(
            f"serving {MODEL} and {PROGRESSIVE_MODEL} ({server.process.pid}): HTTP http://{host}:{http_port}, "
            f"gRPC {host}:{grpc_port}, metrics http://{host}:{metrics_port}/metrics; Ctrl-C stops"
        )

    code = serve_until_signal(spec, Ports(http_port, grpc_port, metrics_port), host, on_ready)
    typer.echo(f"stopped (tritonserver exit code {code})")


def export_triton(
    out: Annotated[Path, typer.Option("--out", help="new folder for the model repository")],
    engine: ServeEngine = None,
    ckpt: ServeCkpt = None,
    backend: ServeBackend = None,
    gpus: ServeGpus = None,
    max_batch: ServeMaxBatch = 8,
    instances: ServeInstances = 1,
    max_samples: ServeMaxSamples = 16,
) -> None:
    """Write a model repository for the stock `tritonserver` container: the bundle (or checkpoint) inside it and
    the two Python-backend models of `serve`; the container needs `pip install mindhier-rt[onnx]` (docs/serving.md)."""
    from mindhier_rt.serve.repository import repository_spec, write_repository

    spec = repository_spec(engine, ckpt, backend, "cpu", gpus, max_batch, instances, max_samples)
    repo = write_repository(spec, out, copy=True)
    where = f"GPUs {list(spec.gpus)}" if spec.gpus else "the CPU"
    typer.echo(f"wrote {repo}: models mindhier, mindhier_progressive ({instances} instance(s) on {where})")


def client(
    url: Annotated[str, typer.Option(help="server address, e.g. 127.0.0.1:8000 (HTTP) or 127.0.0.1:8001 (gRPC)")],
    fmri: Annotated[Path, typer.Option("--fmri", help=FMRI_HELP)],
    subject: Annotated[str, typer.Option("--subject", help=SUBJECT_HELP)],
    out: Annotated[Path, typer.Option("--out", help=DECODE_OUT_HELP)],
    protocol: Annotated[str, typer.Option(help="http or grpc")] = "http",
    samples: Annotated[int, typer.Option(min=1, help="samples per scan")] = 1,
    seed: Annotated[int | None, typer.Option(min=0, help="seed of the token draws (default: the server's)")] = None,
    cfg_scale: Annotated[float | None, typer.Option("--cfg", min=0.0, help="guidance scale")] = None,
    cfg_stop: Annotated[int | None, typer.Option(help="switch guidance off from this 0-indexed scale on")] = None,
    top_k: Annotated[int | None, typer.Option(min=0)] = None,
    top_p: Annotated[float | None, typer.Option()] = None,
    greedy: Annotated[bool | None, typer.Option("--greedy/--no-greedy", help="argmax instead of sampling")] = None,
    previews: Annotated[
        str | None, typer.Option(help="gRPC: stream each scan and also write previews after these scales, e.g. 2,5")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="requests in flight (the server batches them)")] = 4,
    key: ArrayKey = None,
) -> None:
    """Decode scans through a running `mindhier-rt serve` (or a stock server with the exported repository):
    writes the PNGs and decode.json that `decode` writes for the same settings."""
    from mindhier_rt.decode_job import skipped_scans
    from mindhier_rt.io import read_voxels
    from mindhier_rt.run_folder import claim_run_folder
    from mindhier_rt.serve.client import RemoteDecoder, Settings
    from mindhier_rt.serve.remote_decode import decode_remote, remote_report

    wanted = None
    if previews is not None:
        try:
            wanted = [int(x) for x in previews.split(",") if x.strip()]
        except ValueError as e:
            raise InputError(f"--previews takes scale indices like 2,5; got {previews!r}") from e
    voxels = read_voxels(fmri, key=key)
    settings = Settings(samples, seed, cfg_scale, cfg_stop, top_k, top_p, greedy)
    remote = RemoteDecoder(url, protocol, concurrency)
    report = remote_report(remote, settings, fmri, key, subject)
    good_ids, skipped = skipped_scans(voxels)
    warn_skipped(skipped)
    with claim_run_folder(out) as folder:  # one run per folder; decode.json says running, then complete
        done = decode_remote(remote, voxels, good_ids, subject, folder, settings, report, skipped, wanted)
    typer.echo(
        f"decoded {done.decoded} scans ({done.skipped} skipped) through {url} into {out} in {done.seconds:.1f} s"
    )
    if not done.decoded:
        raise typer.Exit(1)
