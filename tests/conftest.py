import os
import sys

import pytest
import torch

# Triton kernels run on the CPU through Triton's interpreter (float32) where there is no GPU. Set before any
# kernel module is imported: @triton.jit reads it when a kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mindhier_rt.config import preset
from mindhier_rt.models.mindhier import MindHier


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A randomly initialised tiny checkpoint on disk, shared by the CLI and pipeline tests."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    MindHier.from_config(preset("tiny"), seed=0).save(path)
    return path


def _export_tiny(mode: str, folder, context_map: str = "training"):
    """Peaked random tiny models of ``mode`` and their bundle (2 scans x 2 samples); scale-local via the CLI.

    Under the ``reference-pipeline`` context map the tiny schedule's scales 2 and 3 read two context levels each.
    """
    from mindhier_rt.bundle import Bundle
    from mindhier_rt.export.onnx_export import export_bundle

    models = MindHier.from_config(preset("tiny").replace(attn_mode=mode, context_map=context_map), seed=0).eval()
    with torch.no_grad():
        # peaked next-token distributions, as a trained model has: with the flat ones of random weights a
        # draw lands within float rounding of a CDF boundary often enough to flip a token now and then
        models.generator.head.weight.mul_(8.0)
    if mode != "scale_local" or context_map != "training":
        return models, export_bundle(models, folder / "bundle", batch=2, samples=2)
    from mindhier_rt.cli import main

    models.save(folder / "model.safetensors")
    argv = ["mindhier-rt", "export", "--ckpt", str(folder / "model.safetensors"), "--out", str(folder / "bundle")]
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit) as done:
        mp.setattr("sys.argv", [*argv, "--batch", "2", "--samples", "2"])
        main()
    assert done.value.code in (0, None)
    return models, Bundle.open(folder / "bundle")


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """``tiny_export(mode, context_map="training") -> (models, bundle)``: one export per attention mode and
    context map for the whole session (ONNX export is the slowest thing the tests do). Shared: copy a bundle
    before altering it."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    cache = {}

    def get(mode: str = "scale_local", context_map: str = "training"):
        if (mode, context_map) not in cache:
            folder = tmp_path_factory.mktemp(f"tiny_{mode}_{context_map}")
            cache[mode, context_map] = _export_tiny(mode, folder, context_map)
        return cache[mode, context_map]

    return get


@pytest.fixture()
def tiny_voxels():
    torch.manual_seed(0)
    return torch.randn(5, preset("tiny").encoder.voxel_count("subj01"))


@pytest.fixture()
def cli(monkeypatch, capsys):
    """Run the console entry point in-process: returns (exit code, stdout, stderr)."""
    from mindhier_rt.cli import main

    def run(*args) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["mindhier-rt", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run
