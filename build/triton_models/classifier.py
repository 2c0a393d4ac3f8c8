"""Triton Python-backend model: the exported ONNX classifier run with ONNX Runtime (CPU).

The embedded target's stand-in for Triton's onnxruntime/tensorrt backends, which the pip-installed
server does not bundle. All requests of a dynamic batch are run as one ONNX Runtime call.
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class OnnxClassifier:
    """The stage without Triton's request objects (also run by the fused model): a batch in, the ONNX
    outputs in order out (logits, then the export's softmax probabilities where it has them)."""

    def __init__(self, path: Path, intra_op_threads: int = 1):
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads  # 0 = ORT's default, one per core
        # ORT's idle intra-op threads spin-wait by default: on a shared CPU that burns the cores the
        # preprocessing and the server need (measured here: 1.14 cores spinning, 0.45 doing the work)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    @classmethod
    def from_config(cls, config: dict, here: Path) -> "OnnxClassifier":
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        return cls(here / params.get("onnx_file", "model.onnx"), int(params.get("intra_op_threads", "1")))

    def __call__(self, batch: np.ndarray, outputs: int = 1) -> list:
        """The first ``outputs`` ONNX outputs for ``batch``."""
        return self.session.run(self.output_names[:outputs], {self.input_name: batch})


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.stage = OnnxClassifier.from_config(config, Path(args["model_repository"]) / args["model_version"])
        # Triton tensor names come from the rendered config; its outputs are the ONNX outputs in order
        # (logits, and in the classification layout also the probabilities)
        self.in_name = config["input"][0]["name"]
        self.out_names = [o["name"] for o in config["output"]]
        self.input_dtype = pb_utils.triton_string_to_numpy(config["input"][0]["data_type"])

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, self.in_name).as_numpy() for r in requests]
        batch = np.concatenate(arrays).astype(self.input_dtype, copy=False)
        results = self.stage(batch, len(self.out_names))
        responses, start = [], 0
        for a in arrays:
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(name, r[start:start + len(a)]) for name, r in zip(self.out_names, results)]))
            start += len(a)
        return responses
