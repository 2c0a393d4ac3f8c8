"""Soak against the real tritonserver: the 30-second CI variant of `make soak` (perf/checks/soak.py), and the same
checks catching a model that leaks memory and descriptors."""

from __future__ import annotations

import shutil

from build.render_repo import render
from build.settings import RepoSettings
from core import protocol as P
from perf.checks.soak import plot, soak
from serve.server import TritonServer

# appended to a copy of the served model's model.py: 256 KiB of touched memory and a descriptor per batch, kept
LEAK = '''
import os as _os
_kept = []
_execute = TritonPythonModel.execute
def _leaky_execute(self, requests):
    _kept.append((_os.urandom(1 << 18), open(_os.devnull)))
    return _execute(self, requests)
TritonPythonModel.execute = _leaky_execute
'''


def test_soak_30s_answers_everything_with_flat_memory_and_descriptors(server, val_files, tmp_path):
    r = soak(server, [f.read_bytes() for f in val_files[:16]], duration_s=30, workers=4, window_s=5)
    assert r["checks"] == {"no_errors": True, "rss_flat": True, "fds_flat": True, "stubs_same": True}, \
        (r["errors"], r["examples"], r["rss_mib"], r["fds"])
    assert len(r["windows"]) == 6
    assert all(w["requests"] > 0 and w["errors"] == 0 and w["p99_ms"] for w in r["windows"])
    assert len(r["samples"]) >= 20  # sampled about every second
    png = plot(r, tmp_path / "soak.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def test_soak_catches_a_model_that_leaks(onnx_model, val_files, tmp_path):
    repo = tmp_path / "repo"
    render(onnx_model, repo, RepoSettings(max_batch_size=8, top_k=3))
    code = repo / P.ENSEMBLE / "1" / "model.py"  # the default (fused) layout's one model
    code.write_text(code.read_text() + LEAK)
    with TritonServer(repo, None, log_file=tmp_path / "server.log") as s:
        r = soak(s, [f.read_bytes() for f in val_files[:16]], duration_s=15, workers=4, window_s=5)
    assert r["checks"]["no_errors"], r["examples"]  # it still answers: only the resources show it
    assert not r["checks"]["rss_flat"], (r["rss_mib"], r["fds"])
    assert not r["checks"]["fds_flat"], (r["rss_mib"], r["fds"])
    assert not r["passed"]
    shutil.rmtree(repo)
