"""Triton Python-backend model: the exported ONNX classifier run with ONNX Runtime (CPU).

The embedded target's stand-in for Triton's onnxruntime/tensorrt backends, which the pip-installed
server does not bundle. All requests of a dynamic batch are run as one ONNX Runtime call, in the
session served/stages.py creates with the serving options (threads, no spinning).
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
        self.stage = stages.classifier_from_config(config, Path(args["model_repository"]) / args["model_version"])
        # Triton tensor names come from the rendered config; its outputs are the ONNX outputs in order
        # (logits, and in the classification layout also the probabilities)
        self.in_name = config["input"][0]["name"]
        self.out_names = [o["name"] for o in config["output"]]
        self.input_dtype = pb_utils.triton_string_to_numpy(config["input"][0]["data_type"])
        # the classification layout answers with these probabilities (no postprocess model): the answers'
        # metrics are taken here
        answers = len(self.out_names) > 1 and metrics.enabled(config)
        here = Path(args["model_repository"]) / args["model_version"]
        classes = (here.parent / "labels.txt").read_text().splitlines() if answers else []
        self.metrics = metrics.ServedMetrics(args, config, classes=classes) if answers else None

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, self.in_name).as_numpy() for r in requests]
        batch = np.concatenate(arrays).astype(self.input_dtype, copy=False)
        results = self.stage(batch, len(self.out_names))
        if self.metrics is not None:
            self.metrics.observe_predictions(stages.prediction_summary(results[1]))
        return [pb_utils.InferenceResponse([pb_utils.Tensor(n, v) for n, v in zip(self.out_names, values, strict=True)])
                for values in stages.split_rows(results, [len(a) for a in arrays])]

    def finalize(self):
        if self.metrics is not None:
            self.metrics.close()
