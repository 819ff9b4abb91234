"""End to end on VAR's real shapes: `export --ckpt var_d16.pth --vae vae_ch160v4096z32.pth` and decode the bundle.

The two files are written here with random weights in VAR's own tensor naming and container (torch.save state
dicts; names and shapes from REFERENCE §6, see tests/public_layouts.py): VAR-d16 (depth 16, width 1024,
16 heads, 1000 classes, 680 tokens) and the ch160 v4096 z32 VQ-VAE. The head is scaled up so next-token
distributions are peaked, as a trained model's are (with flat ones a draw can flip on float rounding).
Then, through the command line and the Python API:

1. `mindhier-rt export --ckpt var_d16.pth --vae vae_ch160v4096z32.pth --out BUNDLE` (strict import + ONNX export)
2. `mindhier-rt decode --engine BUNDLE --class-label 207 --class-label 980 --out ...` (onnxruntime)
3. the same labels through the torch reference (`generate` on the imported models): tokens and images compared

    python benchmarks/var_d16_export.py [--work /tmp/var_d16]

writes benchmarks/results/var_d16_export.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from public_layouts import var_state_dict, vqvae_state_dict

from mindhier_rt.bundle import Bundle
from mindhier_rt.io import atomic_write_text, write_json
from mindhier_rt.pipeline import generate
from mindhier_rt.runtime.open import open_backend
from mindhier_rt.sampling import SamplingConfig
from mindhier_rt.schedule import PATCH_NUMS_256

LABELS = (207, 980)


def run(cmd: list[str]) -> float:
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/var_d16"))
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    gen_path, vae_path, bundle_path = work / "var_d16.pth", work / "vae_ch160v4096z32.pth", work / "bundle"

    t0 = time.perf_counter()
    gen_sd = var_state_dict(16, 1024, 16, PATCH_NUMS_256, vocab=4096, latent=32, classes=1000, gates="drawn")
    gen_sd["head.weight"] *= 20.0
    torch.save(gen_sd, gen_path)
    del gen_sd
    torch.save(vqvae_state_dict(160, (1, 1, 2, 2, 4), 2, latent=32, vocab=4096, scales=10), vae_path)
    t_write = time.perf_counter() - t0

    cli = [sys.executable, "-m", "mindhier_rt.cli"]
    t_export = run([*cli, "export", "--ckpt", str(gen_path), "--vae", str(vae_path), "--out", str(bundle_path)])
    labels = [x for label in LABELS for x in ("--class-label", str(label))]
    t_decode_cli = run([*cli, "decode", "--engine", str(bundle_path), *labels, "--out", str(work / "decoded")])

    t0 = time.perf_counter()
    reference = open_backend(ckpt=gen_path, vae=vae_path, backend="torch")  # decode --ckpt ... --vae ...
    t_import = time.perf_counter() - t0
    models = reference.models
    sampling = SamplingConfig(seed=0)
    t0 = time.perf_counter()
    ref = generate(reference, torch.tensor(LABELS), sampling)
    t_torch = time.perf_counter() - t0
    bundle = Bundle.open(bundle_path)
    ort = open_backend(engine=bundle_path, backend="onnxruntime")  # decode --engine ...
    t0 = time.perf_counter()
    got = generate(ort, torch.tensor(LABELS), sampling)
    t_ort = time.perf_counter() - t0
    agree = [float((a == b).float().mean()) for a, b in zip(ref.tokens, got.tokens, strict=True)]
    files = bundle.spec.files
    report = {
        "command": f"python benchmarks/var_d16_export.py --work {work}",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "params": models.param_counts(),
        "config": {"name": models.cfg.name, "generator": models.cfg.to_dict()["generator"]},
        "input_file_gb": {p.name: round(p.stat().st_size / 1e9, 3) for p in (gen_path, vae_path)},
        "seconds": {
            "write_random_files": round(t_write, 1),
            "cli_export": round(t_export, 1),
            "cli_decode_onnxruntime_2_labels": round(t_decode_cli, 1),
            "import_models": round(t_import, 1),
            "torch_generate_2_labels": round(t_torch, 1),
            "onnxruntime_generate_2_labels": round(t_ort, 1),
        },
        "bundle_gb": round(sum(f.bytes for f in files.values()) / 1e9, 3),
        "graphs": sorted(bundle.spec.graphs),
        "token_agreement_per_scale": agree,
        "image_max_abs_diff": float((ref.images_NS3HW - got.images_NS3HW).abs().max()),
        "decode_json": json.loads((work / "decoded" / "decode.json").read_text())["images"],
    }
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.results / "var_d16_export.json", report)
    s = report["seconds"]
    md = [
        "# VAR-d16 end to end: import, export, decode (random weights of the real shapes)",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']} (CPU; the machine was shared with other jobs while this ran)",
        "",
        f"- parameters: {report['params']}; files: {report['input_file_gb']} GB",
        f"- `mindhier-rt export --ckpt var_d16.pth --vae vae_ch160v4096z32.pth`: {s['cli_export']} s "
        f"(strict import + {len(report['graphs'])} ONNX graphs, bundle {report['bundle_gb']} GB)",
        "- `mindhier-rt decode --engine BUNDLE --class-label 207 --class-label 980`: "
        f"{s['cli_decode_onnxruntime_2_labels']} s (process start, bundle checksums, sessions, 2 images)",
        f"- Python API, 2 labels, cfg 6: torch {s['torch_generate_2_labels']} s, onnxruntime "
        f"{s['onnxruntime_generate_2_labels']} s; import alone {s['import_models']} s",
        f"- torch vs onnxruntime: tokens equal per scale {report['token_agreement_per_scale']}, "
        f"image max |diff| {report['image_max_abs_diff']:.2e}",
    ]
    atomic_write_text(args.results / "var_d16_export.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
