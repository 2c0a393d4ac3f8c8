"""Issue 36: `make repo` without `make quantize` serves the fastest engine x precision that needs no calibration
(ONNX Runtime f32, OpenVINO f32, OpenVINO bf16) and passes the accuracy and agreement gate, measured here on
the real engines in seconds; the choice and why are recorded in the repository's build.json."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from build import render_repo
from build.artifacts import ARTIFACT_NAMES, CANDIDATES, ENGINE_MARGIN, ENGINE_REPORT, rendered_candidate
from build.gate import DEFAULT_MIN_AGREEMENT, Bounds, failures
from build.model_config import read_configs
from build.settings import read_manifest
from core import protocol as P


def make_repo(artifacts: Path, out: Path, *flags: str) -> dict:
    """`make repo` with its defaults (PRECISION=auto), as the Makefile runs it."""
    render_repo.main(render_repo.get_args_parser().parse_args(
        ["--artifacts", str(artifacts), "--out", str(out), *flags]))
    return read_manifest(out)


@pytest.fixture()
def artifacts(onnx_model, tmp_path) -> Path:
    out = tmp_path / "artifacts"
    out.mkdir()
    shutil.copy(onnx_model, out / ARTIFACT_NAMES["fp32"])
    return out


def speeds(report: dict) -> dict[str, float]:
    return {n: r["latency"]["best_images_per_s"] for n, r in report["artifacts"].items()}


def test_make_repo_serves_the_fastest_passing_engine_without_make_quantize(artifacts, tiny_data, tmp_path, capsys):
    manifest = make_repo(artifacts, tmp_path / "repo", "--data", str(tiny_data))
    report = json.loads((artifacts / ENGINE_REPORT).read_text())
    no_calibration = {n for n, c in CANDIDATES.items() if c.artifact == "fp32"}
    assert set(report["artifacts"]) | set(report["unsupported"]) == no_calibration
    assert report["min_agreement"] == DEFAULT_MIN_AGREEMENT
    served = rendered_candidate(manifest, artifacts / ARTIFACT_NAMES["fp32"])
    assert served is not None
    chosen = next(n for n, c in CANDIDATES.items() if c == served)
    assert chosen not in report["gate_failures"]
    fast = speeds(report)
    passing = [n for n in fast if n not in report["gate_failures"]]
    assert all(fast[n] <= ENGINE_MARGIN * fast[chosen] for n in passing), (chosen, fast)
    assert manifest["engine_choice"].startswith(f"{served.engine} {served.precision}: {fast[chosen]:.0f} img/s")
    assert str(artifacts / ENGINE_REPORT) in manifest["engine_choice"]
    params = read_configs(tmp_path / "repo")[P.ENSEMBLE].parameters
    assert params["engine"].string_value == served.engine
    assert params["inference_precision"].string_value == served.inference_precision
    assert f"{served.engine}  fitted ({manifest['engine_choice']})" in capsys.readouterr().out  # make repo's table

    # measured once per model: a re-render reads the report back
    measured = (artifacts / ENGINE_REPORT).stat().st_mtime_ns
    assert make_repo(artifacts, tmp_path / "again", "--data", str(tiny_data))["engine_choice"] == \
        manifest["engine_choice"]
    assert (artifacts / ENGINE_REPORT).stat().st_mtime_ns == measured
    assert "choosing the CPU engine" not in capsys.readouterr().out

    # a candidate that answers unlike the FP32 file is not served, however fast: the report's verdicts, with the
    # chosen one's agreement below the bound, send the choice to the next fastest
    report["artifacts"][chosen]["agreement_with_pytorch"] = DEFAULT_MIN_AGREEMENT - 1
    report["gate_failures"] = failures(report["artifacts"], Bounds(report["max_top1_drop"]))
    if chosen == "fp32":  # the reference itself is never gated: make another one the fastest instead
        other = next(n for n in fast if n != "fp32")
        report["artifacts"][other]["latency"]["best_images_per_s"] = 10 * fast["fp32"]
        report["artifacts"][other]["agreement_with_pytorch"] = DEFAULT_MIN_AGREEMENT - 1
        report["gate_failures"] = failures(report["artifacts"], Bounds(report["max_top1_drop"]))
        chosen = other
    assert chosen in report["gate_failures"]
    (artifacts / ENGINE_REPORT).write_text(json.dumps(report))
    again = make_repo(artifacts, tmp_path / "gated", "--data", str(tiny_data))
    assert rendered_candidate(again, artifacts / ARTIFACT_NAMES["fp32"]) != CANDIDATES[chosen]


def test_the_gate_judges_agreement_labelled_or_not_and_spares_only_the_reference():
    def row(top1, agreement, top5=100.0):
        return {"top1": top1, "agreement_with_pytorch": agreement, "top5_overlap": top5}

    results = {"fp32": row(90.0, 90.0), "openvino_fp32": row(90.0, 100.0), "openvino_bf16": row(90.0, 98.9),
               "int8": row(88.0, 100.0), "int8_ort": row(90.0, 100.0, 94.0)}
    assert failures(results, Bounds(1.0)) == ["openvino_bf16", "int8", "int8_ort"]
    assert failures(results, Bounds(2.0, min_agreement=98.0, min_top5_overlap=90.0)) == []
    unlabelled = {n: {**r, "top1": None} for n, r in results.items()}
    assert failures(unlabelled, Bounds(1.0)) == ["openvino_bf16", "int8_ort"]  # no labels: agreement alone


def test_without_images_make_repo_serves_onnx_runtime_and_says_why(artifacts, tmp_path, capsys):
    manifest = make_repo(artifacts, tmp_path / "repo", "--data", str(tmp_path / "nowhere"))
    assert (manifest["engine"], manifest["precision"]) == ("onnxruntime", "fp32")
    assert f"no images at {tmp_path / 'nowhere'} to measure" in capsys.readouterr().out
    assert not (artifacts / ENGINE_REPORT).exists()


def test_gpu_auto_is_the_precision_the_plan_was_built_from(tmp_path):
    for precision in ("fp32", "fp16", "int8"):
        (tmp_path / ARTIFACT_NAMES[precision]).write_bytes(precision.encode())
    plan = tmp_path / "model.plan"
    plan.with_name("model.plan.json").write_text(json.dumps({"onnx_sha256": hashlib.sha256(b"fp16").hexdigest()}))

    def args(**kw) -> argparse.Namespace:
        return argparse.Namespace(**{"precision": "auto", "plan": plan, "artifacts": tmp_path, **kw})

    assert render_repo.gpu_precision(args()) == "fp16"
    assert render_repo.gpu_precision(args(plan=None)) == "fp32"
    assert render_repo.gpu_precision(args(precision="int8")) == "int8"
