"""Export the full-size `mindhier-512` setup (random weights) and record time, peak memory and sizes.

The generator alone is 2.32B parameters (9.3 GB in float32), far past protobuf's 2 GB limit, so its
graph keeps its weights in external data; the point of this run is that the whole export fits in the
24 GiB of the project's machines.

    python benchmarks/export_mindhier512.py --out /tmp/bundle512 [--subjects subj01]

writes benchmarks/results/export_mindhier512.{json,md}.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from mindhier_rt.config import preset
from mindhier_rt.export.onnx_export import export_bundle
from mindhier_rt.io import atomic_write_text, write_json
from mindhier_rt.models.mindhier import MindHier


def peak_rss_gib() -> float:
    """Peak resident memory of this process (VmHWM), GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/bundle_mindhier512"))
    parser.add_argument("--subjects", default="subj01")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    t0 = time.perf_counter()
    models = MindHier.from_config(preset("mindhier-512"), seed=0).eval()
    t_build = time.perf_counter() - t0
    rss_build = peak_rss_gib()
    t0 = time.perf_counter()

    def on_graph(name: str) -> None:
        print(f"{time.perf_counter() - t0:7.1f} s  exporting {name}  (peak RSS {peak_rss_gib():.1f} GiB)", flush=True)

    bundle = export_bundle(models, args.out, subjects=args.subjects.split(","), on_graph=on_graph)
    t_export = time.perf_counter() - t0
    files = bundle.spec.files
    report = {
        "command": f"python benchmarks/export_mindhier512.py --out {args.out} --subjects {args.subjects}",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "params": models.param_counts(),
        "build_seconds": round(t_build, 1),
        "export_seconds": round(t_export, 1),
        "peak_rss_gib_after_build": round(rss_build, 2),
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "bundle_gib": round(sum(m.bytes for m in files.values()) / 2**30, 2),
        "largest_files_gib": {
            k: round(v.bytes / 2**30, 2) for k, v in sorted(files.items(), key=lambda kv: -kv[1].bytes)[:5]
        },
    }
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.results / "export_mindhier512.json", report)
    lines = [
        "# Export of the full-size mindhier-512 setup (random weights)",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}",
        "",
        f"- parameters: {report['params']}",
        f"- build {report['build_seconds']} s, export {report['export_seconds']} s",
        f"- peak resident memory: {report['peak_rss_gib']} GiB (after building the models: "
        f"{report['peak_rss_gib_after_build']} GiB); the machine has 24 GiB",
        f"- bundle: {report['bundle_gib']} GiB; largest files: {report['largest_files_gib']}",
    ]
    atomic_write_text(args.results / "export_mindhier512.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
