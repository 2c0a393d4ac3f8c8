"""Triton Python-backend model: the exported ONNX classifier run with ONNX Runtime (CPU).

The embedded target's stand-in for Triton's onnxruntime/tensorrt backends, which the pip-installed
server does not bundle. All requests of a dynamic batch are run as one ONNX Runtime call.
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"] / params.get("onnx_file", "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "0"))  # 0 = ORT's default
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.ort_input = self.session.get_inputs()[0].name
        # Triton tensor names come from the rendered config; its outputs are the ONNX outputs in order
        # (logits, and in the classification layout also the probabilities)
        self.in_name = config["input"][0]["name"]
        self.out_names = [o["name"] for o in config["output"]]
        self.ort_outputs = [o.name for o in self.session.get_outputs()][:len(self.out_names)]
        self.input_dtype = pb_utils.triton_string_to_numpy(config["input"][0]["data_type"])

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, self.in_name).as_numpy() for r in requests]
        batch = np.concatenate(arrays).astype(self.input_dtype, copy=False)
        results = self.session.run(self.ort_outputs, {self.ort_input: batch})
        responses, start = [], 0
        for a in arrays:
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(name, r[start:start + len(a)]) for name, r in zip(self.out_names, results)]))
            start += len(a)
        return responses
