"""`mindhier-rt`: the command line. Entry points print; the library logs.

Every MindhierError is printed as one line (``error: ...``) with exit code 1, never a traceback; a missing
optional dependency (``MissingDependencyError``: TensorRT, a GPU) exits with code 2. Training stopped by SIGINT /
SIGTERM saves its state, prints how to resume and exits with 128 + the signal number.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mindhier_rt.errors import InputError, MindhierError, MissingDependencyError, TrainingInterrupted

if TYPE_CHECKING:
    import numpy as np

    from mindhier_rt.run_folder import RunFolder
    from mindhier_rt.runtime.base import DecodeBackend
    from mindhier_rt.sampling import SamplingConfig

app = typer.Typer(
    name="mindhier-rt",
    help="MindHier fMRI-to-image reconstruction: reference models, engines and benchmarks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

log = logging.getLogger("mindhier_rt")


RECORDED = "{} (default: the bundle's recorded setting; a checkpoint's: docs/sampling.md)"


def _echo_json(obj: object) -> None:
    typer.echo(json.dumps(obj, indent=2))


CONTEXT_MAP_HELP = (
    "which context level each token reads: training or reference-pipeline (MindHier's reference inference; "
    "the default for MindHier checkpoints). Default: the checkpoint's"
)


@app.command()
def info(
    preset_name: Annotated[
        str, typer.Option("--preset", help="tiny, small, demo, mindhier-256 or mindhier-512")
    ] = "tiny",
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    context_map: Annotated[str | None, typer.Option("--context-map", help=CONTEXT_MAP_HELP)] = None,
) -> None:
    """Config, schedule and parameter counts of a preset (models built on the meta device: instant)."""
    from mindhier_rt.config import preset
    from mindhier_rt.models.mindhier import MindHier

    cfg = preset(preset_name)
    if context_map is not None:
        cfg = cfg.replace(context_map=context_map)
    models = MindHier.from_config(cfg, device="meta")
    subject = cfg.encoder.subjects[0][0] if cfg.encoder is not None else None
    params = models.param_counts(subject)
    report = {
        "preset": cfg.name,
        "config": cfg.to_dict(),
        "schedule": cfg.schedule.to_dict(),
        "params": params,
        "params_note": f"encoder = shared part + the input layer of {subject}" if subject else "no fMRI encoder",
    }
    if as_json:
        _echo_json(report)
        return
    s = cfg.schedule
    g = cfg.generator
    typer.echo(f"preset {cfg.name}: {cfg.image_size} px, {s.n_scales} scales, {s.total_tokens} tokens")
    typer.echo(f"  patch_nums      {s.patch_nums}")
    if cfg.encoder is not None:  # voxels per scan: what the rows of a --fmri file must hold
        pairs = [f"{name} {count:,}" for name, count in cfg.encoder.subjects]
        for k in range(0, len(pairs), 4):
            label = "voxels per scan" if k == 0 else ""
            typer.echo(f"  {label:<15} {', '.join(pairs[k : k + 4])}")
    typer.echo(f"  generator       depth {g.depth}, width {g.width}, heads {g.heads}, {g.attn_mode}")
    typer.echo(f"  levels          M={s.n_levels} x {s.context_tokens} x {cfg.context_dim}, guidance {s.guidance}")
    typer.echo(f"  level of scale  {s.level_of_scale} (1: shallow e_1, {s.n_levels}: deep)")
    if not s.single_segment:  # a per-token map: the levels each scale's tokens read
        levels = [tuple(sorted(s.n_levels - seg for seg in segs)) for segs in s.segments_of_scale]
        trained = cfg.replace(context_map="training").schedule.segment_of_token
        moved = sum(a != b for a, b in zip(s.segment_of_token, trained, strict=True))
        typer.echo(f"  context map     {s.context_map}: levels per scale {levels}")
        typer.echo(f"                  {moved} of {s.total_tokens} tokens read another level than in training")
    typer.echo(f"  clip layers     {s.clip_layers}")
    for name, n in params.items():
        typer.echo(f"  {name:<15} {n / 1e6:10.1f} M parameters")


@app.command()
def init(
    out: Annotated[Path, typer.Option("--out", help="checkpoint file to write (.safetensors)")],
    preset_name: Annotated[str, typer.Option("--preset", help="tiny, small, demo, mindhier-256 or mindhier-512")] = (
        "tiny"
    ),
    seed: Annotated[int, typer.Option(help="seed of the random weights")] = 0,
    attn_mode: Annotated[str | None, typer.Option(help="override: scale_local or block_causal")] = None,
) -> None:
    """Write a randomly initialised checkpoint (for smoke tests and benchmarks of untrained models)."""
    from mindhier_rt.config import preset
    from mindhier_rt.models.mindhier import MindHier

    cfg = preset(preset_name)
    if attn_mode is not None:
        cfg = cfg.replace(attn_mode=attn_mode)
    MindHier.from_config(cfg, seed=seed).save(out, extra={"init_seed": seed})
    typer.echo(f"wrote {out}")


VAE_HELP = "VQ-VAE of a public generator: vae_ch160v4096z32.pth (VAR) or the Switti VQ-VAE folder"


@app.command()
def export(
    ckpt: Annotated[
        Path,
        typer.Option(
            "--ckpt", help="checkpoint (.safetensors), or a public generator: var_d16.pth, a Switti / MindHier folder"
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="bundle folder: new, empty, or an earlier bundle (replaced when complete)")
    ],
    dtype: Annotated[str, typer.Option(help="float32 or float16 weights")] = "float32",
    batch: Annotated[int, typer.Option(min=1, help="scans per run (recorded shapes; graphs take any batch)")] = 1,
    samples: Annotated[int, typer.Option(min=1, help="samples per scan (recorded shapes)")] = 1,
    subjects: Annotated[str | None, typer.Option(help="comma-separated subjects to export (default: all)")] = None,
    vae: Annotated[Path | None, typer.Option("--vae", help=VAE_HELP)] = None,
    context_map: Annotated[str | None, typer.Option("--context-map", help=CONTEXT_MAP_HELP)] = None,
) -> None:
    """Export a checkpoint to an engine bundle: ONNX graphs, tables and manifest.json."""
    from rich.progress import Progress

    from mindhier_rt.export.onnx_export import export_bundle
    from mindhier_rt.importers import load_models

    models = load_models(ckpt, vae, context_map=context_map)
    all_subjects = models.cfg.encoder.subjects if models.cfg.encoder is not None else ()
    n_subjects = len(all_subjects) if subjects is None else len(subjects.split(","))
    n_graphs = n_subjects + models.cfg.schedule.n_scales + 3
    with Progress(transient=True) as progress:
        task = progress.add_task("exporting", total=n_graphs)

        started: list[str] = []

        def on_graph(name: str) -> None:  # called as each graph starts: the one before it is done
            progress.update(task, description=f"exporting {name}", advance=1 if started else 0)
            started.append(name)

        bundle = export_bundle(
            models, out, dtype=dtype, batch=batch, samples=samples, source=str(ckpt), on_graph=on_graph,
        )  # fmt: skip
    size = sum(entry.bytes for entry in bundle.spec.files.values())
    typer.echo(f"wrote {out}: {len(bundle.spec.graphs)} graphs, {size / 1e6:.1f} MB")


@app.command()
def build(
    engine: Annotated[Path, typer.Option("--engine", help="engine bundle from `mindhier-rt export`")],
    precision: Annotated[
        str | None, typer.Option(help="fp16, bf16 or fp32 (default: the bundle's export dtype)")
    ] = None,
    workspace_gib: Annotated[float | None, typer.Option(help="builder workspace limit in GiB")] = None,
    timing_cache: Annotated[
        Path | None, typer.Option(help="persistent timing cache (default: ~/.cache/mindhier-rt/, per version and GPU)")
    ] = None,
    version_compatible: Annotated[bool, typer.Option(help="plans that later TensorRT runtimes can run")] = False,
    kv_cache: Annotated[
        str, typer.Option(help="block-causal self cache: auto, in-place (TensorRT >= 10.15) or ping-pong")
    ] = "auto",
    batch: Annotated[int | None, typer.Option(min=1, help="scans per run (default: the export's)")] = None,
    samples: Annotated[int | None, typer.Option(min=1, help="samples per scan (default: the export's)")] = None,
    attention_plugin: Annotated[
        bool, typer.Option(help="the step's attention as the Triton kernel in a TensorRT AOT plugin (TensorRT >= 10.8)")
    ] = False,
) -> None:
    """Build TensorRT plans next to the bundle's ONNX graphs and record them in its manifest."""
    from rich.progress import Progress

    from mindhier_rt.export.tensorrt_build import BuildOptions, TensorRTPlanBuilder, build_plans

    if kv_cache not in ("auto", "in-place", "ping-pong"):
        raise InputError(f"--kv-cache must be auto, in-place or ping-pong, got {kv_cache!r}")
    options = BuildOptions(
        precision=precision, workspace_gib=workspace_gib, timing_cache=timing_cache,
        version_compatible=version_compatible, self_cache=kv_cache.replace("-", "_"), scans=batch, samples=samples,
        attention_plugin=attention_plugin,
    )  # fmt: skip
    builder = TensorRTPlanBuilder(timing_cache)  # fails first, in one line, without TensorRT or a GPU
    with Progress(transient=True) as progress:
        task = progress.add_task("building", total=None)

        def on_graph(name: str, index: int, count: int) -> None:
            progress.update(task, description=f"building {name} ({index + 1}/{count})", completed=index, total=count)

        report = build_plans(engine, options, builder=builder, on_graph=on_graph)
    env = builder.environment()
    typer.echo(
        f"built {len(report.plans)} plans in {report.seconds:.0f} s with TensorRT {env.tensorrt_version} on {env.gpu} "
        f"({report.self_cache.replace('_', '-')} self cache); timing cache {builder.timing_cache_path}"
    )


def _open_backend(
    ckpt: Path | None,
    engine: Path | None,
    backend: str | None,
    device: str,
    vae: Path | None = None,
    context_map: str | None = None,
):
    from mindhier_rt.runtime.open import open_backend

    return open_backend(ckpt, engine, backend, device, vae, context_map)


@app.command()
def decode(
    out: Annotated[Path, typer.Option("--out", help="output folder for the PNGs and decode.json")],
    fmri: Annotated[Path | None, typer.Option("--fmri", help="voxels: .npy / .npz / .h5, one row per scan")] = None,
    subject: Annotated[str | None, typer.Option("--subject", help="subject id, e.g. subj01")] = None,
    class_label: Annotated[
        list[int] | None, typer.Option("--class-label", help="class-conditional models (VAR): a label; repeatable")
    ] = None,
    vae: Annotated[Path | None, typer.Option("--vae", help=VAE_HELP)] = None,
    context_map: Annotated[str | None, typer.Option("--context-map", help=CONTEXT_MAP_HELP)] = None,
    ckpt: Annotated[Path | None, typer.Option("--ckpt", help="checkpoint: decode with the PyTorch reference")] = None,
    engine: Annotated[Path | None, typer.Option("--engine", help="engine bundle from `mindhier-rt export`")] = None,
    backend: Annotated[
        str | None, typer.Option(help="torch or torch-fast (--ckpt); onnxruntime (default) or tensorrt (--engine)")
    ] = None,
    samples: Annotated[int, typer.Option(min=1, help="samples per scan")] = 1,
    seed: Annotated[int | None, typer.Option(min=0, help=RECORDED.format("seed of the token draws"))] = None,
    cfg_scale: Annotated[float | None, typer.Option("--cfg", min=0.0, help=RECORDED.format("guidance scale"))] = None,
    cfg_stop: Annotated[
        int | None, typer.Option(help=RECORDED.format("first scale without guidance (-1: none)"))
    ] = None,
    top_k: Annotated[int | None, typer.Option(min=0, help=RECORDED.format("top-k (0: off)"))] = None,
    top_p: Annotated[float | None, typer.Option(help=RECORDED.format("top-p (1: off)"))] = None,
    greedy: Annotated[
        bool | None, typer.Option("--greedy/--no-greedy", help=RECORDED.format("argmax instead of sampling"))
    ] = None,
    batch: Annotated[
        int, typer.Option(min=1, help="rows per forward pass: scans x samples, samples split when they exceed it")
    ] = 8,
    key: Annotated[str | None, typer.Option(help="array name inside .npz / .h5 files (default: voxels)")] = None,
    device: Annotated[str, typer.Option(help="torch device / cuda for the CUDA execution provider")] = "cpu",
) -> None:
    """Reconstruct images from fMRI scans, from a checkpoint (torch) or an engine bundle (onnxruntime).

    Class-conditional models (VAR checkpoints, e.g. `--ckpt var_d16.pth --vae vae_ch160v4096z32.pth`) decode
    `--class-label N` (repeatable) instead of `--fmri`/`--subject`.

    Writes scanNNNNN.png (scanNNNNN_sK.png with --samples), pooled.npy (per scan the encoder's pooled output:
    the brain-predicted CLIP embedding that `evaluate` selects samples and retrieves with) and decode.json.
    """
    from mindhier_rt.io import finite_rows, read_voxels
    from mindhier_rt.run_folder import claim_run_folder
    from mindhier_rt.sampling import SamplingConfig, recorded_sampling, with_overrides

    flags = {"seed": seed, "cfg_scale": cfg_scale, "cfg_stop": cfg_stop, "top_k": top_k, "top_p": top_p}
    flags["greedy"] = greedy
    with_overrides(SamplingConfig(), **flags)  # bad values are refused before anything is opened or written
    if (fmri is None) == (not class_label) or (fmri is not None and subject is None):
        raise InputError("give --fmri VOXELS --subject S (fMRI models) or --class-label N (class-conditional models)")
    with claim_run_folder(out) as folder:  # refused at once if the folder is unusable or another run holds it
        if class_label:
            runner = _open_backend(ckpt, engine, backend, device, vae, context_map)
            sampling, _ = with_overrides(recorded_sampling(runner), **flags)
            _decode_labels(runner, class_label, folder, sampling, samples, batch, {"ckpt": ckpt, "engine": engine})
            return
        voxels = read_voxels(fmri, key=key)
        runner = _open_backend(ckpt, engine, backend, device, vae, context_map)
        sampling, sampling_source = with_overrides(recorded_sampling(runner), **flags)
        if runner.cfg.generator.condition == "class":
            raise InputError(f"model {runner.cfg.name} is class-conditional: pass --class-label N instead of --fmri")
        expected = runner.cfg.encoder.voxel_count(subject)
        if voxels.shape[1] != expected:
            raise InputError(f"{fmri}: subject {subject} expects {expected} voxels per scan, got {voxels.shape[1]}")
        good = finite_rows(voxels)
        skipped = [{"scan": int(i), "reason": "NaN or inf voxels"} for i in (~good).nonzero()[0]]
        for s in skipped:
            typer.echo(f"warning: scan {s['scan']}: {s['reason']}, skipped", err=True)
        good_ids = good.nonzero()[0]
        report = {
            "ckpt": None if ckpt is None else str(ckpt),
            "engine": None if engine is None else str(engine),
            "fmri": str(fmri),
            "fmri_resolved": str(fmri.resolve()),
            "key": key,
            "subject": subject,
            "backend": runner.name,
            "context_map": runner.cfg.context_map,
            "sampling": sampling.to_dict(),
            "sampling_source": sampling_source,
            "samples": samples,
            "batch": batch,
        }
        _decode_scans(runner, voxels, good_ids, subject, folder, sampling, samples, batch, report, skipped)
    if not len(good_ids):
        raise typer.Exit(1)


def _decode_scans(
    runner: DecodeBackend,
    voxels: np.ndarray,
    good_ids: np.ndarray,
    subject: str,
    folder: RunFolder,
    sampling: SamplingConfig,
    samples: int,
    batch: int,
    report: dict,
    skipped: list[dict],
) -> None:
    """The batch job of `decode --fmri`: passes of at most ``batch`` (scan, sample) rows; decode.json says
    ``running`` before the first image and ``complete`` after the last (see ``run_folder``)."""
    import numpy as np
    import torch
    from rich.progress import Progress

    from mindhier_rt.io import atomic_write, save_png
    from mindhier_rt.pipeline import decode_passes, reconstruct

    out = folder.path
    folder.report("running", {**report, "images": [], "skipped": skipped})
    written: list[dict] = []
    pooled = None  # [scans, D]: the encoder's pooled output (brain-predicted CLIP embedding); NaN rows: skipped
    t0 = time.perf_counter()
    with Progress(transient=True) as progress:
        task = progress.add_task("decoding", total=len(good_ids) * samples)
        for p in decode_passes(len(good_ids), samples, batch):
            ids = good_ids[p.scans.start : p.scans.stop]
            rec = reconstruct(
                runner, torch.from_numpy(voxels[ids]), subject, sampling, samples=len(p.samples),
                scan_ids=torch.from_numpy(ids), first_sample=p.samples.start,
            )  # fmt: skip
            for row, scan in enumerate(ids):
                for col, s in enumerate(p.samples):
                    name = f"scan{scan:05d}.png" if samples == 1 else f"scan{scan:05d}_s{s}.png"
                    save_png(out / name, rec.images_NS3HW[row, col])
                    written.append({"scan": int(scan), "sample": s, "file": name})
            if rec.pooled_ND is not None:
                if pooled is None:
                    pooled = np.full((len(voxels), rec.pooled_ND.shape[1]), np.nan, dtype=np.float32)
                pooled[ids] = rec.pooled_ND.numpy()
            progress.advance(task, len(ids) * len(p.samples))
    seconds = time.perf_counter() - t0
    if pooled is not None:
        atomic_write(out / "pooled.npy", lambda tmp: np.save(tmp, pooled))
    written.sort(key=lambda w: (w["scan"], w["sample"]))
    report |= {"images": written, "pooled": None if pooled is None else "pooled.npy", "skipped": skipped}
    folder.report("complete", {**report, "seconds": round(seconds, 3)})
    typer.echo(
        f"decoded {len(good_ids)} scans ({len(skipped)} skipped) with {runner.name} into {out} in {seconds:.1f} s"
    )


def _decode_labels(
    runner: DecodeBackend,
    labels: list[int],
    folder: RunFolder,
    sampling: SamplingConfig,
    samples: int,
    batch: int,
    source: dict,
) -> None:
    """`decode --class-label`: images of class labels (VAR), written as classLLLL_NNN[_sK].png + decode.json."""
    import torch
    from rich.progress import Progress

    from mindhier_rt.io import save_png
    from mindhier_rt.pipeline import decode_passes, generate

    out = folder.path
    report = {k: None if v is None else str(v) for k, v in source.items()}
    report |= {"class_labels": list(labels), "backend": runner.name, "sampling": sampling.to_dict()}
    report |= {"samples": samples, "batch": batch}
    folder.report("running", {**report, "images": []})
    written: list[dict] = []
    t0 = time.perf_counter()
    with Progress(transient=True) as progress:
        task = progress.add_task("decoding", total=len(labels) * samples)
        for p in decode_passes(len(labels), samples, batch):
            ids = torch.arange(p.scans.start, p.scans.stop)
            rec = generate(
                runner, torch.tensor(labels)[ids], sampling, samples=len(p.samples), scan_ids=ids,
                first_sample=p.samples.start,
            )  # fmt: skip
            for row, i in enumerate(ids.tolist()):
                for col, s in enumerate(p.samples):
                    name = f"class{labels[i]:04d}_{i:03d}" + (f"_s{s}" if samples > 1 else "") + ".png"
                    save_png(out / name, rec.images_NS3HW[row, col])
                    written.append({"row": i, "class_label": labels[i], "sample": s, "file": name})
            progress.advance(task, len(ids) * len(p.samples))
    seconds = time.perf_counter() - t0
    written.sort(key=lambda w: (w["row"], w["sample"]))
    folder.report("complete", {**report, "images": written, "seconds": round(seconds, 3)})
    typer.echo(f"decoded {len(labels)} class labels with {runner.name} into {out} in {seconds:.1f} s")


PROFILE_BACKENDS = ("torch", "torch-fast", "onnxruntime")


def _profile_plan(
    engine: Path | None, preset_name: str | None, ckpt: Path | None, backend: str | None, export_dir: Path | None
) -> list[str]:
    """Check the source/backend combination of `profile`; return the backends to run, in order."""
    sources = [flag for flag, v in (("--engine", engine), ("--preset", preset_name), ("--ckpt", ckpt)) if v is not None]
    if not sources:
        raise InputError("give --preset P (random weights), --ckpt CKPT or --engine BUNDLE")
    if preset_name is not None and len(sources) > 1:
        raise InputError(f"--preset builds its own random-weight models: do not combine it with {sources[1]}")
    if backend is None:  # what the sources given can run
        names = ["torch"] if preset_name is not None or ckpt is not None else []
        names += ["onnxruntime"] if engine is not None else []
    else:
        names = [b.strip() for b in backend.split(",") if b.strip()]
    unknown = [b for b in names if b not in PROFILE_BACKENDS]
    if unknown or not names:
        raise InputError(
            f"unknown backend {', '.join(unknown) or backend!r}; choose from {', '.join(PROFILE_BACKENDS)}"
        )
    if len(set(names)) != len(names):
        raise InputError(f"--backend lists a backend twice: {backend}")
    for name in ("torch", "torch-fast"):
        if name in names and preset_name is None and ckpt is None:
            raise InputError(f"--backend {name} needs PyTorch weights: pass --ckpt CKPT or --preset P")
    if export_dir is not None and (engine is not None or "onnxruntime" not in names):
        raise InputError("--export-dir is where the onnxruntime bundle is exported; it needs --preset or --ckpt")
    return names


@app.command()
def profile(
    engine: Annotated[Path | None, typer.Option("--engine", help="engine bundle (onnxruntime)")] = None,
    preset_name: Annotated[str | None, typer.Option("--preset", help="random-weight models of this preset")] = None,
    ckpt: Annotated[Path | None, typer.Option("--ckpt", help="checkpoint (torch; exported for onnxruntime)")] = None,
    backend: Annotated[str | None, typer.Option(help="comma-separated: torch,torch-fast,onnxruntime")] = None,
    batch: Annotated[int, typer.Option(min=1, help="scans per decode")] = 1,
    samples: Annotated[int, typer.Option(min=1, help="samples per scan")] = 1,
    repeats: Annotated[int, typer.Option(min=1, help="timed runs (medians are reported)")] = 5,
    warmup: Annotated[int, typer.Option(min=0, help="untimed runs first")] = 1,
    subject: Annotated[str | None, typer.Option(help="subject id (default: the config's first)")] = None,
    seed: Annotated[int, typer.Option(min=0, help="seed of the random voxels and of the token draws")] = 0,
    cfg_scale: Annotated[float, typer.Option("--cfg", min=0.0, help="guidance scale (0 = off: half the rows)")] = 6.0,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the results to this JSON file")] = None,
    device: Annotated[str, typer.Option(help="torch device / cuda for the CUDA execution provider")] = "cpu",
    export_dir: Annotated[
        Path | None, typer.Option("--export-dir", help="export the onnxruntime bundle here (default: a temp folder)")
    ] = None,
) -> None:
    """Time every phase of the decode loop per backend, next to the cost model's FLOPs and bytes."""
    import contextlib
    import tempfile

    from mindhier_rt.io import write_json
    from mindhier_rt.profile import format_table, machine_info, profile_backends
    from mindhier_rt.sampling import SamplingConfig

    names = _profile_plan(engine, preset_name, ckpt, backend, export_dir)
    sampling = SamplingConfig(cfg_scale=cfg_scale, seed=seed)
    with contextlib.ExitStack() as stack:
        models = None
        if preset_name is not None:
            from mindhier_rt.config import preset
            from mindhier_rt.models.mindhier import MindHier

            models = MindHier.from_config(preset(preset_name), seed=0)
        elif ckpt is not None:
            from mindhier_rt.models.mindhier import MindHier

            models = MindHier.load(ckpt)
        bundle_path = engine
        if "onnxruntime" in names and bundle_path is None:
            from mindhier_rt.export.onnx_export import export_bundle

            assert models is not None
            bundle_path = export_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mindhier-rt-")))
            typer.echo(f"exporting the onnxruntime bundle to {bundle_path} ...", err=True)
            export_bundle(models, bundle_path, batch=batch, samples=samples, source=str(ckpt or preset_name))
        runners = []
        for name in names:
            if name == "torch":
                from mindhier_rt.runtime.torch_backend import TorchBackend

                assert models is not None
                runners.append(TorchBackend(models, device=device))
            elif name == "torch-fast":
                import copy

                from mindhier_rt.runtime.torch_fast import FastTorchBackend

                assert models is not None
                runners.append(FastTorchBackend(copy.deepcopy(models), device=device))  # it casts its models
            else:
                from mindhier_rt.runtime.onnxruntime_backend import OnnxRuntimeBackend

                providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else None
                runners.append(OnnxRuntimeBackend(bundle_path, providers=providers))
        if any(r.cfg != runners[0].cfg for r in runners):
            raise InputError(f"the checkpoint and {engine} hold different model configs: profile them separately")
        cfg = runners[0].cfg
        if cfg.encoder is None:
            raise InputError(f"profile times fMRI decoding; model {cfg.name} has no fMRI encoder")
        subject = subject or cfg.encoder.subjects[0][0]
        cfg.encoder.voxel_count(subject)  # ConfigError naming the known subjects
        typer.echo(f"profiling {', '.join(names)} in turns: {repeats} runs each after {warmup} warm-up ...", err=True)
        results = profile_backends(
            runners, subject, batch, samples, sampling, repeats=repeats, warmup=warmup, seed=seed
        )
    medians = {r["backend"]: r["end_to_end"]["median_ms"] for r in results}
    ratio = medians["onnxruntime"] / medians["torch"] if {"torch", "onnxruntime"} <= medians.keys() else None
    machine = machine_info(device)
    typer.echo(
        f"{cfg.name}, {batch} scan(s) x {samples} sample(s), subject {subject}, cfg {cfg_scale}; "
        f"{machine['cpu']} ({machine['cpus_usable']} CPUs), torch {machine['torch']}, "
        f"onnxruntime {machine['onnxruntime']}, device {device}"
    )
    typer.echo(format_table(results))
    if ratio is not None:
        typer.echo(f"onnxruntime / torch end to end: {ratio:.3f}")
    if json_out is not None:
        write_json(
            json_out,
            {
                "machine": machine,
                "settings": {
                    "source": {
                        "preset": preset_name,
                        "ckpt": None if ckpt is None else str(ckpt),
                        "engine": None if engine is None else str(engine),
                    },
                    "config": cfg.name,
                    "backends": names,
                    "subject": subject,
                    "batch": batch,
                    "samples": samples,
                    "repeats": repeats,
                    "warmup": warmup,
                    "seed": seed,
                    "sampling": sampling.to_dict(),
                    "device": device,
                },
                "results": results,
                "end_to_end_median_ms": medians,
                "ratio_onnxruntime_over_torch": ratio,
            },
        )
        typer.echo(f"wrote {json_out}")


@app.command()
def synth(
    out: Annotated[Path, typer.Option("--out", help="folder for the synthetic data set")],
    preset_name: Annotated[
        str, typer.Option("--preset", help="subjects and image size come from this preset")
    ] = "demo",
    n_train: Annotated[int, typer.Option(min=1)] = 6000,
    n_test: Annotated[int, typer.Option(min=2)] = 100,
    repeats: Annotated[int, typer.Option(min=1, help="presentations of each test image")] = 3,
    seed: Annotated[int, typer.Option(min=0)] = 0,
) -> None:
    """Write the synthetic fMRI benchmark in the on-disk layout the NSD loader reads."""
    from mindhier_rt.data.nsd import synth_command_impl

    root = synth_command_impl(out, preset_name, n_train=n_train, n_test=n_test, repeats=repeats, seed=seed)
    typer.echo(f"wrote {root}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="output folder")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(min=0)] = 0,
    steps_scale: Annotated[float, typer.Option(min=0.001, help="multiply every training step count")] = 1.0,
    quick: Annotated[
        bool, typer.Option(help="a first picture in about a minute: a tenth of the training (scores near chance)")
    ] = False,
    progress: Annotated[bool, typer.Option(help="progress bars")] = True,
) -> None:
    """Synthesise data, train tiny models, decode the held-out scans, write images and metrics."""
    from mindhier_rt.demo import DemoSettings, run_demo

    settings = DemoSettings(seed=seed).scaled(steps_scale)
    if quick:
        settings = settings.quick()
    metrics = run_demo(out, settings, progress=progress, say=typer.echo)
    keys = ("pixcorr", "ssim", "two_way_pixel", "two_way_feature", "n_test", "backend", "seconds")
    typer.echo("metrics: " + ", ".join(f"{k}={metrics[k]}" for k in keys) + " (two-way chance: 0.5)")
    files = ("reconstructions.png", "progression.png", "metrics.png", "losses.png", "metrics.json")
    typer.echo(f"wrote {', '.join(str(out / f) for f in files if (out / f).exists())}")


@app.command()
def evaluate(
    recon: Annotated[Path, typer.Option("--recon", help="a `mindhier-rt decode` folder of test-split scans")],
    data: Annotated[Path, typer.Option("--data", help="data folder: mindhier-rt layout or the MindEye2 NSD files")],
    subject: Annotated[str, typer.Option("--subject", help="subject id, e.g. subj01")],
    weights_dir: Annotated[
        Path | None,
        typer.Option(
            "--weights-dir",
            help="folder of AlexNet, Inception-v3, EfficientNet-B1, SwAV, CLIP weights (searched first; then "
            "~/.cache/mindhier-rt/weights, torch.hub's, CLIP's and the Hugging Face hub's caches)",
        ),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the results to this JSON file")] = None,
    metrics: Annotated[
        str | None,
        typer.Option(help="comma-separated: pixcorr,ssim,alexnet2,alexnet5,inception,clip,effnet,swav,retrieval"),
    ] = None,
    oracle_best_of_n: Annotated[
        bool, typer.Option("--oracle-best-of-n", help="keep the sample closest to the GROUND TRUTH (an oracle)")
    ] = False,
    clip_model: Annotated[str, typer.Option(help="open_clip model name; weights file <name>.pt")] = "ViT-L-14",
    device: Annotated[str, typer.Option(help="torch device of the networks")] = "cpu",
    batch: Annotated[int, typer.Option(min=1, help="images per network forward pass")] = 16,
) -> None:
    """Score reconstructions with the NSD protocol: PixCorr, SSIM, AlexNet(2/5), Inception, CLIP, EffNet-B, SwAV,
    retrieval.

    Each decoded scan is matched to the subject's test-split row (repeats averaged) holding the same voxels, which
    gives its ground-truth image. With several samples per scan, the one most CLIP-similar to the brain-predicted
    embedding (decode's pooled.npy) is kept; --oracle-best-of-n compares with the ground truth instead and the
    results say so. Network weights come from local files in --weights-dir only.
    """
    from mindhier_rt.evaluate import LABELS, evaluate_decode
    from mindhier_rt.io import write_json

    names = None if metrics is None else [m.strip() for m in metrics.split(",") if m.strip()]
    result = evaluate_decode(
        recon, data, subject, weights_dir, names, clip_model=clip_model,
        oracle_best_of_n=oracle_best_of_n, device=device, batch=batch,
        on_progress=lambda msg: typer.echo(f"{msg} ...", err=True),
    )  # fmt: skip
    sel = result["selection"]
    typer.echo(f"{result['n_images']} test images of {subject}, {result['samples_per_scan']} sample(s) per scan")
    typer.echo(f"selection: {sel['method']}: {sel['note']}")
    for name, value in result["metrics"].items():
        if name in ("pixcorr", "ssim"):
            shown = f"{value:.3f}"
        elif name in ("effnet", "swav"):
            shown = f"{value:.3f}  (distance, lower is better)"
        else:
            shown = f"{100 * value:.1f}%  (two-way, chance 50%)"
        typer.echo(f"  {LABELS[name]:<11} {shown}")
    if result["retrieval"] is not None:
        r = result["retrieval"]
        typer.echo(
            f"  retrieval   image {100 * r['image_top1']:.1f}%, brain {100 * r['brain_top1']:.1f}% "
            f"(top-1 of {r['n_way']}, chance {100 * r['chance']:.1f}%)"
        )
    elif result["retrieval_note"]:
        typer.echo(f"  retrieval   not computed: {result['retrieval_note']}")
    if result["oracle_best_of_n"]:
        typer.echo("ORACLE best-of-N: samples were chosen with the ground truth; these are not fair scores", err=True)
    if json_out is not None:
        write_json(json_out, result)
        typer.echo(f"wrote {json_out}")


# The default steps and learning rates of the train commands are the demo's recipe (DemoSettings);
# tests/test_train.py checks that they agree. Stages 1 and 2 also run under torchrun, one process per GPU:
#   torchrun --standalone --nproc_per_node N -m mindhier_rt.cli train stage2 ...   (or: --no-python mindhier-rt ...)
train_app = typer.Typer(help="Train the VQ-VAE, stage 1 (encoder) or stage 2 (generator) on a data folder.")
app.add_typer(train_app, name="train")


def _train_setup(data_dir: Path, preset_name: str, init: Path | None, need: tuple[str, ...]):
    from mindhier_rt.config import preset
    from mindhier_rt.data import open_dataset
    from mindhier_rt.models.mindhier import MindHier

    data = open_dataset(data_dir)
    if init is not None:
        models = MindHier.load(init, require=need)
    else:
        if need:
            raise InputError(f"this stage needs trained {', '.join(need)}: pass --init CKPT from the earlier stages")
        models = MindHier.from_config(preset(preset_name), seed=0)
    for subject, n in data.subjects.items():
        if subject in dict(models.cfg.encoder.subjects) and models.cfg.encoder.voxel_count(subject) != n:
            raise InputError(
                f"{data_dir}: {subject} has {n} voxels, the model expects {models.cfg.encoder.voxel_count(subject)}"
            )
    return data, models


DataOpt = Annotated[
    Path, typer.Option("--data", help="data folder: the mindhier-rt layout (`synth`) or the MindEye2 NSD files")
]
RunOpt = Annotated[Path, typer.Option("--out", help="run folder: state, loss log, model.safetensors")]
InitOpt = Annotated[Path | None, typer.Option("--init", help="checkpoint to start from (earlier stages' weights)")]
PresetOpt = Annotated[str, typer.Option("--preset", help="model preset when starting from scratch")]
StepsOpt = Annotated[int, typer.Option(min=1)]
ResumeOpt = Annotated[bool, typer.Option(help="continue from the run folder's saved state")]
AmpOpt = Annotated[str, typer.Option(help="mixed precision of the loss: off, bf16 or fp16 (fp16 scales gradients)")]
SaveEveryOpt = Annotated[
    int, typer.Option(min=1, help="steps between saves of the training state (also saved at the end and on Ctrl-C)")
]


def _tcfg(steps: int, batch_size: int, lr: float, seed: int, amp: str = "off", save_every: int = 100):
    from mindhier_rt.train.loop import TrainConfig, amp_dtype

    amp_dtype(amp)  # validates
    return TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, amp=amp, save_every=save_every)


def _distributed(batch_size: int):
    """This process's place in a torchrun launch (a plain single process without one); the process group is
    closed at exit. The global batch must split evenly over the processes."""
    import atexit

    from mindhier_rt.train.distributed import init_distributed

    ctx = init_distributed()
    atexit.register(ctx.close)
    if batch_size % ctx.world_size:
        raise InputError(f"--batch-size {batch_size} (the global batch) must divide by {ctx.world_size} processes")
    return ctx


@train_app.command("vqvae")
def train_vqvae_cmd(
    data: DataOpt,
    out: RunOpt,
    init: InitOpt = None,
    preset_name: PresetOpt = "demo",
    steps: StepsOpt = 600,
    batch_size: StepsOpt = 32,
    lr: float = 2e-3,
    seed: int = 0,
    resume: ResumeOpt = True,
    save_every: SaveEveryOpt = 100,
) -> None:
    """Reconstruction + codebook/commitment losses on the training images (one process: not under torchrun)."""
    import os

    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("train vqvae runs in one process (its codebook restarts use whole batches); drop torchrun")

    from mindhier_rt.train.stages import load_trials, train_vqvae

    ds, models = _train_setup(data, preset_name, init, ())
    train_index = torch.unique(torch.cat([t.image_index_n for t in load_trials(ds)]))
    images = torch.from_numpy(ds.images(train_index.numpy()))
    train_vqvae(models, images, _tcfg(steps, batch_size, lr, seed, save_every=save_every), out, resume=resume)
    models.save(out / "model.safetensors")
    typer.echo(f"wrote {out / 'model.safetensors'}")


@train_app.command("stage1")
def train_stage1_cmd(
    data: DataOpt,
    out: RunOpt,
    init: InitOpt = None,
    preset_name: PresetOpt = "demo",
    steps: StepsOpt = 600,
    batch_size: StepsOpt = 32,
    lr: float = 1e-3,
    seed: int = 0,
    resume: ResumeOpt = True,
    teacher_seed: Annotated[int, typer.Option(help="seed of the frozen random-ViT teacher")] = 0,
    teacher: Annotated[str, typer.Option(help="random-vit (synthetic data) or clip (CLIP ViT-L/14, real data)")] = (
        "random-vit"
    ),
    clip_weights: Annotated[Path | None, typer.Option(help="local CLIP ViT-L/14 checkpoint for --teacher clip")] = None,
    feature_cache: Annotated[
        Path | None, typer.Option(help="folder of teacher features: computed once for the training images, then reused")
    ] = None,
    amp: AmpOpt = "off",
    save_every: SaveEveryOpt = 100,
) -> None:
    """Align the encoder's levels to a frozen teacher's layer taps (hierarchical MSE + SoftCLIP).

    Teachers: the frozen random ViT of the synthetic benchmark (no download), or CLIP ViT-L/14 through
    open_clip with weights from a local file (needs the `train` extra and a 768-wide, 257-token config).
    With --feature-cache the teacher runs once per training image and the features are read from disk
    afterwards (keyed by teacher, its weights and the data set); without it they are computed in memory.
    """
    import torch

    from mindhier_rt.train.stages import load_trials, train_stage1
    from mindhier_rt.train.teacher import HashTextTeacher, RandomViTTeacher

    ctx = _distributed(batch_size)
    ds, models = _train_setup(data, preset_name, init, ())
    cfg = models.cfg
    if teacher == "clip":
        from mindhier_rt.train.clip_teacher import ClipTeacher

        if (cfg.context_dim, cfg.context_tokens, cfg.encoder.text_tokens) != (768, 257, 77):
            raise InputError(
                f"the CLIP teacher gives 257 x 768 image and 77 x 768 text tokens; preset {cfg.name} expects "
                f"{cfg.context_tokens} x {cfg.context_dim} and {cfg.encoder.text_tokens} text tokens"
            )
        image_teacher = text_teacher = ClipTeacher(cfg.schedule.clip_layers, clip_weights)
    elif teacher == "random-vit":
        image_teacher = RandomViTTeacher(cfg, seed=teacher_seed)
        text_teacher = HashTextTeacher(cfg, seed=teacher_seed)
    else:
        raise InputError(f"unknown teacher {teacher!r}; choose random-vit or clip")
    trials = load_trials(ds)
    cached = None
    if feature_cache is None:
        images = torch.from_numpy(ds.images())
        levels = torch.cat([image_teacher.image_levels(images[i : i + 256]) for i in range(0, len(images), 256)])
        text = text_teacher.text_tokens(ds.captions())
    else:
        from mindhier_rt.data import dataset_id
        from mindhier_rt.train.feature_cache import FeatureCache, teacher_features, weights_hash

        taps = ".".join(map(str, cfg.schedule.clip_layers))
        cache = FeatureCache(
            feature_cache, f"{teacher}-L{taps}-t{cfg.encoder.text_tokens}",
            weights_hash(*dict.fromkeys((image_teacher, text_teacher))), dataset_id(ds),
        )  # fmt: skip
        needed = torch.unique(torch.cat([t.image_index_n for t in trials])).numpy()
        with ctx.main_first():  # under torchrun rank 0 fills the cache, the others then read it
            cached = teacher_features(cache, needed, ds.images, ds.captions, image_teacher, text_teacher)
        levels, text = cached.levels, cached.text
    try:
        tcfg = _tcfg(steps, batch_size, lr, seed, amp, save_every)
        train_stage1(models, trials, levels, text, tcfg, out, resume=resume, dist=ctx)
    finally:
        if cached is not None:
            cached.close()
    if ctx.is_main:
        models.save(out / "model.safetensors")
        typer.echo(f"wrote {out / 'model.safetensors'}")


@train_app.command("stage2")
def train_stage2_cmd(
    data: DataOpt,
    out: RunOpt,
    init: InitOpt = None,
    steps: StepsOpt = 1100,
    batch_size: StepsOpt = 32,
    lr: float = 3e-3,
    seed: int = 0,
    resume: ResumeOpt = True,
    cond_drop: Annotated[float, typer.Option(min=0.0, max=1.0, help="condition dropout for guidance")] = 0.1,
    amp: AmpOpt = "off",
    grad_checkpoint: Annotated[
        bool, typer.Option("--grad-checkpoint", help="recompute each generator block in backward (less memory)")
    ] = False,
    fsdp: Annotated[bool, typer.Option(help="under torchrun: shard the generator (FSDP), else DDP replicas")] = True,
    save_every: SaveEveryOpt = 100,
) -> None:
    """Train the generator on the token pyramids with the encoder and VQ-VAE frozen (needs --init).

    Prints the estimated GPU memory per process before training starts. Under torchrun the generator is sharded
    over the processes (FSDP, one unit per block; --no-fsdp: DDP replicas) and --batch-size is the global batch.
    """
    import torch

    from mindhier_rt.train.memory import estimate_stage2_memory, memory_table
    from mindhier_rt.train.stages import load_trials, train_stage2

    ctx = _distributed(batch_size)
    tcfg = _tcfg(steps, batch_size, lr, seed, amp, save_every)
    ds, models = _train_setup(data, "demo", init, ("encoder", "vqvae"))
    if ctx.is_main:
        shard = fsdp and ctx.world_size > 1
        per_gpu = batch_size // ctx.world_size
        est = estimate_stage2_memory(models.cfg, per_gpu, ctx.world_size, amp, grad_checkpoint, shard)
        typer.echo(memory_table(models.cfg, est, per_gpu, ctx.world_size, amp, grad_checkpoint, shard))
    images = torch.from_numpy(ds.images())
    train_stage2(
        models, load_trials(ds), images, tcfg, out, cond_drop, resume=resume, dist=ctx, fsdp=fsdp,
        grad_checkpoint=grad_checkpoint,
    )  # fmt: skip
    if ctx.is_main:
        models.save(out / "model.safetensors")
        typer.echo(f"wrote {out / 'model.safetensors'}")


@train_app.command("memory")
def train_memory_cmd(
    preset_name: Annotated[str, typer.Option("--preset", help="model preset whose generator is trained")] = (
        "mindhier-512"
    ),
    batch_per_gpu: Annotated[int, typer.Option(min=1, help="samples per GPU and step")] = 4,
    gpus: Annotated[int, typer.Option(min=1, help="processes (GPUs) of the torchrun launch")] = 8,
    amp: AmpOpt = "bf16",
    grad_checkpoint: Annotated[bool, typer.Option("--grad-checkpoint/--no-grad-checkpoint")] = True,
    fsdp: Annotated[bool, typer.Option(help="shard over the GPUs (else DDP replicas)")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output (bytes)")] = False,
) -> None:
    """Estimated GPU memory per process of stage 2 for a preset, without building or training anything."""
    from mindhier_rt.config import preset
    from mindhier_rt.train.memory import estimate_stage2_memory, memory_table

    cfg = preset(preset_name)
    shard = fsdp and gpus > 1
    est = estimate_stage2_memory(cfg, batch_per_gpu, gpus, amp, grad_checkpoint, shard)
    if as_json:
        _echo_json(est)
        return
    typer.echo(memory_table(cfg, est, batch_per_gpu, gpus, amp, grad_checkpoint, shard))


# ---- serving -------------------------------------------------------------------------------------------
def _gpu_ids(gpus: str | None, device: str) -> tuple[int, ...]:
    if gpus:
        try:
            return tuple(int(g) for g in gpus.split(","))
        except ValueError as e:
            raise InputError(f"--gpus takes GPU ids like 0,1; got {gpus!r}") from e
    kind, _, index = device.partition(":")
    if device == "cpu":
        return ()
    if kind != "cuda" or (index and not index.isdigit()):
        raise InputError(f"--device takes cpu, cuda or cuda:N; got {device!r}")
    return (int(index) if index else 0,)


def _repository_spec(engine, ckpt, backend, device, gpus, max_batch, instances, max_samples):
    from mindhier_rt.serve.repository import RepositorySpec
    from mindhier_rt.serve.service import Limits

    # a request's scans ride on Triton's batch axis, which max_batch bounds
    limits = Limits(max_scans=max_batch, max_samples=max_samples, max_rows=max(max_samples, 16))
    return RepositorySpec(
        engine=engine, ckpt=ckpt, backend=backend, max_batch=max_batch, instances=instances,
        gpus=_gpu_ids(gpus, device), limits=limits,
    )  # fmt: skip


ServeEngine = Annotated[Path | None, typer.Option("--engine", help="engine bundle (onnxruntime, tensorrt)")]
ServeCkpt = Annotated[Path | None, typer.Option("--ckpt", help="checkpoint (torch, torch-fast)")]
ServeBackend = Annotated[
    str | None, typer.Option(help="onnxruntime (default for --engine), tensorrt, torch, torch-fast")
]
ServeGpus = Annotated[str | None, typer.Option(help="GPU ids for the model instances, e.g. 0,1 (default: CPU)")]
ServeMaxBatch = Annotated[int, typer.Option(min=1, help="scans in one batch: of one request, or joined by the batcher")]
ServeInstances = Annotated[int, typer.Option(min=1, help="model instances per GPU (or on the CPU)")]
ServeMaxSamples = Annotated[int, typer.Option(min=1, help="most samples per scan a request may ask for")]


@app.command()
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
    import signal
    import tempfile

    from mindhier_rt.serve.repository import MODEL, PROGRESSIVE_MODEL, write_repository
    from mindhier_rt.serve.server import Ports, start_server, wait_ready

    spec = _repository_spec(engine, ckpt, backend, device, gpus, max_batch, instances, max_samples)
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    with tempfile.TemporaryDirectory(prefix="mindhier-serve-") as work:
        repo = write_repository(spec, Path(work) / "repository", copy=False)
        server = start_server(repo, Ports(http_port, grpc_port, metrics_port), Path(work), host=host)
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            wait_ready(server, [MODEL, PROGRESSIVE_MODEL])
            typer.echo(
                f"serving {MODEL} and {PROGRESSIVE_MODEL} ({server.process.pid}): HTTP http://{host}:{http_port}, "
                f"gRPC {host}:{grpc_port}, metrics http://{host}:{metrics_port}/metrics; Ctrl-C stops"
            )
            while stop["signal"] is None and server.process.poll() is None:
                time.sleep(0.2)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            code = server.stop()  # finishes the requests in flight
        if stop["signal"] is None:
            raise MindhierError(f"tritonserver exited with code {code}:\n{server.log_tail()}")
        typer.echo(f"stopped (tritonserver exit code {code})")


@app.command("export-triton")
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
    from mindhier_rt.serve.repository import write_repository

    spec = _repository_spec(engine, ckpt, backend, "cpu", gpus, max_batch, instances, max_samples)
    repo = write_repository(spec, out, copy=True)
    where = f"GPUs {list(spec.gpus)}" if spec.gpus else "the CPU"
    typer.echo(f"wrote {repo}: models mindhier, mindhier_progressive ({instances} instance(s) on {where})")


@app.command()
def client(
    url: Annotated[str, typer.Option(help="server address, e.g. 127.0.0.1:8000 (HTTP) or 127.0.0.1:8001 (gRPC)")],
    fmri: Annotated[Path, typer.Option("--fmri", help="voxels: .npy / .npz / .h5, one row per scan")],
    subject: Annotated[str, typer.Option("--subject", help="subject id, e.g. subj01")],
    out: Annotated[Path, typer.Option("--out", help="output folder for the PNGs and decode.json")],
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
    key: Annotated[str | None, typer.Option(help="array name inside .npz / .h5 files (default: voxels)")] = None,
) -> None:
    """Decode scans through a running `mindhier-rt serve` (or a stock server with the exported repository):
    writes the PNGs and decode.json that `decode` writes for the same settings."""
    import numpy as np

    from mindhier_rt.io import atomic_write_bytes, finite_rows, png_bytes_uint8, read_voxels
    from mindhier_rt.run_folder import claim_run_folder
    from mindhier_rt.serve.client import RemoteDecoder, Settings

    wanted = None
    if previews is not None:
        try:
            wanted = [int(x) for x in previews.split(",") if x.strip()]
        except ValueError as e:
            raise InputError(f"--previews takes scale indices like 2,5; got {previews!r}") from e
    voxels = read_voxels(fmri, key=key)
    settings = Settings(samples, seed, cfg_scale, cfg_stop, top_k, top_p, greedy)
    remote = RemoteDecoder(url, protocol, concurrency)
    report = {
        "ckpt": None, "engine": None, "server": url, "protocol": protocol, "fmri": str(fmri),
        "fmri_resolved": str(fmri.resolve()), "key": key, "subject": subject, "backend": f"triton ({protocol})",
        "sampling": remote.sampling_used(settings), "samples": samples, "pooled": None,
    }  # fmt: skip
    good = finite_rows(voxels)
    skipped = [{"scan": int(i), "reason": "NaN or inf voxels"} for i in (~good).nonzero()[0]]
    for s in skipped:
        typer.echo(f"warning: scan {s['scan']}: {s['reason']}, skipped", err=True)
    ids = good.nonzero()[0]
    with claim_run_folder(out) as folder:  # one run per folder; decode.json says running, then complete
        folder.report("running", {**report, "images": [], "skipped": skipped})
        t0 = time.perf_counter()
        written: list[dict] = []

        def write(scan: int, images_SHW3: np.ndarray, suffix: str = "") -> None:
            for s in range(images_SHW3.shape[0]):
                name = f"scan{scan:05d}{suffix}" + ("" if samples == 1 else f"_s{s}") + ".png"
                atomic_write_bytes(out / name, png_bytes_uint8(images_SHW3[s]))
                if not suffix:
                    written.append({"scan": int(scan), "sample": s, "file": name})

        if wanted is None:
            images, _ = remote.decode(voxels[ids].astype(np.float32), subject, ids.astype(np.int64), settings)
            for row, scan in enumerate(ids):
                write(int(scan), images[row])
        else:
            for scan in ids:
                one = voxels[scan : scan + 1].astype(np.float32)
                for scale, images, tokens in remote.stream(one, subject, int(scan), settings, wanted):
                    final = tokens.shape[-1] > 0  # previews carry no tokens
                    write(int(scan), images[0], suffix="" if final else f"_scale{scale}")
        seconds = time.perf_counter() - t0
        report |= {"images": written, "skipped": skipped, "seconds": round(seconds, 3)}
        folder.report("complete", report)
    typer.echo(f"decoded {len(ids)} scans ({len(skipped)} skipped) through {url} into {out} in {seconds:.1f} s")
    if not len(ids):
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry: run the app, turning our errors into one line and a non-zero exit."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except TrainingInterrupted as e:  # the state is saved: a clean stop, with the shell's code for a signal
        typer.echo(str(e), err=True)
        sys.exit(128 + e.signum)
    except MissingDependencyError as e:  # TensorRT, a GPU, cuda-python: exit code 2
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except MindhierError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
