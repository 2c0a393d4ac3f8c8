"""Server start-up failures are reported clearly: busy ports and models that fail to load."""

from __future__ import annotations

import shutil
import socket

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
