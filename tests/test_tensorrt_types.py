"""The TensorRT-facing Python held to TensorRT's published API without TensorRT: mypy against ``tensorrt-stubs``.

The stubs package (PyPI ``tensorrt-stubs``) depends on ``tensorrt`` itself, which does not install without
NVIDIA's index, and its wheel puts a bare ``tensorrt/`` folder of ``.pyi`` files into site-packages, which would
make ``import tensorrt`` succeed as an empty namespace package. So the wheel is fetched with ``pip download
--no-deps`` into a cache folder (``$MINDHIER_STUBS_CACHE``, default ``~/.cache/mindhier-rt``), unpacked into a
temporary folder that only mypy sees (``MYPYPATH``), never onto ``sys.path``.

Five lines of the published ``tensorrt_bindings/tensorrt.pyi`` are not valid Python, so no type checker parses
the file: four plugin methods name a parameter ``in`` (a keyword), and ``add_scale_nd`` has a parameter without a
default after defaulted ones. They are rewritten mechanically (``in`` -> ``in_``; ``channel_axis: int`` ->
``channel_axis: int = ...``); none of these methods is called here, and the fixture fails if the published file
has other such lines than these five.

The lean runtime (``tensorrt_lean``, pip ``tensorrt-lean-cu12``) is checked where it imports (it does without a
GPU): every runtime call of ``mindhier_rt/runtime/tensorrt_engine.py`` and ``tensorrt_backend.py`` must exist there.
It is not in the dev extra (an importable lean runtime changes what the backend reports without TensorRT); with
its 11.4.0.106 wheels on PYTHONPATH the check passes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mindhier_rt.export.tensorrt_build import HAS_TENSORRT

ROOT = Path(__file__).resolve().parents[1]
STUBS = ("tensorrt-stubs", "10.13.0.35.1")
WHEEL = f"{STUBS[0].replace('-', '_')}-{STUBS[1]}-py3-none-any.whl"
CHECKED = [  # every module that calls TensorRT's Python API
    "mindhier_rt/runtime/tensorrt_engine.py",
    "mindhier_rt/runtime/tensorrt_backend.py",
    "mindhier_rt/runtime/tensorrt_compat.py",
    "export/tensorrt_build.py",
]
# the published stubs' lines that are not valid Python: (pattern, replacement, expected count)
SYNTAX_FIXES = [
    (re.compile(r"\bin: list\["), "in_: list[", 4),
    (re.compile(r"power: Weights = None, channel_axis: int\)"), "power: Weights = None, channel_axis: int = ...)", 1),
]
MYPY_CONFIG = """[mypy]
python_version = 3.11
check_untyped_defs = True
follow_imports = silent
warn_unused_ignores = False
[mypy-torch.*,numpy.*,onnx.*,onnxruntime.*,triton.*,cuda.*,rich.*,typer.*]
follow_imports = skip
follow_imports_for_stubs = True
ignore_missing_imports = True
[mypy-tensorrt_libs,tensorrt_lean]
ignore_missing_imports = True
[mypy-tensorrt.*,tensorrt_bindings.*]
ignore_errors = True
"""
# The stubs are generated (pybind11-stubgen) and mypy finds faults inside them (``bool`` shadowed, ``capsule``
# undefined); those are theirs, not ours: ``ignore_errors`` silences them there while their declarations still
# type every call made here. tensorrt_lean has no published stubs.


def _wheel() -> Path:
    cache = Path(os.environ.get("MINDHIER_STUBS_CACHE") or Path.home() / ".cache" / "mindhier-rt")
    wheel = cache / WHEEL
    if not wheel.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", f"{STUBS[0]}=={STUBS[1]}", "-d", str(cache)],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        if res.returncode != 0 or not wheel.is_file():
            pytest.skip(f"could not fetch {STUBS[0]} {STUBS[1]} into {cache}: {res.stderr.strip()[-300:]}")
    return wheel


@pytest.fixture(scope="session")
def stubs(tmp_path_factory) -> Path:
    """A folder with the published ``tensorrt`` and ``tensorrt_bindings`` stubs (syntax-fixed), for MYPYPATH only."""
    out = tmp_path_factory.mktemp("tensorrt_stubs")
    with zipfile.ZipFile(_wheel()) as whl:
        for name in whl.namelist():
            if name.endswith(".pyi") and name.split("/")[0] in ("tensorrt", "tensorrt_bindings"):
                whl.extract(name, out)
    bindings = out / "tensorrt_bindings" / "tensorrt.pyi"
    text = bindings.read_text()
    for pattern, replacement, count in SYNTAX_FIXES:
        text, n = pattern.subn(replacement, text)
        assert n == count, f"{STUBS}: expected {count} lines matching {pattern.pattern}, found {n}"
    bindings.write_text(text)
    (out / "mypy.ini").write_text(MYPY_CONFIG)
    return out


def _source_view(stubs: Path) -> Path:
    """The package as installed (``mindhier_rt.export`` is the repository's ``export/``), as links mypy can follow."""
    view = stubs / "src"
    if not view.exists():
        (view / "mindhier_rt").mkdir(parents=True)
        for entry in (ROOT / "mindhier_rt").iterdir():
            (view / "mindhier_rt" / entry.name).symlink_to(entry)
        (view / "mindhier_rt" / "export").symlink_to(ROOT / "export")
    return view


def run_mypy(stubs: Path, files: list[str | Path]) -> subprocess.CompletedProcess:
    pytest.importorskip("mypy")
    view = _source_view(stubs)
    files = [f if Path(f).is_absolute() else view / "mindhier_rt" / f if str(f).startswith("export/") else view / f
             for f in files]  # fmt: skip
    env = {**os.environ, "MYPYPATH": f"{stubs}{os.pathsep}{view}"}
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(stubs / "mypy.ini"), "--no-incremental"]
    cmd += ["--cache-dir", str(stubs / ".mypy_cache"), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=view, env=env, timeout=900, check=False)


def test_stubs_stay_out_of_the_interpreter(stubs):
    """The stub folder is for mypy only: ``import tensorrt`` behaves as before (fails where TensorRT is absent)."""
    res = subprocess.run([sys.executable, "-c", "import tensorrt"], capture_output=True, text=True, check=False)
    assert (res.returncode == 0) == HAS_TENSORRT, res.stderr
    assert str(stubs) not in sys.path


def test_tensorrt_code_matches_the_published_api(stubs):
    res = run_mypy(stubs, CHECKED)
    assert res.returncode == 0, res.stdout + res.stderr


def test_a_wrong_tensorrt_call_is_caught(stubs, tmp_path):
    """The check can fail: the engine module with one TensorRT method misspelt does not pass."""
    source = (ROOT / "mindhier_rt/runtime/tensorrt_engine.py").read_text()
    assert source.count(".execute_async_v3(") == 1
    wrong = tmp_path / "tensorrt_engine_misspelt.py"
    wrong.write_text(source.replace(".execute_async_v3(", ".execute_async_v4("))
    res = run_mypy(stubs, [wrong])
    assert res.returncode != 0
    assert 'has no attribute "execute_async_v4"' in res.stdout, res.stdout


# ---- the lean runtime -------------------------------------------------------------------------------------
LEAN_CALLS = {  # what the backend and its engines call on the runtime's objects
    "Runtime": ["deserialize_cuda_engine", "engine_host_code_allowed"],
    "ICudaEngine": [
        "num_io_tensors", "get_tensor_name", "get_tensor_mode", "get_tensor_dtype", "num_optimization_profiles",
        "create_execution_context", "get_device_memory_size_for_profile_v2", "get_aliased_input_tensor",
    ],
    "IExecutionContext": [
        "set_device_memory", "set_optimization_profile_async", "set_input_shape", "set_tensor_address",
        "get_tensor_shape", "execute_async_v3",
    ],
    "TensorIOMode": ["INPUT", "OUTPUT"],
    "ExecutionContextAllocationStrategy": ["USER_MANAGED"],
    "DataType": ["FLOAT", "HALF", "BF16", "INT64", "INT32", "BOOL", "UINT8"],
    "Logger": ["WARNING", "INFO", "ERROR"],
}  # fmt: skip


def test_lean_runtime_has_every_call_the_backend_makes():
    try:
        import tensorrt_lean as lean
    except (ImportError, OSError) as e:  # OSError: the bindings are there, libnvinfer_lean or CUDA is not
        pytest.skip(f"the lean TensorRT runtime does not import here ({e}); pip install tensorrt-lean-cu12")
    missing = [
        f"{cls}.{attr}"
        for cls, attrs in LEAN_CALLS.items()
        for attr in attrs
        if not hasattr(getattr(lean, cls, None), attr)
    ]
    assert not missing, f"tensorrt_lean {lean.__version__} lacks {', '.join(missing)}"


NEWER_THAN_STUBS = {("ICudaEngine", "get_aliased_input_tensor")}  # TensorRT >= 10.15 (in-place caches), stubs 10.13


def test_lean_calls_are_the_ones_the_stubs_check(stubs):
    """The list above names real API: every entry exists in the published stubs, but for the one call newer than
    them (the backend checks it with hasattr first and refuses in-place caches without it)."""
    text = (stubs / "tensorrt_bindings" / "tensorrt.pyi").read_text()
    for cls, attrs in LEAN_CALLS.items():
        body = re.search(rf"^class {cls}\b.*?(?=^class |\Z)", text, re.S | re.M)
        assert body is not None, cls
        for attr in attrs:
            found = re.search(rf"\b{attr}\b", body.group(0)) is not None
            assert found != ((cls, attr) in NEWER_THAN_STUBS), f"{cls}.{attr}: in {STUBS} is {found}"
