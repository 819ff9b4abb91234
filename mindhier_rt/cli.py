"""`mindhier-rt`: the command line. Entry points print; the library logs.

Every MindhierError is printed as one line (``error: ...``) with exit code 1, never a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from mindhier_rt.errors import InputError, MindhierError

app = typer.Typer(
    name="mindhier-rt",
    help="MindHier fMRI-to-image reconstruction: reference models, engines and benchmarks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

log = logging.getLogger("mindhier_rt")


def _echo_json(obj: object) -> None:
    typer.echo(json.dumps(obj, indent=2))


@app.command()
def info(
    preset_name: Annotated[str, typer.Option("--preset", help="tiny, small, mindhier-256 or mindhier-512")] = "tiny",
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Config, schedule and parameter counts of a preset (models built on the meta device: instant)."""
    from mindhier_rt.config import preset
    from mindhier_rt.models.mindhier import MindHier

    cfg = preset(preset_name)
    models = MindHier.from_config(cfg, device="meta")
    subject = cfg.encoder.subjects[0][0]
    params = models.param_counts(subject)
    report = {
        "preset": cfg.name,
        "config": cfg.to_dict(),
        "schedule": cfg.schedule.to_dict(),
        "params": params,
        "params_note": f"encoder = shared part + the input layer of {subject}",
    }
    if as_json:
        _echo_json(report)
        return
    s = cfg.schedule
    g = cfg.generator
    typer.echo(f"preset {cfg.name}: {cfg.image_size} px, {s.n_scales} scales, {s.total_tokens} tokens")
    typer.echo(f"  patch_nums      {s.patch_nums}")
    typer.echo(f"  generator       depth {g.depth}, width {g.width}, heads {g.heads}, {g.attn_mode}")
    typer.echo(f"  levels          M={s.n_levels} x {s.context_tokens} x {cfg.context_dim}, guidance {s.guidance}")
    typer.echo(f"  level of scale  {s.level_of_scale}  (1 = shallow e_1, {s.n_levels} = deep e_{s.n_levels})")
    typer.echo(f"  clip layers     {s.clip_layers}")
    for name, n in params.items():
        typer.echo(f"  {name:<15} {n / 1e6:10.1f} M parameters")


@app.command()
def init(
    out: Annotated[Path, typer.Option("--out", help="checkpoint file to write (.safetensors)")],
    preset_name: Annotated[str, typer.Option("--preset")] = "tiny",
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


@app.command()
def decode(
    ckpt: Annotated[Path, typer.Option("--ckpt", help="checkpoint (.safetensors) with encoder, generator, vqvae")],
    fmri: Annotated[Path, typer.Option("--fmri", help="voxels: .npy / .npz / .h5, one row per scan")],
    subject: Annotated[str, typer.Option("--subject", help="subject id, e.g. subj01")],
    out: Annotated[Path, typer.Option("--out", help="output folder for the PNGs and decode.json")],
    samples: Annotated[int, typer.Option(min=1, help="samples per scan")] = 1,
    seed: Annotated[int, typer.Option(min=0, help="seed of the token draws")] = 0,
    cfg_scale: Annotated[float, typer.Option("--cfg", min=0.0, help="guidance scale (0 = off)")] = 6.0,
    cfg_stop: Annotated[int | None, typer.Option(help="switch guidance off from this 0-indexed scale on")] = None,
    top_k: Annotated[int, typer.Option(min=0)] = 400,
    top_p: Annotated[float, typer.Option()] = 0.95,
    greedy: Annotated[bool, typer.Option(help="argmax instead of sampling")] = False,
    batch: Annotated[int, typer.Option(min=1, help="scans per forward pass")] = 8,
    key: Annotated[str | None, typer.Option(help="array name inside .npz / .h5 files (default: voxels)")] = None,
    device: Annotated[str, typer.Option(help="torch device")] = "cpu",
) -> None:
    """Reconstruct images from fMRI scans with the PyTorch reference backend."""
    import torch
    from rich.progress import Progress

    from mindhier_rt.io import finite_rows, read_voxels, save_png, write_json
    from mindhier_rt.models.mindhier import MindHier
    from mindhier_rt.pipeline import reconstruct
    from mindhier_rt.runtime.torch_backend import TorchBackend
    from mindhier_rt.sampling import SamplingConfig

    sampling = SamplingConfig(
        cfg_scale=cfg_scale, cfg_stop=cfg_stop, top_k=top_k, top_p=top_p, greedy=greedy, seed=seed
    )
    voxels = read_voxels(fmri, key=key)
    models = MindHier.load(ckpt, device=device)
    expected = models.cfg.encoder.voxel_count(subject)
    if voxels.shape[1] != expected:
        raise InputError(f"{fmri}: subject {subject} expects {expected} voxels per scan, got {voxels.shape[1]}")
    good = finite_rows(voxels)
    skipped = [{"scan": int(i), "reason": "NaN or inf voxels"} for i in (~good).nonzero()[0]]
    for s in skipped:
        typer.echo(f"warning: scan {s['scan']}: {s['reason']}, skipped", err=True)
    good_ids = good.nonzero()[0]
    backend = TorchBackend(models, device=device)
    out.mkdir(parents=True, exist_ok=True)
    written: list[dict] = []
    t0 = time.perf_counter()
    with Progress(transient=True) as progress:
        task = progress.add_task("decoding", total=len(good_ids))
        for start in range(0, len(good_ids), batch):
            ids = good_ids[start : start + batch]
            rec = reconstruct(
                backend, torch.from_numpy(voxels[ids]), subject, sampling, samples=samples,
                scan_ids=torch.from_numpy(ids),
            )  # fmt: skip
            for row, scan in enumerate(ids):
                for s in range(samples):
                    name = f"scan{scan:05d}.png" if samples == 1 else f"scan{scan:05d}_s{s}.png"
                    save_png(out / name, rec.images_NS3HW[row, s])
                    written.append({"scan": int(scan), "sample": s, "file": name})
            progress.advance(task, len(ids))
    seconds = time.perf_counter() - t0
    write_json(
        out / "decode.json",
        {
            "ckpt": str(ckpt),
            "fmri": str(fmri),
            "subject": subject,
            "backend": backend.name,
            "sampling": sampling.to_dict(),
            "samples": samples,
            "images": written,
            "skipped": skipped,
            "seconds": round(seconds, 3),
        },
    )
    typer.echo(f"decoded {len(good_ids)} scans ({len(skipped)} skipped) into {out} in {seconds:.1f} s")
    if not len(good_ids):
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry: run the app, turning our errors into one line and a non-zero exit."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except MindhierError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
