"""Run NVIDIA Triton Inference Server on a model repository: the ``tritonserver`` that ``nvidia-pytriton`` ships.

PyTriton's wheel carries a complete ``tritonserver`` (HTTP, gRPC, metrics, the Python backend and a backend stub
per Python version) that also runs on machines without a GPU. ``serve`` starts that server on a repository from
``mindhier_rt.serve.repository``, the same repository the stock container serves, rather than binding Python
functions through PyTriton's proxy: the proxy answers a failed request with an error for every request of its
batch, while a Python-backend model answers each request on its own and streams through its response sender.

The server process gets: the Python-backend stub of this interpreter's version beside the backend library (in a
private copy of the backend folder), ``LD_LIBRARY_PATH`` with PyTriton's bundled libraries and this interpreter's
``libpython`` (the stub must load the same Python as the one whose standard library it imports), and ``PYTHONPATH``
with this interpreter's import path, so the models import ``mindhier_rt`` as installed here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mindhier_rt.errors import BackendError, MindhierError, MissingDependencyError

if TYPE_CHECKING:
    from mindhier_rt.serve.repository import RepositorySpec

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'mindhier-rt[serve]' (nvidia-pytriton brings Triton Inference Server, tritonclient)"


def tritonserver_dist() -> Path:
    """The folder of PyTriton's Triton Inference Server (bin/tritonserver, backends/, python_backend_stubs/)."""
    try:
        import pytriton
    except ImportError as e:
        raise MissingDependencyError(f"serving needs NVIDIA Triton Inference Server: {INSTALL_HINT} ({e})") from e
    dist = Path(pytriton.__file__).parent / "tritonserver"
    if not (dist / "bin" / "tritonserver").is_file():
        raise BackendError(f"no tritonserver binary in {dist}: reinstall nvidia-pytriton")
    return dist


def _backend_folder(dist: Path, work: Path) -> Path:
    """A private backends/ folder whose python/ holds the backend library and this Python's stub."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise BackendError(f"nvidia-pytriton has no Python-backend stub for Python {version} (looked in {stub})")
    backends = work / "backends"
    shutil.copytree(dist / "backends", backends)
    shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
    return backends


def server_env(dist: Path) -> dict[str, str]:
    env = dict(os.environ)
    libs = [str(dist.parent.parent / "nvidia_pytriton.libs"), str(dist / "external_libs")]
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and Path(libdir, f"libpython{sys.version_info.major}.{sys.version_info.minor}.so").exists():
        libs.insert(0, libdir)  # this interpreter's libpython before any other of the same version
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, *filter(None, [env.get("LD_LIBRARY_PATH")])])
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    @classmethod
    def free(cls) -> Ports:
        return cls(free_port(), free_port(), free_port())


@dataclass
class RunningServer:
    process: subprocess.Popen
    ports: Ports
    host: str
    log_path: Path

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports.grpc}"

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM: Triton stops taking requests, finishes those in flight, unloads the models, exits."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(
    repository: Path,
    ports: Ports,
    work: Path,
    host: str = "127.0.0.1",
    exit_timeout_s: int = 30,
    verbose: int = 0,
) -> RunningServer:
    """Start ``tritonserver`` on ``repository`` (returns at once; ``wait_ready`` waits for the models)."""
    dist = tritonserver_dist()
    backends = _backend_folder(dist, work)
    log_path = work / "tritonserver.log"
    cmd = [
        str(dist / "bin" / "tritonserver"),
        f"--model-repository={Path(repository).resolve()}",
        f"--backend-directory={backends}",
        f"--http-address={host}", f"--http-port={ports.http}",
        f"--grpc-address={host}", f"--grpc-port={ports.grpc}",
        f"--metrics-address={host}", f"--metrics-port={ports.metrics}",
        "--allow-metrics=true", "--allow-gpu-metrics=false",
        f"--exit-timeout-secs={exit_timeout_s}",
        "--strict-readiness=true",
        f"--log-verbose={verbose}",
    ]  # fmt: skip
    log.info("starting %s", " ".join(cmd))
    with open(log_path, "wb") as out:
        process = subprocess.Popen(cmd, env=server_env(dist), stdout=out, stderr=subprocess.STDOUT, cwd=work)
    return RunningServer(process, ports, host, log_path)


def wait_ready(server: RunningServer, models: list[str], timeout_s: float = 120.0) -> None:
    """Wait until the server and ``models`` are ready; BackendError with the server's log if it exits or times
    out."""
    import tritonclient.http as http

    client = http.InferenceServerClient(server.http_url)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise BackendError(f"tritonserver exited with code {server.process.returncode}:\n{server.log_tail()}")
            with contextlib.suppress(Exception):
                if client.is_server_ready() and all(client.is_model_ready(m) for m in models):
                    return
            time.sleep(0.2)
    finally:
        client.close()
    server.stop(10)
    raise BackendError(f"tritonserver was not ready within {timeout_s:.0f} s:\n{server.log_tail()}")


@contextlib.contextmanager
def running(
    repository: Path, ports: Ports | None = None, models: list[str] | None = None, **kwargs: object
) -> Iterator[RunningServer]:
    """A server on ``repository`` for the duration of the block (free ports by default), stopped afterwards."""
    from mindhier_rt.serve.repository import MODEL, PROGRESSIVE_MODEL

    with tempfile.TemporaryDirectory(prefix="mindhier-triton-") as work:
        server = start_server(repository, ports or Ports.free(), Path(work), **kwargs)  # type: ignore[arg-type]
        try:
            wait_ready(server, models or [MODEL, PROGRESSIVE_MODEL])
            yield server
        finally:
            server.stop()


def serve_until_signal(spec: RepositorySpec, ports: Ports, host: str, on_ready: Callable[[RunningServer], None]) -> int:
    """``serve``: a server on a repository of ``spec`` until SIGINT or SIGTERM (``on_ready`` is called once its
    models are ready); the requests in flight finish first. Returns tritonserver's exit code; MindhierError if
    the server exits on its own."""
    from mindhier_rt.serve.repository import MODEL, PROGRESSIVE_MODEL, write_repository

    stop: dict[str, int | None] = {"signal": None}

    def on_signal(signum: int, _frame: object) -> None:
        stop["signal"] = signum

    with tempfile.TemporaryDirectory(prefix="mindhier-serve-") as work:
        repo = write_repository(spec, Path(work) / "repository", copy=False)
        server = start_server(repo, ports, Path(work), host=host)
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            wait_ready(server, [MODEL, PROGRESSIVE_MODEL])
            on_ready(server)
            while stop["signal"] is None and server.process.poll() is None:
                time.sleep(0.2)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            code = server.stop()
        if stop["signal"] is None:
            raise MindhierError(f"tritonserver exited with code {code}:\n{server.log_tail()}")
    return code
