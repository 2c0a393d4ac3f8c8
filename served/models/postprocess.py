"""Triton Python-backend model: logits -> softmax probabilities and the top-k labels and scores.

Shared by both targets (after ONNX Runtime here, after the TensorRT plan on the GPU target); the stage
is ``stages.TopK`` (served/stages.py). Labels come from ``labels.txt`` next to this file, written from
the model's own metadata.
"""

import json
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the served package, copied beside this file (<model>/1/served/) by `make repo`
from served import metrics, stages  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.stage = stages.TopK.from_config(config, Path(args["model_repository"]) / args["model_version"])
        self.metrics = (metrics.ServedMetrics(args, config, classes=self.stage.classes)
                        if metrics.enabled(config) else None)
        # tensor names from the rendered config; outputs are in the order probabilities, labels, scores
        self.in_name = config["input"][0]["name"]
        self.out_names = [o["name"] for o in config["output"]]

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, self.in_name).as_numpy() for r in requests]
        results = self.stage(np.concatenate(arrays))  # one vectorized pass for the whole batch, split back per request
        if self.metrics is not None:
            self.metrics.observe_predictions(stages.prediction_summary(results[0]))
        return [pb_utils.InferenceResponse([pb_utils.Tensor(n, v) for n, v in zip(self.out_names, values, strict=True)])
                for values in stages.split_rows(results, [len(a) for a in arrays])]

    def finalize(self):
        if self.metrics is not None:
            self.metrics.close()
