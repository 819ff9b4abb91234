import sys

import pytest
import torch

from mindhier_rt.config import preset
from mindhier_rt.models.mindhier import MindHier


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A randomly initialised tiny checkpoint on disk, shared by the CLI and pipeline tests."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    MindHier.from_config(preset("tiny"), seed=0).save(path)
    return path


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
