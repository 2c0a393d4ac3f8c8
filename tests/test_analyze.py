"""`make analyze`: the real Triton Model Analyzer (its own virtualenv, `make analyzer`) searching the served
fused model with the real server and perf_analyzer, and its winner written back to the repository."""

from __future__ import annotations

import psutil
import pytest

from build.model_config import read_configs
from build.render_repo import render
from build.settings import RepoSettings, read_manifest
from core import protocol as P
from perf.tuning.analyze import analyze


def test_model_analyzer_searches_and_its_winner_is_written_back(onnx_model, tiny_data, tmp_path):
    live = tmp_path / "repo"
    render(onnx_model, live, RepoSettings(max_batch_size=4, top_k=3))
    before, inode = read_manifest(live)["settings"], live.stat().st_ino
    # one configuration to search (2 instances, max batch 8), unlike the repository's own (3, 4). Model
    # Analyzer also measures the repository's own configuration, at concurrencies of its choosing (2 among
    # them, in some runs), so either may win: the winner is checked against the rule, not assumed
    s = analyze(live, tiny_data / "val", tmp_path / "out", p99_budget_ms=10_000, instances=(2, 2), batch=(8, 8),
                concurrency=(2, 2))
    assert (before["classifier_instances"], before["max_batch_size"]) == (3, 4)
    rows = s["results"]
    assert rows
    assert all(r["throughput"] > 0 and r["p99_ms"] > 0 for r in rows)
    assert any((r["instances"], r["max_batch_size"], r["concurrency"]) == (2, 8, 2) for r in rows)
    asked = [r for r in rows if r["concurrency"] == 2 and r["satisfies_constraints"] and r["p99_ms"] <= 10_000]
    best = s["best"]
    assert s["budget_met"]
    assert best == max(asked, key=lambda r: r["throughput"])
    # written back: the repository rendered again, with the winner's instances and max batch, nothing else changed
    after = read_manifest(live)["settings"]
    assert live.stat().st_ino != inode
    assert (after["classifier_instances"], after["max_batch_size"]) == (best["instances"], best["max_batch_size"])
    assert {k: v for k, v in after.items() if k not in ("classifier_instances", "max_batch_size")} == \
        {k: v for k, v in before.items() if k not in ("classifier_instances", "max_batch_size")}
    assert read_configs(live)[P.ENSEMBLE].instance_group[0].count == best["instances"]
    assert (tmp_path / "out" / "metrics-model-inference.csv").is_file()
    # the servers and perf_analyzer it started are gone with it
    left = [p for p in psutil.process_iter(["cmdline"]) if any("model-analyzer-" in a for a in p.info["cmdline"] or ())]
    assert not left, [p.info["cmdline"][:3] for p in left]


def test_analyze_refuses_an_ensemble_repository_and_leaves_it_alone(ensemble_repo, tiny_data, tmp_path):
    before = {p: p.read_bytes() for p in ensemble_repo.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="fused model"):
        analyze(ensemble_repo, tiny_data / "val", tmp_path / "out")
    assert {p: p.read_bytes() for p in ensemble_repo.rglob("*") if p.is_file()} == before
