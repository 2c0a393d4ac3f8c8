"""The workloads of the performance report: real photographs of ImageNet-like size, and a model
trained, quantized, served on its fastest engine and measured side by side on them."""

from __future__ import annotations

import hashlib
import json

from PIL import Image

from build.artifacts import CANDIDATES
from perf import workloads
from training.real_datasets import CROPS_PER_PHOTO, PHOTO_SIZE, PHOTOGRAPHS, write_imagefolder


def test_photos_are_real_photographs_at_imagenet_size(tmp_path):
    root = write_imagefolder("photos", tmp_path / "photos")
    files = sorted(root.rglob("*.jpg"))
    assert len(files) == len(PHOTOGRAPHS) * CROPS_PER_PHOTO
    assert sorted(p.name for p in (root / "val").iterdir()) == sorted(PHOTOGRAPHS)
    for f in files[::17]:
        with Image.open(f) as im:
            assert im.format == "JPEG" and im.size == PHOTO_SIZE and im.mode == "RGB"
    sizes = [f.stat().st_size for f in files]
    assert 30_000 < sum(sizes) / len(sizes) < 200_000  # photographs, not flat synthetic shapes (~5 KB)
    assert len({hashlib.sha256(f.read_bytes()).hexdigest() for f in files}) == len(files)  # every crop its own


def test_a_workload_is_trained_quantized_served_on_its_fastest_engine_and_compared(checkpoint, tiny_data, tmp_path,
                                                                                  monkeypatch):
    tiny = workloads.Workload("tiny-photos", "resnet_tiny", 32, "photos")
    monkeypatch.setitem(workloads.WORKLOADS, tiny.name, tiny)
    r = workloads.measure(["demo-synthetic", tiny.name], tmp_path / "work", checkpoint, tiny_data, tmp_path / "out",
                          rounds=1, seconds=1, connections=4)
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
    md = workloads.markdown(r)
    assert "| tiny-photos | resnet_tiny @ 32 |" in md and "(≥ 0.85:" in md and "(≥ 0.9:" in md
    # the architecture table: the trained model only (the demo has no build of its own here), from its report
    table = workloads.architectures_markdown(r).splitlines()
    report = json.loads((tmp_path / "work" / tiny.name / "build_report.json").read_text())
    assert len(table) == 3 and table[2].startswith("| resnet_tiny @ 32 | ")
    fp32, int8 = report["artifacts"]["fp32"]["top1"], report["artifacts"]["int8_ort"]["top1"]
    assert f"| {fp32:.1f}% |" in table[2] and f"| {fp32 - int8:.1f} / " in table[2]
