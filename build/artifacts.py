"""The artifact files of a build (``make onnx``, ``make quantize``) and which one a target serves."""

from __future__ import annotations

import json
from pathlib import Path

ARTIFACT_NAMES = {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "int8": "model_int8.onnx",
                  "int8_ort": "model_int8_ort.onnx"}
REPORT = "build_report.json"  # build.quantize's report: every artifact's scores and the embedded INT8 choice
PRECISIONS = ("fp32", "fp16", "int8")


def artifact_for(precision: str, artifacts: Path, target: str = "embedded") -> Path:
    """The ONNX file a target serves for a precision. Embedded INT8: the build report's CPU choice; the GPU
    target builds its engine from the ModelOpt Q/DQ file (its path is returned whether or not it exists yet)."""
    if precision not in PRECISIONS:
        raise ValueError(f"PRECISION must be fp32, fp16 or int8, got {precision!r}")
    if target != "embedded":
        return Path(artifacts) / ARTIFACT_NAMES[precision]
    if precision in ("fp32", "fp16"):
        path = Path(artifacts) / ARTIFACT_NAMES[precision]
    else:
        report_path = Path(artifacts) / REPORT
        if not report_path.is_file():
            raise FileNotFoundError(f"{report_path} not found: run `make quantize` first")
        choice = json.loads(report_path.read_text())["embedded_int8"]
        if choice is None:
            raise ValueError("no INT8 artifact passed the accuracy gate (see build_report.md)")
        path = Path(artifacts) / ARTIFACT_NAMES[choice]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `make {'onnx' if precision == 'fp32' else 'quantize'}` first")
    return path
