"""Run the real Triton Inference Server (2.51, shipped in the nvidia-pytriton wheel) standalone.

    python -m serve --repo model_repository [--http-port 8000 --grpc-port 8001 --metrics-port 8002]

The wheel's ``tritonserver`` needs a backend directory holding the Python backend and the stub for
the running Python, the wheel's bundled libraries on LD_LIBRARY_PATH, and this virtualenv on PATH
so the stub imports numpy, DALI and ONNX Runtime from it. :class:`TritonServer` sets that up,
refuses busy ports up front, waits for readiness, and turns a failed model load into an error
that names the model and the reason.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CACHE = PROJECT_ROOT / ".cache" / "triton"
LOAD_FAILURE = re.compile(r"failed to load '([^']+)' version \d+: (.*?)\"?$")


class ServerError(RuntimeError):
    pass


class PortInUseError(ServerError):
    pass


class ModelLoadError(ServerError):
    def __init__(self, failures: dict[str, str], log_tail: str):
        self.failures = failures
        lines = "\n".join(f"  model '{m}': {r}" for m, r in failures.items())
        super().__init__(f"Triton could not load {len(failures)} model(s):\n{lines}\n--- server log (tail) ---\n{log_tail}")


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


def pytriton_dir() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("nvidia-pytriton is not installed in this environment (it ships the tritonserver binary); run `make venv`")
    return Path(list(spec.submodule_search_locations)[0])


def dali_backend_wheel(binary: Path) -> Path | None:
    """The DALI Python package that a Triton install's DALI backend ships for autoserialization
    (<install>/backends/dali/wheel/dali, as in the NGC images), if there is one."""
    wheel = binary.resolve().parent.parent / "backends" / "dali" / "wheel" / "dali"
    return wheel if wheel.is_dir() else None


def backend_directory() -> Path:
    """A backends/python folder with the backend library, its utils and the stub for this Python."""
    src = pytriton_dir() / "tritonserver"
    stub = src / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerError(f"no Python-backend stub for Python {sys.version_info.major}.{sys.version_info.minor} in {stub.parent.parent}")
    dest = CACHE / "backends" / "python"
    dest.mkdir(parents=True, exist_ok=True)
    for f in (src / "backends" / "python" / "libtriton_python.so",
              src / "backends" / "python" / "triton_python_backend_utils.py", stub):
        link = dest / f.name
        if not (link.is_symlink() and link.resolve() == f.resolve()):
            link.unlink(missing_ok=True)
            link.symlink_to(f)
    return dest.parent


def check_port_free(port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            raise PortInUseError(f"port {port} ({what}) is already in use: stop whatever listens there "
                                 f"or choose another port (make serve HTTP_PORT=... GRPC_PORT=... METRICS_PORT=...)") from None


def free_ports(n: int = 3) -> list[int]:
    """n distinct ports that are free right now (all held open while choosing, so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class TritonServer:
    """The tritonserver process. Use as a context manager, or start()/stop()."""

    def __init__(self, repo: Path, ports: Ports = Ports(), log_file: Path | None = None, echo: bool = False,
                 extra_args: tuple[str, ...] = (), binary: Path | None = None):
        """``binary``: a tritonserver with its own backends (the NGC container's); default: the pip wheel's."""
        self.repo, self.ports, self.echo, self.extra_args = Path(repo).resolve(), ports, echo, extra_args
        self.binary = binary
        self.log_file = log_file
        self.proc: subprocess.Popen | None = None
        self.log: list[str] = []
        self._reader: threading.Thread | None = None

    @property
    def http_url(self) -> str:
        return f"localhost:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.ports.grpc}"

    def command(self) -> list[str]:
        if self.binary:  # a full Triton install brings its backends (DALI, TensorRT, Python)
            binary, backends = Path(self.binary), []
        else:
            binary, backends = pytriton_dir() / "tritonserver" / "bin" / "tritonserver", [f"--backend-directory={backend_directory()}"]
        return [str(binary), f"--model-repository={self.repo}", *backends,
                f"--http-port={self.ports.http}", f"--grpc-port={self.ports.grpc}",
                f"--metrics-port={self.ports.metrics}", "--exit-on-error=true", "--strict-readiness=true",
                "--disable-auto-complete-config", "--log-verbose=0", "--exit-timeout-secs=10", *self.extra_args]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.binary:
            # a full Triton install (the NGC container) brings its own libraries and Python backend
            # stub; nvidia-pytriton is not installed there, so nothing of the wheel may be asked for.
            # Its DALI backend serializes dali.py pipelines with `python3` and its own DALI wheel, which
            # the image puts on PYTHONPATH; our callers may have replaced that (with pip's newer DALI
            # behind it), so it goes first again.
            wheel = dali_backend_wheel(Path(self.binary))
            if wheel is not None:
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(wheel), env.get("PYTHONPATH")]))
            return env
        libs = pytriton_dir().parent / "nvidia_pytriton.libs"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libs), env.get("LD_LIBRARY_PATH")]))
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        # the stub's interpreter imports the project's venv packages (it has no venv of its own)
        site = [p for p in sys.path if p.endswith("site-packages")]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [*site, env.get("PYTHONPATH")]))
        return env

    def _pump(self) -> None:
        sink = open(self.log_file, "a") if self.log_file else None
        for line in self.proc.stdout:
            self.log.append(line.rstrip("\n"))
            if sink:
                sink.write(line)
                sink.flush()
            if self.echo:
                sys.stderr.write(line)
        if sink:
            sink.close()

    def start(self, timeout: float = 180.0) -> "TritonServer":
        if not self.repo.is_dir():
            raise ServerError(f"model repository {self.repo} does not exist: run `make repo` first")
        for port, what in ((self.ports.http, "HTTP"), (self.ports.grpc, "gRPC"), (self.ports.metrics, "metrics")):
            check_port_free(port, what)
        self.proc = subprocess.Popen(self.command(), env=self.environment(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        self.wait_ready(timeout)
        return self

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log[-n:])

    def _failures(self) -> dict[str, str]:
        """model -> reason, from Triton's log; the Python traceback after the reason is dropped."""
        return {m.group(1): m.group(2).split("\\n\\nAt:")[0].replace("\\n", " ").strip()
                for line in self.log if (m := LOAD_FAILURE.search(line))}

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._reader.join(timeout=5)
                failures = self._failures()
                if failures:
                    raise ModelLoadError(failures, self.log_tail())
                raise ServerError(f"tritonserver exited with code {self.proc.returncode} before it was ready:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.25)
        failures = self._failures()
        self.stop()
        if failures:
            raise ModelLoadError(failures, self.log_tail())
        raise ServerError(f"tritonserver was not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # Triton's graceful shutdown: unloads models, stops stubs
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._reader:
            self._reader.join(timeout=5)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Serve a model repository with the real tritonserver (foreground)")
    p.add_argument("--repo", type=Path, default=PROJECT_ROOT / "model_repository")
    p.add_argument("--http-port", type=int, default=Ports.http)
    p.add_argument("--grpc-port", type=int, default=Ports.grpc)
    p.add_argument("--metrics-port", type=int, default=Ports.metrics)
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the models to load")
    return p


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(args: argparse.Namespace) -> int:
    # Ctrl-C (SIGINT) and `kill` (SIGTERM) both stop the server cleanly; SIGINT is set explicitly
    # because a shell starting us in the background would leave it ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    server = TritonServer(args.repo, Ports(args.http_port, args.grpc_port, args.metrics_port), echo=True)
    try:
        server.start(args.timeout)
        print(f"\nTriton is ready: HTTP {server.http_url}, gRPC {server.grpc_url}, "
              f"metrics http://localhost:{args.metrics_port}/metrics  (Ctrl-C stops it)", file=sys.stderr, flush=True)
        server.proc.wait()
        return server.proc.returncode
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping Triton ...", file=sys.stderr)
        return 0
    finally:
        server.stop()
