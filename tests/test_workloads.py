"""The workloads of the performance report: real photographs of ImageNet-like size, and a model
trained, quantized, served on its fastest engine and measured side by side on them."""

from __future__ import annotations

import hashlib
import json

from PIL import Image

from build.artifacts import CANDIDATES
from perf.report import workloads
from training.real_datasets import CROPS_PER_PHOTO, PHOTO_SIZE, PHOTOGRAPHS, write_imagefolder


def test_photos_are_real_photographs_at_imagenet_size(tmp_path):
    root = write_imagefolder("photos", tmp_path / "photos")
    files = sorted(root.rglob("*.jpg"))
    assert len(files) == len(PHOTOGRAPHS) * CROPS_PER_PHOTO
    assert sorted(p.name for p in (root / "val").iterdir()) == sorted(PHOTOGRAPHS)
    for f in files[::17]:
        with Image.open(f) as im:
            assert im.format == "JPEG"
            assert im.size == PHOTO_SIZE
            assert im.mode == "RGB"
    sizes = [f.stat().st_size for f in files]
    assert 30_000 < sum(sizes) / len(sizes) < 200_000  # photographs, not flat synthetic shapes (~5 KB)
    assert len({hashlib.sha256(f.read_bytes()).hexdigest() for f in files}) == len(files)  # every crop its own


def test_a_workload_is_trained_quantized_served_on_its_fastest_engine_and_compared(checkpoint, tiny_data, tmp_path,
                                                                                  monkeypatch):
    tiny = workloads.Workload("tiny-photos", "resnet_tiny", 32, "photos")
    monkeypatch.setitem(workloads.WORKLOADS, tiny.name, tiny)
    r = workloads.measure(["demo-synthetic", tiny.name], tmp_path / "work", checkpoint, tiny_data, tmp_path / "out",
                          rounds=1, seconds=1, connections=4, concurrencies=(1, 4), p99_budget_ms=1e6)
    for name in ("demo-synthetic", tiny.name):
        x = r["workloads"][name]
        report = json.loads((tmp_path / "work" / name / "build_report.json").read_text())
        chosen = CANDIDATES[report["serving"]["auto"]]
        assert (x["engine"], x["precision"]) == (chosen.engine, chosen.precision)
        assert x["served_candidate"] == report["serving"]["auto"]
        assert x["compare"]["ceiling_engine"] == chosen.engine  # the ceiling runs what is served
        summary = x["compare"]["summary"]
        assert {"baseline", "in-process ceiling"} <= set(summary)
        assert all(s["images_per_s"]["median"] > 0 for s in summary.values())
    assert r["workloads"][tiny.name]["workload"]["img_size"] == 32
    for x in r["workloads"].values():  # p99 against concurrency, Triton alone; every point within a huge budget
        assert [p["concurrency"] for p in x["latency"]["rows"]] == [1, 4]
        assert all(p["images_per_s"] > 0 and p["p99_ms"] > 0 and p["errors"] == 0 for p in x["latency"]["rows"])
        assert x["latency"]["highest_within_budget"] == 4
        sat = x["latency"]["saturation"]
        assert sat["peak_images_per_s"] == max(p["images_per_s"] for p in x["latency"]["rows"])
        assert sat["images_per_s"] >= 0.9 * sat["peak_images_per_s"]
    assert "| tiny-photos | " in workloads.saturation_markdown(r)
    assert "| tiny-photos | " in workloads.latency_markdown(r)
    assert "highest within" in workloads.latency_markdown(r)
    md = workloads.markdown(r)
    assert "| tiny-photos | resnet_tiny @ 32 |" in md
    assert "(≥ 0.85:" in md
    assert "(≥ 0.9:" in md
    # the architecture table: the trained model only (the demo has no build of its own here), from its report
    table = workloads.architectures_markdown(r).splitlines()
    report = json.loads((tmp_path / "work" / tiny.name / "build_report.json").read_text())
    assert len(table) == 3
    assert table[2].startswith("| resnet_tiny @ 32 | ")
    fp32, int8 = report["artifacts"]["fp32"]["top1"], report["artifacts"]["int8_ort"]["top1"]
    assert f"| {fp32:.1f}% |" in table[2]
    assert f"| {fp32 - int8:.1f} / " in table[2]


def test_the_highest_concurrency_within_the_budget():
    from perf.load.wrk import within_budget

    rows = [{"concurrency": c, "p99_ms": p, "errors": e} for c, p, e in
            ((1, 5.0, 0), (2, 8.0, 0), (4, 30.0, 0), (8, 45.0, 3), (16, 90.0, 0))]
    assert within_budget(rows, 50.0)["concurrency"] == 4  # 8 is within 50 ms but failed requests
    assert within_budget(rows, 8.0)["concurrency"] == 2
    assert within_budget(rows, 1.0) is None


def _side_by_side(triton: float, peer: float, ceiling: float, triton_p99: float, baseline_p99: float) -> dict:
    def one(v: float) -> dict:
        return {"median": v, "min": v, "max": v}

    summary = {"triton (fused)": {"images_per_s": one(triton), "p99_ms": one(triton_p99)},
               "bentoml": {"images_per_s": one(peer), "p99_ms": one(1.0)},
               "baseline": {"images_per_s": one(10.0), "p99_ms": one(baseline_p99)},
               "in-process ceiling": {"images_per_s": one(ceiling)}}
    ratios = {"triton (fused) / bentoml": one(triton / peer), "triton (fused) / baseline": one(triton / 10.0),
              "triton (fused) / in-process ceiling": one(triton / ceiling)}
    return {"workload": {"arch": "resnet50", "img_size": 224, "name": "w", "images": "photos"},
            "engine": "openvino", "precision": "int8", "compare": {"summary": summary, "throughput_ratios": ratios}}


def test_each_target_is_met_or_missed_by_how_much_and_why():
    """The report's verdicts from a run's figures: Triton against the ceiling (0.9 on 224 px), the best peer
    (1.5x) and the baseline's p99; a miss says where the time goes."""
    engine_bound = workloads.targets(_side_by_side(150, 135, 160, 200, 900), cores=2)
    assert engine_bound["ceiling"][2] == "met"
    assert engine_bound["p99"][2] == "met"
    assert engine_bound["peer"][3] == "missed by 26%"  # 150 / 135 = 1.11 against 1.5
    assert any("reaches 0.84 of the ceiling" in w and "no server can be 1.5x" in w for w in engine_bound["why"])
    overhead = workloads.targets(_side_by_side(400, 100, 1000, 50, 40), cores=2)
    assert overhead["ceiling"][2] == "missed by 56%"
    assert overhead["peer"][3] == "met"
    assert overhead["p99"][2] == "missed: 50 ms against 40"
    # 2 cores: 5.00 ms of a core per image served, 2.00 in the ceiling
    assert any("5.00 ms of a core per image against the ceiling's 2.00 ms: 3.00 ms" in w for w in overhead["why"])
    md = workloads.markdown({"workloads": {"w": _side_by_side(400, 100, 1000, 50, 40)}}, cores=2)
    assert "| bentoml img/s |" in md
    assert "(bentoml; ≥ 1.5: met)" in md
    assert "- w: the served path spends" in md


def test_saturation_is_the_peak_and_the_latency_of_getting_near_it():
    from perf.load.wrk import saturation

    rows = [{"concurrency": c, "images_per_s": t, "p99_ms": p, "errors": e}
            for c, t, p, e in ((1, 100, 10, 0), (4, 380, 14, 0), (16, 400, 60, 0), (64, 420, 250, 3))]
    s = saturation(rows)
    assert (s["peak_images_per_s"], s["peak_concurrency"]) == (400, 16)  # 64 connections dropped requests
    assert (s["concurrency"], s["images_per_s"], s["p99_ms"]) == (4, 380, 14)  # 380 >= 0.9 x 400
    assert saturation(rows, share=0.99)["concurrency"] == 16

