"""Decoding commands: decode (scans or class labels -> images), profile (phase timings) and evaluate (NSD metrics)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mindhier_rt.cli.options import (
    CONTEXT_MAP_HELP,
    DECODE_OUT_HELP,
    FMRI_HELP,
    RECORDED,
    SUBJECT_HELP,
    VAE_HELP,
    ArrayKey,
    JsonOut,
    progress_bar,
    warn_skipped,
)
from mindhier_rt.errors import InputError


def decode(
    out: Annotated[Path, typer.Option("--out", help=DECODE_OUT_HELP)],
    fmri: Annotated[Path | None, typer.Option("--fmri", help=FMRI_HELP)] = None,
    subject: Annotated[str | None, typer.Option("--subject", help=SUBJECT_HELP)] = None,
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
    key: ArrayKey = None,
    device: Annotated[str, typer.Option(help="torch device / cuda for the CUDA execution provider")] = "cpu",
) -> None:
    """Reconstruct images from fMRI scans, from a checkpoint (torch) or an engine bundle (onnxruntime).

    Class-conditional models (VAR checkpoints, e.g. `--ckpt var_d16.pth --vae vae_ch160v4096z32.pth`) decode
    `--class-label N` (repeatable) instead of `--fmri`/`--subject`.

    Writes scanNNNNN.png (scanNNNNN_sK.png with --samples), pooled.npy (per scan the encoder's pooled output:
    the brain-predicted CLIP embedding that `evaluate` selects samples and retrieves with) and decode.json.
    """
    from mindhier_rt.decode_job import check_voxels, decode_labels, decode_scans, scan_report, skipped_scans
    from mindhier_rt.io import read_voxels
    from mindhier_rt.run_folder import claim_run_folder
    from mindhier_rt.runtime.open import open_backend
    from mindhier_rt.sampling import SamplingConfig, recorded_sampling, with_overrides

    flags = {"seed": seed, "cfg_scale": cfg_scale, "cfg_stop": cfg_stop, "top_k": top_k, "top_p": top_p}
    flags["greedy"] = greedy
    with_overrides(SamplingConfig(), **flags)  # bad values are refused before anything is opened or written
    if (fmri is None) == (not class_label) or (fmri is not None and subject is None):
        raise InputError("give --fmri VOXELS --subject S (fMRI models) or --class-label N (class-conditional models)")
    with claim_run_folder(out) as folder:  # refused at once if the folder is unusable or another run holds it
        if class_label:
            runner = open_backend(ckpt, engine, backend, device, vae, context_map)
            sampling, _ = with_overrides(recorded_sampling(runner), **flags)
            source = {"ckpt": ckpt, "engine": engine}
            with progress_bar("decoding", len(class_label) * samples) as advance:
                done = decode_labels(runner, class_label, folder, sampling, samples, batch, source, advance)
            typer.echo(f"decoded {done.decoded} class labels with {runner.name} into {out} in {done.seconds:.1f} s")
            return
        assert fmri is not None and subject is not None
        voxels = read_voxels(fmri, key=key)
        runner = open_backend(ckpt, engine, backend, device, vae, context_map)
        sampling, sampling_source = with_overrides(recorded_sampling(runner), **flags)
        check_voxels(runner, voxels, subject, fmri)
        good_ids, skipped = skipped_scans(voxels)
        warn_skipped(skipped)
        report = scan_report(runner, ckpt, engine, fmri, key, subject, sampling, sampling_source, samples, batch)
        with progress_bar("decoding", len(good_ids) * samples) as advance:
            done = decode_scans(
                runner, voxels, good_ids, subject, folder, sampling, samples, batch, report, skipped, advance
            )
        typer.echo(
            f"decoded {done.decoded} scans ({done.skipped} skipped) with {runner.name} into {out} "
            f"in {done.seconds:.1f} s"
        )
    if not len(good_ids):
        raise typer.Exit(1)


def profile(
    engine: Annotated[
        Path | None, typer.Option("--engine", help="engine bundle (onnxruntime; tensorrt after `build`)")
    ] = None,
    preset_name: Annotated[str | None, typer.Option("--preset", help="random-weight models of this preset")] = None,
    ckpt: Annotated[
        Path | None, typer.Option("--ckpt", help="checkpoint (torch, torch-fast; exported for onnxruntime)")
    ] = None,
    backend: Annotated[str | None, typer.Option(help="comma-separated: torch,torch-fast,onnxruntime,tensorrt")] = None,
    batch: Annotated[int, typer.Option(min=1, help="scans per decode")] = 1,
    samples: Annotated[int, typer.Option(min=1, help="samples per scan")] = 1,
    repeats: Annotated[int, typer.Option(min=1, help="timed runs (medians are reported)")] = 5,
    warmup: Annotated[int, typer.Option(min=0, help="untimed runs first")] = 1,
    subject: Annotated[str | None, typer.Option(help="subject id (default: the config's first)")] = None,
    seed: Annotated[int, typer.Option(min=0, help="seed of the random voxels and of the token draws")] = 0,
    cfg_scale: Annotated[float, typer.Option("--cfg", min=0.0, help="guidance scale (0 = off: half the rows)")] = 6.0,
    json_out: JsonOut = None,
    device: Annotated[str, typer.Option(help="torch device / cuda for the CUDA execution provider")] = "cpu",
    export_dir: Annotated[
        Path | None, typer.Option("--export-dir", help="export the onnxruntime bundle here (default: a temp folder)")
    ] = None,
) -> None:
    """Time every phase of the decode loop per backend, next to the cost model's FLOPs and bytes.

    Backends open as decode opens them: torch and torch-fast run --preset's random weights or --ckpt, onnxruntime
    runs --engine (or a bundle exported from the weights), tensorrt runs the plans of a built --engine.
    """
    from mindhier_rt.io import write_json
    from mindhier_rt.profile import format_table, machine_info, profile_backends
    from mindhier_rt.profile_plan import (
        ProfileSources,
        end_to_end_medians,
        onnxruntime_over_torch,
        open_profile_backends,
        plan_backends,
        profile_report,
    )
    from mindhier_rt.sampling import SamplingConfig

    sources = ProfileSources(preset_name, ckpt, engine)
    names = plan_backends(sources, backend, export_dir)
    sampling = SamplingConfig(cfg_scale=cfg_scale, seed=seed)

    def on_export(bundle: Path) -> None:
        typer.echo(f"exporting the onnxruntime bundle to {bundle} ...", err=True)

    with open_profile_backends(sources, names, device, batch, samples, export_dir, on_export) as runners:
        cfg = runners[0].cfg
        encoder = cfg.encoder
        assert encoder is not None  # open_profile_backends refuses models without one
        subject = subject or encoder.subjects[0][0]
        encoder.voxel_count(subject)  # ConfigError naming the known subjects
        typer.echo(f"profiling {', '.join(names)} in turns: {repeats} runs each after {warmup} warm-up ...", err=True)
        results = profile_backends(
            runners, subject, batch, samples, sampling, repeats=repeats, warmup=warmup, seed=seed
        )
    ratio = onnxruntime_over_torch(end_to_end_medians(results))
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
        report = profile_report(
            machine, sources, names, results, subject, batch, samples, repeats, warmup, seed, sampling, device
        )
        write_json(json_out, report)
        typer.echo(f"wrote {json_out}")


def evaluate(
    recon: Annotated[Path, typer.Option("--recon", help="a `mindhier-rt decode` folder of test-split scans")],
    data: Annotated[Path, typer.Option("--data", help="data folder: mindhier-rt layout or the MindEye2 NSD files")],
    subject: Annotated[str, typer.Option("--subject", help=SUBJECT_HELP)],
    weights_dir: Annotated[
        Path | None,
        typer.Option(
            "--weights-dir",
            help="folder of AlexNet, Inception-v3, EfficientNet-B1, SwAV, CLIP weights (searched first; then "
            "~/.cache/mindhier-rt/weights, torch.hub's, CLIP's and the Hugging Face hub's caches)",
        ),
    ] = None,
    json_out: JsonOut = None,
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
