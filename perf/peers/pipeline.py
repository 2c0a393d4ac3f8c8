"""What every peer server runs on a batch: the work of Triton's fused model, without Triton.

The same preprocessing (the DALI CPU pipeline built from core/dali_graph.py with the model's own
spec), the same ONNX file in ONNX Runtime with the same thread settings (idle threads not spinning), and
the same softmax top-k, on batches up to the same size. It imports NumPy, DALI, ONNX Runtime and the
project's core/preprocess.py only, so it runs inside a peer's virtualenv; the spec file it reads is
written by launch.py from the ONNX metadata and the served repository's settings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from core.preprocess import DaliPreprocessor, PreprocessSpec


class PeerModel:
    def __init__(self, spec_file: Path):
        spec = json.loads(Path(spec_file).read_text())
        self.preprocess_spec = PreprocessSpec.from_dict(spec["preprocess"])
        self.batch, self.threads = spec["max_batch_size"], spec["dali_threads"]
        self.pre = DaliPreprocessor(self.preprocess_spec, self.batch, self.threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads = spec["intra_op_threads"]
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(spec["onnx"], options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.output = self.session.get_outputs()[0].name  # the logits
        self.classes = spec["classes"]
        self.k = min(spec["top_k"], len(self.classes))

    def _pixels(self, images: list[bytes]) -> list:
        """Per image: its pixels, or the decoder's error (DALI fails a whole batch on one bad image)."""
        try:
            return list(self.pre(images))
        except Exception:
            self.pre = DaliPreprocessor(self.preprocess_spec, self.batch, self.threads)  # the failed one is spent
        out = []
        for data in images:
            try:
                out.append(self.pre([data])[0])
            except Exception as e:
                self.pre = DaliPreprocessor(self.preprocess_spec, self.batch, self.threads)
                # DALI's message ends with its pipeline's invalidation; what the decoder said comes before
                said = [ln for ln in str(e).strip().splitlines() if ln.strip() and "no longer valid" not in ln]
                out.append(ValueError(f"could not decode the image: {said[-1] if said else type(e).__name__}"))
        return out

    def predict(self, images: list[bytes]) -> list[dict]:
        """Per image: {"labels": [...], "scores": [...]} best first, or {"error": ...}."""
        pixels = self._pixels(images)
        good = [i for i, p in enumerate(pixels) if not isinstance(p, Exception)]
        answers: list[dict] = [{"error": str(p)} for p in pixels]
        if good:
            logits = self.session.run([self.output], {self.input: np.stack([pixels[i] for i in good])})[0]
            z = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs = z / z.sum(axis=1, keepdims=True)
            top = np.argsort(-probs, axis=1, kind="stable")[:, :self.k]
            for row, i in enumerate(good):
                answers[i] = {"labels": [self.classes[j] for j in top[row]],
                              "scores": [float(probs[row, j]) for j in top[row]]}
        return answers
