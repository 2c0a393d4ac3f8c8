"""Issue 34: quantizing, and choosing the engine, with a folder of images and no labels. Calibration needs no
labels; the gate judges each candidate by its agreement with the reference on held-out images of the folder
(top-1 agreement, top-5 overlap), and labelled data is gated on agreement too."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from skimage import data as skdata

from build import quantize, render_repo
from build.artifacts import ARTIFACT_NAMES, ENGINE_REPORT, REPORT
from build.gate import HELD_OUT_EVERY, gate_images


@pytest.fixture(scope="module")
def folder(tiny_data, tmp_path_factory) -> Path:
    """A user's folder of sample images: the data set's images without their class folders, in two made-up
    subfolders, and real photographs in several encodings."""
    out = tmp_path_factory.mktemp("samples")
    images = sorted(p for p in tiny_data.rglob("*") if p.suffix in (".jpg", ".png"))
    for i, p in enumerate(images):
        sub = out / ("phone" if i % 2 else "camera")
        sub.mkdir(exist_ok=True)
        shutil.copy(p, sub / f"{i:04d}{p.suffix}")
    for name in ("astronaut", "chelsea", "coffee"):
        Image.fromarray(getattr(skdata, name)()).save(out / f"{name}.jpg", quality=90)
        buf = io.BytesIO()
        Image.fromarray(getattr(skdata, name)()).save(buf, "PNG")
        (out / f"{name}.png").write_bytes(buf.getvalue())
    return out


def test_the_folder_is_split_into_judged_and_calibration_images(folder, onnx_model):
    from core.metadata import read_metadata

    found = gate_images(folder, read_metadata(onnx_model).classes)
    assert found.labels is None
    every = sorted(p for p in folder.rglob("*") if p.is_file())
    assert len(found.judge) == len(every) // HELD_OUT_EVERY
    assert not set(found.judge) & set(found.calibrate)
    assert set(found.judge) | set(found.calibrate) == set(every)


def test_quantize_an_unlabelled_folder_gated_on_agreement(folder, onnx_model, tmp_path, capsys):
    shutil.copy(onnx_model, tmp_path / "model.onnx")
    report = quantize.build(tmp_path / "model.onnx", folder, tmp_path, calib_size=16, precisions=("int8_ort",),
                            engines=("onnxruntime",), min_agreement=90.0, min_top5_overlap=90.0)
    assert report["labelled"] is False
    assert "no labels" in report["gate"]
    rows = report["artifacts"]
    assert set(rows) == {"fp32", "int8_ort"}
    assert all(r["top1"] is None for r in rows.values())
    assert all(0 <= r["agreement_with_pytorch"] <= 100 for r in rows.values())
    assert all(0 <= r["top5_overlap"] <= 100 for r in rows.values())
    assert report["val_images"] == len(gate_images(folder, ["x"]).judge)
    sources = (tmp_path / "calib" / "calib_sources.txt").read_text()
    judged = {str(p.relative_to(folder)) for p in gate_images(folder, ["x"]).judge}
    assert not {line.split("  ", 1)[1] for line in sources.splitlines()} & judged
    md = (tmp_path / "build_report.md").read_text()
    assert "unlabelled" in md
    assert "| int8_ort | onnxruntime | int8 | model_int8_ort.onnx |" in md
    assert "| – |" in md  # no top-1 without labels
    if "int8_ort" not in report["gate_failures"]:
        assert (tmp_path / ARTIFACT_NAMES["int8_ort"]).is_file()

    # the gate is applied: above what any candidate can reach, the build fails naming why, and writes nothing
    (tmp_path / ARTIFACT_NAMES["int8_ort"]).unlink(missing_ok=True)
    with pytest.raises(quantize.AccuracyGateError, match=r"int8_ort: .*top-5 overlap .* \(at least 100.5%\)"):
        quantize.build(tmp_path / "model.onnx", folder, tmp_path, calib_size=16, precisions=("int8_ort",),
                       engines=("onnxruntime",), min_agreement=0.0, min_top5_overlap=100.5)
    assert not (tmp_path / ARTIFACT_NAMES["int8_ort"]).exists()
    assert json.loads((tmp_path / REPORT).read_text())["gate_failures"] == ["int8_ort"]


def test_make_repo_chooses_the_engine_on_an_unlabelled_folder(folder, onnx_model, tmp_path):
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    shutil.copy(onnx_model, artifacts / "model.onnx")
    render_repo.main(render_repo.get_args_parser().parse_args(
        ["--artifacts", str(artifacts), "--data", str(folder), "--out", str(tmp_path / "repo")]))
    report = json.loads((artifacts / ENGINE_REPORT).read_text())
    assert report["labelled"] is False
    assert "fp32" in report["artifacts"]
    assert json.loads((tmp_path / "repo" / "build.json").read_text())["engine_choice"]
