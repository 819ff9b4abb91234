"""Model and engine commands: info, init, export (checkpoint -> bundle) and build (bundle -> TensorRT plans)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mindhier_rt.cli.options import CONTEXT_MAP_HELP, PRESETS_HELP, VAE_HELP, echo_json
from mindhier_rt.errors import InputError


def info(
    preset_name: Annotated[str, typer.Option("--preset", help=PRESETS_HELP)] = "tiny",
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
        echo_json(report)
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


def init(
    out: Annotated[Path, typer.Option("--out", help="checkpoint file to write (.safetensors)")],
    preset_name: Annotated[str, typer.Option("--preset", help=PRESETS_HELP)] = "tiny",
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
