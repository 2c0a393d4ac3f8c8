"""Triton Python-backend model: logits -> softmax probabilities and the top-k labels and scores.

Shared by both targets (after ONNX Runtime here, after the TensorRT plan on the GPU target).
Labels come from ``labels.txt`` next to this file, written from the model's own metadata.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TopK:
    """The stage without Triton's request objects (also run by the fused model)."""

    def __init__(self, labels: list, k: int):
        self.labels = np.array([label.encode() for label in labels], dtype=object)
        self.k = k

    @classmethod
    def from_config(cls, config: dict, here: Path) -> "TopK":
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        return cls((here / "labels.txt").read_text().splitlines(), int(params.get("top_k", "5")))

    def __call__(self, logits: np.ndarray) -> tuple:
        """(probabilities, labels, scores) for a batch of logits."""
        logits = logits.astype(np.float32, copy=False)
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = z / z.sum(axis=1, keepdims=True)
        top = np.argsort(-probs, axis=1, kind="stable")[:, : self.k]
        return probs, self.labels[top], np.take_along_axis(probs, top, axis=1)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.stage = TopK.from_config(config, Path(args["model_repository"]) / args["model_version"])
        # tensor names from the rendered config; outputs are in the order probabilities, labels, scores
        self.in_name = config["input"][0]["name"]
        self.out_names = [o["name"] for o in config["output"]]

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, self.in_name).as_numpy() for r in requests]
        values, responses, start = self.stage(np.concatenate(arrays)), [], 0
        for a in arrays:  # one vectorized pass for the whole batch, split back per request
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(name, v[start:start + len(a)]) for name, v in zip(self.out_names, values)]))
            start += len(a)
        return responses
