"""The CPU engine `make repo` serves when `make quantize` has not run: the exported FP32 file on every engine and
precision hint that needs no calibration data (ONNX Runtime f32, OpenVINO f32, OpenVINO bf16), scored and
timed on this machine on a stratified sample of the val split, in seconds, and gated on top-1 and on
agreement with the FP32 file on ONNX Runtime. The result is a report in build_report.json's form
(``engine_report.json``), which build.artifacts reads where there is no build report for this model: the
engine choice, the batch and the instances then follow it as they follow make quantize's.

Why measure instead of a rule: which engine wins depends on the model and the CPU (on ResNet-50 here,
OpenVINO bf16 on AMX served 1.9x ONNX Runtime f32; on a CPU without bf16 units bf16 runs as f32), and bf16
changes some answers (on ImageNet photos 3% of top-1s), which the agreement gate catches.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from build.artifacts import ENGINE_REPORT, Candidate
from build.gate import DEFAULT_MIN_AGREEMENT, DEFAULT_MIN_TOP5_OVERLAP, Bounds, describe, failures, gate_images
from core.atomic_io import atomic_write_bytes
from core.metadata import read_metadata

# Images the choice is measured on: enough for the agreement to mean something (one changed answer is 0.4
# points of 256), few enough for seconds on two cores. Stratified where labelled, so a prefix has every class.
PROBE_IMAGES = 256


def probe(onnx_path: Path, data: Path, out_dir: Path, bounds: Bounds, images: int = PROBE_IMAGES) -> dict[str, Any]:
    """Score and time the no-calibration candidates of ``onnx_path`` on ``images`` images of ``data`` (its val
    split, or held-out images of an unlabelled folder: build.gate), gate them, write ``engine_report.json`` in
    ``out_dir`` and return it."""
    from build.quantize import cpu_features, load_judged, score, serving, step  # heavy: only when measuring
    from training.data import stratified

    meta = read_metadata(onnx_path)
    found = gate_images(Path(data), meta.classes)
    if found.labels is not None:
        chosen = stratified(list(zip(found.judge, found.labels.tolist(), strict=True)), images)
        found = replace(found, judge=[p for p, _ in chosen], labels=np.array([y for _, y in chosen]))
    else:
        found = replace(found, judge=found.judge[:images])
    pre, sample = load_judged(meta, found, bounds)
    step(f"choosing the CPU engine: the FP32 file on every engine, {len(found.judge)} images")
    blob = Path(onnx_path).read_bytes()
    unsupported: dict[str, dict] = {}
    results = score({"fp32": blob}, None, pre, found.judge, found.labels, sample, None, unsupported)
    report = {"source_onnx": str(onnx_path), "data": str(data), "val_images": len(found.judge),
              "judged_on": found.source, "labelled": found.labelled, "gate": describe(bounds, found.labelled),
              "max_top1_drop": bounds.max_top1_drop, "min_agreement": bounds.min_agreement,
              "min_top5_overlap": bounds.min_top5_overlap, "artifacts": results,
              "gate_failures": failures(results, bounds), "reference": "the FP32 file on ONNX Runtime",
              "fp32_sha256": hashlib.sha256(blob).hexdigest(), "cpu": cpu_features(), "unsupported": unsupported,
              "measured_by": "make repo (build.engine_choice): no make quantize report for this model"}
    report["serving"] = serving(report)
    out = Path(out_dir) / ENGINE_REPORT
    atomic_write_bytes(out, lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    print(f"wrote {out}")
    return report


def why(report: dict[str, Any], name: str, candidate: Candidate) -> str:
    """One line: what was chosen, against what, on what evidence."""
    rows = report["artifacts"]
    speed = rows[name]["latency"]["best_images_per_s"]
    others = ", ".join(f"{n} {r['latency']['best_images_per_s']:.0f}"
                       + (" (failed the gate)" if n in report["gate_failures"] else "")
                       for n, r in rows.items() if n != name)
    bound = report.get("min_agreement")
    agreement = (f", agreement with FP32 {rows[name]['agreement_with_pytorch']:.1f}% (at least {bound}%)"
                 if bound is not None else "")
    return (f"{candidate.engine} {candidate.precision}: {speed:.0f} img/s, the fastest passing (others: {others} "
            f"img/s){agreement}, measured on {report['val_images']} val images")


def get_args_parser() -> argparse.ArgumentParser:
    from training.evaluate import DEFAULT_MAX_TOP1_DROP

    p = argparse.ArgumentParser(description="Measure which CPU engine serves the exported FP32 model fastest within "
                                            "the accuracy and agreement gate (what make repo does without a build "
                                            "report)")
    p.add_argument("--onnx", type=Path, default=Path("artifacts/model.onnx"))
    p.add_argument("--data", type=Path, required=True, help="ImageFolder root: val/ is scored")
    p.add_argument("--out", type=Path, default=Path("artifacts"))
    p.add_argument("--max-top1-drop", type=float, default=DEFAULT_MAX_TOP1_DROP)
    p.add_argument("--min-agreement", type=float, default=DEFAULT_MIN_AGREEMENT)
    p.add_argument("--min-top5-overlap", type=float, default=DEFAULT_MIN_TOP5_OVERLAP)
    p.add_argument("--images", type=int, default=PROBE_IMAGES)
    return p


if __name__ == "__main__":
    a = get_args_parser().parse_args()
    try:
        probe(a.onnx, a.data, a.out, Bounds(a.max_top1_drop, a.min_agreement, a.min_top5_overlap), a.images)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
