"""Server start-up failures are reported clearly: busy ports and models that fail to load."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest

from clients import protocol as P
from serve.server import ModelLoadError, Ports, PortInUseError, TritonServer, free_ports


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
    (broken / P.CLASSIFIER / "1" / "model.onnx").write_bytes(b"this is not an ONNX model")
    server = TritonServer(broken, Ports(*free_ports(3)))
    with pytest.raises(ModelLoadError) as e:
        server.start(timeout=120)
    assert P.CLASSIFIER in e.value.failures
    assert "onnx" in e.value.failures[P.CLASSIFIER].lower() or "protobuf" in e.value.failures[P.CLASSIFIER].lower()
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
        with TritonServer(Path({str(repo)!r}), Ports(*free_ports(3)), binary=Path({str(wrapper)!r})) as s:
            print("ready", s.proc.pid)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                       env={k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH",)})
    assert r.returncode == 0 and "ready" in r.stdout, r.stdout + r.stderr
