"""Triton Python-backend model: logits -> softmax probabilities and the top-k labels and scores.

Shared by both targets (after ONNX Runtime here, after the TensorRT plan on the GPU target).
Labels come from ``labels.txt`` next to this file, written from the model's own metadata.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        here = Path(args["model_repository"]) / args["model_version"]
        self.labels = np.array([ln.encode() for ln in (here / "labels.txt").read_text().splitlines()], dtype=object)
        self.k = int(params.get("top_k", "5"))
        # tensor names from the rendered config; outputs are in the order probabilities, labels, scores
        self.in_name = config["input"][0]["name"]
        self.out_names = [o["name"] for o in config["output"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            logits = pb_utils.get_input_tensor_by_name(request, self.in_name).as_numpy().astype(np.float32)
            z = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs = z / z.sum(axis=1, keepdims=True)
            top = np.argsort(-probs, axis=1, kind="stable")[:, : self.k]
            values = (probs, self.labels[top], np.take_along_axis(probs, top, axis=1))
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(name, value) for name, value in zip(self.out_names, values)]))
        return responses
