"""Server start-up failures are reported clearly: busy ports and models that fail to load."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from build import layouts
from build.settings import read_manifest
from serve.server import PROJECT_ROOT, ModelLoadError, PortInUseError, Ports, TritonServer, free_ports


def test_busy_port_is_refused_with_a_clear_message(repo):
    http, grpc_port, metrics = free_ports(3)
    with socket.socket() as s:
        s.bind(("0.0.0.0", grpc_port))
        s.listen()
        with pytest.raises(PortInUseError, match=f"port {grpc_port} \\(gRPC\\) is already in use"):
            TritonServer(repo, Ports(http, grpc_port, metrics)).start()


def test_model_that_fails_to_load_is_named_with_its_reason(repo, tmp_path):
    broken = tmp_path / "repo"
    shutil.copytree(repo, broken)
    model = layouts.get(read_manifest(repo)["layout"]).onnx_model
    (broken / model / "1" / "model.onnx").write_bytes(b"this is not an ONNX model")
    server = TritonServer(broken, None)
    with pytest.raises(ModelLoadError) as e:
        server.start(timeout=120)
    assert model in e.value.failures
    assert "onnx" in e.value.failures[model].lower() or "protobuf" in e.value.failures[model].lower()
    assert server.proc.poll() is not None  # nothing left running


def test_missing_repository(tmp_path):
    with pytest.raises(Exception, match="make repo"):
        TritonServer(tmp_path / "nope").start()


def test_own_binary_needs_no_pytriton(repo, tmp_path):
    """`binary=` is the NGC container's tritonserver, where nvidia-pytriton is not installed: starting it must
    not ask for the wheel. Stand-in for the container's install: a wrapper around the wheel's server that
    brings its own backend directory and libraries, started from a Python where pytriton cannot be imported."""
    wheel = TritonServer(repo)
    env = wheel.environment()
    wrapper = tmp_path / "tritonserver"
    exports = " ".join(f"{k}={shlex.quote(env[k])}" for k in ("LD_LIBRARY_PATH", "PATH", "PYTHONPATH"))
    binary, *_ = wheel.command()
    backends = next(a for a in wheel.command() if a.startswith("--backend-directory="))
    wrapper.write_text(f'#!/bin/sh\nexec env {exports} {shlex.quote(binary)} {shlex.quote(backends)} "$@"\n')
    wrapper.chmod(0o755)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["pytriton"] = None  # as in the container: `import pytriton` fails
        from pathlib import Path
        from serve.server import Ports, TritonServer, free_ports
        with TritonServer(Path({str(repo)!r}), None, binary=Path({str(wrapper)!r})) as s:
            print("ready", s.proc.pid)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                       env={k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH",)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ready" in r.stdout, r.stdout + r.stderr


def test_port_taken_between_choosing_and_binding_is_chosen_again(repo, monkeypatch):
    """free ports are chosen, then released, then bound by Triton: another process may take one in
    between. Simulated by binding the chosen gRPC port after the up-front check (which is skipped)."""
    import serve.server as server_module

    monkeypatch.setattr(server_module, "check_port_free", lambda port, what: None)
    server = TritonServer(repo, None)
    taken = server.ports.grpc
    with socket.socket() as s:
        s.bind(("127.0.0.1", taken))
        s.listen()
        with server:
            assert server.ports.grpc != taken
            assert urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=10).status == 200
        http, metrics = free_ports(2)
        fixed = TritonServer(repo, Ports(http, taken, metrics))  # ports given: no second choice, a clear error
        with pytest.raises(PortInUseError, match="could not bind its GRPC port"):
            fixed.start()
        assert fixed.proc.poll() is not None


SLOW_MODEL = '''
import time
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        time.sleep(600)  # a model that takes long to load: the server is up but not ready

    def execute(self, requests):
        return []
'''


LIBRARY_USER = """
import sys
from pathlib import Path
from serve.server import TritonServer
with TritonServer(Path(sys.argv[1]), None, echo=True) as s:  # as the demo, the tests and the harnesses use it
    pass
"""


@pytest.mark.parametrize("how", ["serve CLI", "context manager"])
def test_ctrl_c_while_models_load_leaves_no_tritonserver(tmp_path, how):
    """Interrupted while the models still load, the process exits and its tritonserver is gone."""
    model = tmp_path / "repo" / "slow"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text(SLOW_MODEL)
    (model / "config.pbtxt").write_text('backend: "python"\nmax_batch_size: 0\n'
                                        'input { name: "X" data_type: TYPE_FP32 dims: [1] }\n'
                                        'output { name: "Y" data_type: TYPE_FP32 dims: [1] }\n')
    http, grpc_port, metrics = free_ports(3)
    cmd = ["-m", "serve", "--repo", str(tmp_path / "repo"), "--no-admin-key", "--http-port", str(http),
           "--grpc-port", str(grpc_port), "--metrics-port", str(metrics)] if how == "serve CLI" else \
        ["-c", LIBRARY_USER, str(tmp_path / "repo")]
    # as from a terminal: SIGINT at its default, which Python turns into KeyboardInterrupt (a test run started
    # in the background without job control inherits it ignored, and so would this child)
    cli = subprocess.Popen([sys.executable, *cmd], cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(cli.stderr), daemon=True)  # the CLI echoes Triton's log
    reader.start()
    try:
        children: list[int] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # tritonserver runs and has begun loading the slow model
            children = child_pids(cli.pid)
            if children and any("loading: slow:1" in line for line in lines):
                break
            time.sleep(0.2)
        else:
            raise AssertionError("tritonserver never started loading:\n" + "".join(lines[-20:]))
        time.sleep(1)
        cli.send_signal(signal.SIGINT)
        try:
            cli.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running 60 s after Ctrl-C; its last output:\n{''.join(lines[-30:])}") from None
        reader.join(timeout=10)
        if how == "serve CLI":
            assert cli.returncode == 0, "".join(lines[-20:])
            assert any("stopping Triton" in line for line in lines)
        for pid in children:
            assert not _alive(pid), f"tritonserver {pid} is still running"
    finally:
        _leave_nothing_running(cli, children)


def child_pids(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


LIBRARY_HOLDER = """
import sys, time
from pathlib import Path
from serve.server import TritonServer
with TritonServer(Path(sys.argv[1]), None) as s:
    print("ready", flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("how", ["serve CLI", "library"])
def test_a_parent_killed_outright_leaves_no_tritonserver(repo, how):
    """SIGKILL (or the OOM killer) runs no handler and no finally: the server still goes with its parent."""
    http, grpc_port, metrics = free_ports(3)
    cmd = ["-m", "serve", "--repo", str(repo), "--no-admin-key", "--http-port", str(http), "--grpc-port",
           str(grpc_port), "--metrics-port", str(metrics)] if how == "serve CLI" else ["-c", LIBRARY_HOLDER, str(repo)]
    parent = subprocess.Popen([sys.executable, *cmd], cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    servers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not servers:  # tritonserver started
            servers = [p for p in child_pids(parent.pid) if "tritonserver" in Path(f"/proc/{p}/cmdline").read_text()]
            time.sleep(0.2)
        assert servers, "tritonserver never started"
        time.sleep(2)  # it is up and loading, or serving
        parent.kill()
        parent.wait(timeout=30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(_alive(p) for p in servers):
            time.sleep(0.2)
        assert not any(_alive(p) for p in servers), f"tritonserver {servers} outlived its killed parent"
    finally:
        _leave_nothing_running(parent, servers)


def _leave_nothing_running(parent: subprocess.Popen, servers: list[int]) -> None:
    """Whatever a test's outcome: its parent process and the tritonservers it started are gone."""
    if parent.poll() is None:
        parent.kill()
        parent.wait()
    for pid in servers:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # tritonserver leads its own session: it and its stubs


def _alive(pid: int) -> bool:
    """Running: not gone and not a zombie (an orphan's exit is reaped by init later)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
