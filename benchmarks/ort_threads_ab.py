"""torch vs three thread setups of the onnxruntime backend, in turns, preset ``small``.

    python benchmarks/ort_threads_ab.py --batch 1      # and --batch 4

Backends (same bundle, same loop):
* ``ort_quiet``: no spinning, PyTorch's host work on all its threads (the defaults before 2026-11-28, session 3);
* ``ort_spin``: workers spin within runs and stop at their end, PyTorch untouched;
* ``ort_1thread``: no spinning, the host work on one PyTorch thread;
* ``onnxruntime``: the defaults, spinning within runs and the host work on one PyTorch thread.

Exports a float32 bundle of random-weight ``small`` models to a temporary folder, then profiles the backends run
by run (``profile_backends``, guidance 6.0) and prints the table. The "threads A/B" rows of
``benchmarks/results/profile_small_cpu.md`` come from this script.
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
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--bundle", type=Path, help="reuse a bundle of the seed-0 small models")
    a = p.parse_args()
    models = MindHier.from_config(preset("small"), seed=0)
    with tempfile.TemporaryDirectory(prefix="mindhier-rt-") as tmp:
        bundle = a.bundle or export_bundle(models, Path(tmp) / "bundle", batch=a.batch)
        quiet = OnnxRuntimeBackend(bundle, spinning=False, host_threads=None)
        quiet.name = "ort_quiet"
        spin = OnnxRuntimeBackend(bundle, spinning=True, host_threads=None)
        spin.name = "ort_spin"
        one_thread = OnnxRuntimeBackend(bundle, spinning=False, host_threads=1)
        one_thread.name = "ort_1thread"
        backends = [TorchBackend(models), quiet, spin, one_thread, OnnxRuntimeBackend(bundle)]
        results = profile_backends(backends, "subj01", a.batch, 1, SamplingConfig(cfg_scale=6.0), a.repeats)
    print(format_table(results))


if __name__ == "__main__":
    main()
