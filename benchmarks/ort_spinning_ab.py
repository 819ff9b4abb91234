"""torch vs onnxruntime without spinning vs onnxruntime spinning within runs only, in turns, preset ``small``.

    python benchmarks/ort_spinning_ab.py --batch 1      # and --batch 4

Exports a float32 bundle of random-weight ``small`` models to a temporary folder, then profiles the three
backends run by run (``profile_backends``, 7 timed runs after 1 warm-up, guidance 6.0) and prints the table.
The "A/B script" rows of ``benchmarks/results/profile_small_cpu.md`` come from this script.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from mindhier_rt.config import preset
from mindhier_rt.export.onnx_export import export_bundle
from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.profile import format_table, profile_backends
from mindhier_rt.runtime.onnxruntime_backend import OnnxRuntimeBackend
from mindhier_rt.runtime.torch_backend import TorchBackend
from mindhier_rt.sampling import SamplingConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    models = MindHier.from_config(preset("small"), seed=0)
    with tempfile.TemporaryDirectory(prefix="mindhier-rt-") as tmp:
        bundle = export_bundle(models, Path(tmp) / "bundle", batch=a.batch)
        no_spin = OnnxRuntimeBackend(bundle, spinning=False)
        no_spin.name = "ort_nospin"
        spin = OnnxRuntimeBackend(bundle, spinning=True)  # spins within a run, stops at its end
        spin.name = "ort_spin_stop"
        results = profile_backends(
            [TorchBackend(models), no_spin, spin], "subj01", a.batch, 1, SamplingConfig(cfg_scale=6.0), a.repeats
        )
    print(format_table(results))


if __name__ == "__main__":
    main()
