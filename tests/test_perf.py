"""Smoke runs of the load-testing harnesses, for real and for seconds: perf_analyzer, locust,
the naive baseline, the batching tuner and the report generator. Full sweeps are make targets."""

from __future__ import annotations

import csv
import json
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import MAX_BATCH

from build.render_repo import labels_file
from build.settings import RepoSettings, read_manifest
from core import protocol as P
from perf import report
from perf.load.loadtest import run_locust
from perf.load.perf_analyzer import rate_limits, run_point, write_input_data
from perf.tuning import tune
from serve.server import free_ports

COMPOSING = (P.PREPROCESS, P.CLASSIFIER, P.POSTPROCESS)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_point_with_server_breakdown(ensemble_server, val_files, tmp_path, protocol):
    server = ensemble_server  # the breakdown per composing model (the fused layout has one model: test_report_quick)
    data = write_input_data([f.read_bytes() for f in val_files[:16]], tmp_path / "input.json")
    url = server.http_url if protocol == "http" else server.grpc_url
    point = run_point(url, server.http_url, protocol, "concurrency", 4, data, tmp_path, server.proc.pid,
                      interval_ms=500, metrics_url=server.metrics_url, request_count=60)
    assert point.throughput > 0
    assert 0 < point.latency_ms(50) <= point.latency_ms(99)
    with open(tmp_path / f"perf_analyzer_{protocol}_concurrency_4.csv") as f:
        row = next(csv.DictReader(f))
    assert {"Server Queue", "Server Compute Infer", "p99 latency"} <= set(row)
    # every composing model of the ensemble saw every request, batched by the dynamic batcher
    reqs = {m: point.server[m]["requests"] for m in (P.ENSEMBLE, *COMPOSING)}
    assert len(set(reqs.values())) == 1, reqs
    assert reqs[P.ENSEMBLE] > 0, reqs
    for m in COMPOSING:
        assert 1 <= point.server[m]["avg_batch"] <= MAX_BATCH
        assert point.server[m]["compute_infer_us"] > 0
        assert point.metrics["models"][m]["requests"] == reqs[m]  # Prometheus agrees with the statistics API
    assert point.usage["cpu_cores_busy"] > 0
    assert point.usage["rss_mib"] > 50


@pytest.fixture(scope="module")
def baseline_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("baseline") / "server.log"


@pytest.fixture(scope="module")
def baseline_url(checkpoint, baseline_log):
    (port,) = free_ports(1)
    proc = report.start_baseline(str(checkpoint), port, baseline_log)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(30)


def test_baseline_keeps_serving_after_logging_a_pipe_full(baseline_url, baseline_log, val_files):
    # Flask logs a line per request; an unread stderr pipe (64 KiB) stalled the server after ~950 requests
    for _ in range(1500):
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(urllib.request.Request(f"{baseline_url}/predict", data=b"x"), timeout=10)
    req = urllib.request.Request(f"{baseline_url}/predict", data=val_files[0].read_bytes())
    assert len(json.loads(urllib.request.urlopen(req, timeout=10).read())["labels"]) == 5
    assert baseline_log.read_text().count("POST /predict") >= 1500


def test_baseline_serves_the_checkpoint(baseline_url, val_files, checkpoint):
    from training.checkpoint import load_checkpoint

    classes = load_checkpoint(checkpoint)["classes"]
    req = urllib.request.Request(f"{baseline_url}/predict", data=val_files[0].read_bytes())
    answer = json.loads(urllib.request.urlopen(req, timeout=10).read())
    assert len(answer["labels"]) == 5
    assert set(answer["labels"]) <= set(classes)
    assert answer["scores"] == sorted(answer["scores"], reverse=True)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(f"{baseline_url}/predict", data=b"not an image"), timeout=10)
    assert e.value.code == 400


@pytest.mark.parametrize("user", ["TritonHttpUser", "TritonGrpcUser", "BaselineUser"])
def test_locust_runs_and_checks_answers(server, baseline_url, tiny_data, repo, tmp_path, user):
    host = baseline_url if user == "BaselineUser" else f"http://{server.http_url}"
    top_k = 5 if user == "BaselineUser" else read_manifest(repo)["settings"]["top_k"]
    labels = labels_file(repo)
    res = run_locust(user, host, 3, 3, tmp_path, tiny_data / "val", labels, top_k, server.grpc_url)
    assert res["requests"] > 0, res["failure_kinds"]
    assert res["failures"] == 0, res["failure_kinds"]
    assert res["rps"] > 0
    assert res["p50_ms"] <= res["p99_ms"]
    assert Path(res["html"]).read_text().lstrip().lower().startswith("<!doctype html")


def test_locust_counts_wrong_answers_as_failures(server, tiny_data, repo, tmp_path):
    """The check is real: expecting a different top-k makes every answer a failure."""
    res = run_locust("TritonHttpUser", f"http://{server.http_url}", 2, 2, tmp_path, tiny_data / "val",
                     labels_file(repo), top_k=2)
    assert res["requests"] > 0
    assert res["failures"] == res["requests"]
    assert "LABELS shape [1, 3]" in res["failure_kinds"][0]["error"]


def test_tuner_chooses_within_budget_and_writes_back(onnx_model, tiny_data, tmp_path):
    target = tmp_path / "repo"
    grid = {"queue_delay_us": [0, 2000], "preferred_batch_sizes": [()], "instances": [(1, 1)]}
    summary = tune.tune(onnx_model, tiny_data / "val", tmp_path / "tuning", RepoSettings(max_batch_size=MAX_BATCH),
                        grid, concurrency=2, p99_budget_ms=10_000, interval_ms=500, apply_to=target,
                        request_count=60,  # fixed counts: a busy machine cannot fail to stabilize
                        layout="classification",  # measured and written back in the repository's own layout
                        rounds=2)
    assert len(summary["results"]) == 2
    assert summary["budget_met"]
    for x in summary["results"]:  # ranked by the median of its rounds, each round kept
        assert len(x["rounds"]) == 2
        assert x["throughput"] == pytest.approx(float(np.median([p["throughput"] for p in x["rounds"]])))
        assert x["throughput_range"] == [min(p["throughput"] for p in x["rounds"]),
                                         max(p["throughput"] for p in x["rounds"])]
    assert read_manifest(target)["layout"] == "classification"
    assert summary["best"]["throughput"] == max(r["throughput"] for r in summary["results"])
    assert read_manifest(target)["settings"]["queue_delay_us"] == summary["best"]["settings"]["queue_delay_us"]
    assert (json.loads((tmp_path / "tuning" / "tuning.json").read_text())["best"]
            == json.loads(json.dumps(summary["best"])))


def test_tuner_choice_rule():
    rows = [{"throughput": 900, "p99_ms": 80}, {"throughput": 700, "p99_ms": 30}, {"throughput": 600, "p99_ms": 20}]
    assert tune.choose(rows, 50) == ({"throughput": 700, "p99_ms": 30}, True)
    assert tune.choose(rows, 10) == ({"throughput": 600, "p99_ms": 20}, False)


def test_report_quick(repo, tiny_data, checkpoint, tmp_path):
    profile = replace(report.QUICK, concurrency=(1, 2), locust_users=2, locust_seconds=2, request_count=60)
    # with a workload measured in the same run (make report REPORT_WORKLOADS=...)
    workload_args = {"work": tmp_path / "work", "demo_ckpt": checkpoint, "demo_data": tiny_data, "rounds": 1,
                     "seconds": 1, "connections": 4, "concurrencies": (1, 2)}
    out = report.run(repo, tiny_data / "val", tmp_path, profile, workloads=("demo-synthetic",),
                     workload_args=workload_args)  # checks the page in headless Chromium too
    md = (out / "report.md").read_text()
    head = md.splitlines()[:8]
    assert any("Triton vs naive baseline" in ln and "×" in ln for ln in head)
    assert any("Triton vs in-process ceiling" in ln and "×" in ln for ln in head)
    results = json.loads((out / "results.json").read_text())
    h = results["headline"]
    assert h["triton_rps"] > 0
    assert h["baseline_rps"] > 0
    assert f"{h['baseline_ratio']:.2f}×" in md
    assert f"{h['ceiling_ratio']:.2f}×" in md
    pngs = ("throughput_vs_concurrency.png", "latency_vs_concurrency.png", "triton_vs_baseline_vs_ceiling.png",
            "dali_vs_pillow.png", "request_rate.png", "compare.png")
    page = (out / "report.html").read_text()
    for png in pngs:
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
        assert f'src="{png}"' in page
    # every server under one generator, with the targets checked, in the page's headline
    assert any("Side by side (wrk" in ln and "best" not in ln and "baseline" in ln for ln in head)
    assert set(results["compare"]["summary"]) == {"triton (fused)", "baseline", "in-process ceiling"}
    assert "<table" in page
    assert "## " not in page
    assert len(list((out / "perf_analyzer").glob("*.csv"))) == 2 * 2 + 1  # 2 protocols x 2 concurrencies + 1 rate
    assert "## Server-side breakdown" in md.replace("### Server-side", "## Server-side")
    assert "config.pbtxt" in md
    # the rate sweep is open loop, and says for its point what limited it
    rate_log = next((out / "perf_analyzer").glob("perf_analyzer_grpc_request_rate_*.log")).read_text()
    assert "--async --max-threads" in rate_log.splitlines()[0]
    assert "### Request rate: achieved against offered" in md
    assert "| limited by |" in md
    assert "## Engines and precisions" in md
    assert results["ceiling"]["best_schedule"] in ("sequential", "overlapped")
    assert "## Workloads" in md
    assert "| demo-synthetic | resnet_tiny (demo) @ 64 |" in md
    assert "p99 ms at 2" in md
    assert set(results["workloads"]["workloads"]) == {"demo-synthetic"}


def _rate_point(offered: float, achieved: float, p99_ms: float, behind: bool = False) -> dict:
    return {"mode": "request_rate", "value": offered, "generator_behind": behind,
            "client": {"Inferences/Second": str(achieved), "p99 latency": str(p99_ms * 1000)}}


def test_rate_points_say_what_limited_them():
    # the shape seen in a report: offered 1,167 and 1,556, achieved 782 both times, p99 lower than below them
    points = [_rate_point(389, 389, 7.0), _rate_point(778, 776, 9.4), _rate_point(1167, 782, 8.9),
              _rate_point(1556, 782, 8.9)]
    assert rate_limits(points) == ["offered", "offered", "generator", "generator"]
    # short of the rate with latency turning: the server saturated
    points[3] = _rate_point(1556, 1100, 60.0)
    assert rate_limits(points) == ["offered", "offered", "generator", "server"]
    # perf_analyzer's own warning that it fell behind is believed whatever the latency
    points[3] = _rate_point(1556, 1100, 60.0, behind=True)
    assert rate_limits(points)[3] == "generator"
    assert rate_limits([]) == []
    assert rate_limits([{"mode": "concurrency", "value": 4}]) == []


def test_jpegs_and_tensors_measured_side_by_side(ensemble_server, onnx_model, val_files, tmp_path):
    """The GPU report's throughput table: perf_analyzer from JPEG bytes (the ensemble) and from pre-decoded
    tensors (the classifier alone), here against the embedded server in the ensemble layout, with fixed
    request counts so a busy machine cannot make it fail to stabilize."""
    server = ensemble_server
    from core.metadata import read_metadata
    from core.preprocess import DaliPreprocessor
    from perf.load.perf_analyzer import jpeg_and_tensor_inputs, jpegs_and_tensors

    blobs = [f.read_bytes() for f in val_files[:8]]
    pixels = DaliPreprocessor(read_metadata(onnx_model).preprocess)(blobs)
    from perf.load.stats import model_stats, stats_delta

    before = model_stats(server.http_url)
    inputs = jpeg_and_tensor_inputs(P.PIXELS, blobs, pixels, tmp_path)
    rows = jpegs_and_tensors(server.grpc_url, server.http_url, "grpc", inputs, [1, 2], tmp_path, request_count=40)
    delta = stats_delta(before, model_stats(server.http_url))
    assert [(r["source"], r["concurrency"]) for r in rows] == [("jpeg", 1), ("tensors", 1), ("jpeg", 2), ("tensors", 2)]
    assert all(r["images_per_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"] for r in rows)
    # the tensor runs reached the classifier without going through preprocessing (2 runs of at least 40)
    assert delta[P.CLASSIFIER]["requests"] - delta[P.PREPROCESS]["requests"] >= 80, delta


def test_side_by_side_with_one_generator(server, baseline_url, val_files, tmp_path):
    """wrk drives Triton (KServe binary tensors) and the baseline (raw JPEGs) with the same images, in
    alternating rounds; every figure comes with its range and the generator's CPU."""
    from perf.load.rounds import compare
    from perf.load.wrk import Target
    from perf.reference.compare_report import plot, render_markdown

    targets = [Target("triton", f"http://{server.http_url}", f"/v2/models/{P.ENSEMBLE}/infer", "kserve"),
               Target("baseline", baseline_url, "/predict", "raw")]
    r = compare(targets, [f.read_bytes() for f in val_files[:8]], rounds=2, seconds=2, connections=4, threads=1,
                warmup_s=1)
    assert r["order"] == [["triton", "baseline"], ["baseline", "triton"]]
    for name in ("triton", "baseline"):
        s = r["summary"][name]
        assert s["errors"] == 0, s
        assert s["requests"] > 0, s
        assert s["images_per_s"]["min"] <= s["images_per_s"]["median"] <= s["images_per_s"]["max"]
        assert len(r["runs"][name]) == 2
        assert all(x["generator_cores"] >= 0 for x in r["runs"][name])
    ratio = r["throughput_ratios"]["triton / baseline"]["median"]
    per_run = [a["per_s"] / b["per_s"] for a, b in zip(r["runs"]["triton"], r["runs"]["baseline"], strict=True)]
    assert abs(ratio - np.median(per_run)) < 0.01
    assert "| triton |" in render_markdown(r)
    assert plot(r, tmp_path / "c.png").stat().st_size > 5000
    # a request the server refuses is caught before anything is measured
    with pytest.raises(RuntimeError, match="answered request body 0 with 400"):
        compare([Target("triton", f"http://{server.http_url}", f"/v2/models/{P.ENSEMBLE}/infer", "kserve")],
                [b"not an image"], rounds=1, seconds=1, connections=1, threads=1, warmup_s=1)


def test_tuner_refuses_a_gpu_repository_and_leaves_it_alone(onnx_model, tiny_data, tmp_path):
    """`make tune TARGET=gpu` used to sweep the embedded pipeline and write it over the GPU repository."""
    import hashlib

    from build.render_repo import render

    gpu = tmp_path / "gpu_repo"
    render(onnx_model, gpu, RepoSettings(max_batch_size=MAX_BATCH), target="gpu")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in gpu.rglob("*") if p.is_file()}
    args = tune.get_args_parser().parse_args(["--repo", str(gpu), "--images", str(tiny_data / "val"),
                                              "--out", str(tmp_path / "tuning")])
    with pytest.raises(tune.TuneError, match="'gpu' target"):
        tune.main(args)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in gpu.rglob("*") if p.is_file()} == before


def test_browser_check_sees_a_figure_that_does_not_load(tmp_path):
    """The report's page counts its figures in a real headless Chromium: a missing PNG is seen, and named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from perf.report.browser import check
    from perf.report.render import to_html

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [1, 0])
    fig.savefig(tmp_path / "there.png")
    plt.close(fig)
    md = "# A page\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n\n![there](there.png)\n\n![gone](gone.png)\n"
    (tmp_path / "page.html").write_text(to_html(md, "check"))
    seen = check(tmp_path / "page.html", tmp_path / "page.png", height=800)
    assert (seen["images"], seen["loaded"], seen["tables"]) == (2, 1, 1)
    assert (tmp_path / "page.png").read_bytes()[:4] == b"\x89PNG"


def test_flood_measures_goodput_of_both_queues(repo, tiny_data, tmp_path):
    """make flood-check's quick form: both queues served, the capacity and the flood measured by wrk. What is
    asserted does not depend on speed: beyond what the old queue and the instances hold, the old queue refuses
    and the queue held by time refuses nothing (no request waits its 5 s here)."""
    from perf.ab import flood

    r = flood.measure(repo, tiny_data / "val", tmp_path, rounds=1, seconds=1, connections=4, flood_connections=256)
    old, held = (r["summary"][name] for name, _, _ in flood.servers())
    settings = read_manifest(repo)["settings"]
    assert flood.OLD_QUEUE + settings["classifier_instances"] * settings["max_batch_size"] < 256
    assert old["flood_refused_per_s"]["median"] > 0
    assert held["flood_refused_per_s"]["median"] == 0
    for s in (old, held):
        assert s["capacity_per_s"]["median"] > 0
        assert s["flood_good_per_s"]["median"] > 0
        assert s["other_errors"] == 0
    md = flood.markdown(r)
    assert all(f"| {name} |" in md for name in r["summary"])
    assert md.count("target 0.8") == 2
