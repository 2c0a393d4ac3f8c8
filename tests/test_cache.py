"""Triton's response cache, on the real server: repeats are answered from it, identically, and it is off
unless the repository asks for it."""

from __future__ import annotations

from build.render_repo import render
from build.settings import RepoSettings
from clients.client import ImageClassifierClient
from core import protocol as P
from perf.ab.cache import hit_rate
from serve.server import TritonServer


def test_repeated_images_are_answered_from_the_cache(onnx_model, val_files, tmp_path):
    repo = tmp_path / "repo"
    render(onnx_model, repo, RepoSettings(max_batch_size=8, classifier_instances=1, response_cache_mb=4),
           layout="postprocess")
    first, again = val_files[:6], val_files[:6]
    with TritonServer(repo, None, log_file=tmp_path / "server.log") as s, ImageClassifierClient(s.http_url) as c:
        assert any(a.startswith("--cache-config=local,size=4194304") for a in s.command())
        answers = c.classify_files(first, batch_size=1)
        assert hit_rate(s.metrics_url) == {"hits": 0, "misses": 6, "hit_rate": 0.0}
        repeats = c.classify_files(again, batch_size=1)
        assert hit_rate(s.metrics_url)["hits"] == 6
        c.classify_files(val_files[6:8], batch_size=1)  # new images miss
        assert hit_rate(s.metrics_url) == {"hits": 6, "misses": 8, "hit_rate": 6 / 14}
    assert [(p.labels, p.scores) for p in repeats] == [(p.labels, p.scores) for p in answers]


def test_the_cache_is_off_by_default(repo, server, val_files):
    assert not [a for a in server.command() if a.startswith("--cache")]
    with ImageClassifierClient(server.http_url) as c:
        c.classify_files(val_files[:2] * 2, batch_size=1)
    assert hit_rate(server.metrics_url)["hits"] == 0
    assert 'response_cache' not in (repo / P.ENSEMBLE / "config.pbtxt").read_text()
