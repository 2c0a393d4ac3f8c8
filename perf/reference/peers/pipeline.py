"""What every peer server runs on a batch: the work of Triton's fused model, without Triton.

The very stages the fused model runs (served/stages.py: the header checks, DALI with per-image isolation,
ONNX Runtime or OpenVINO with the serving options, the softmax top-k), with the DALI CPU pipeline built
from the model's own spec (served/dali_graph.py), the same ONNX file on the same engine, the same thread
settings, on batches up to the same size. It imports NumPy, DALI, the engine and the project's core/ and
served/ only, so it runs inside a peer's virtualenv; the spec file it reads is written by launch.py from the ONNX
metadata and the served repository's manifest."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from core.preprocess import DALI_INPUT_NAME, PreprocessSpec, build_dali_pipeline
from served.stages import Preprocessor, Rejected, TopK, make_classifier


class PeerModel:
    def __init__(self, spec_file: Path):
        spec = json.loads(Path(spec_file).read_text())
        preprocess_spec = PreprocessSpec.from_dict(spec["preprocess"])
        batch, threads = spec["max_batch_size"], spec["dali_threads"]
        make_pipeline = partial(build_dali_pipeline, preprocess_spec, batch, "cpu", threads, build=True)
        self.pre = Preprocessor(make_pipeline, DALI_INPUT_NAME, batch, spec["max_image_pixels"],
                                spec["max_image_bytes"])
        self.classifier = make_classifier(spec.get("engine", "onnxruntime"), spec["onnx"], spec["intra_op_threads"],
                                          spec.get("inference_precision", "f32"))
        self.top_k = TopK(spec["classes"], min(spec["top_k"], len(spec["classes"])))

    def predict(self, images: list[bytes]) -> list[dict[str, Any]]:
        """Per image: {"labels": [...], "scores": [...]} best first, or {"error": ...}."""
        decoded = self.pre.decode([np.frombuffer(b, np.uint8) for b in images])
        answers: list[dict[str, Any]] = [{"error": str(d)} for d in decoded]
        good = [i for i, d in enumerate(decoded) if not isinstance(d, Rejected)]
        if good:
            _, labels, scores = self.top_k(self.classifier(np.concatenate([decoded[i] for i in good]))[0])
            for row, i in enumerate(good):
                answers[i] = {"labels": [label.decode() for label in labels[row]],
                              "scores": [float(s) for s in scores[row]]}
        return answers
