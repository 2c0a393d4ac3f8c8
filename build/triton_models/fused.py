"""Triton Python-backend model: the whole embedded pipeline in one model, encoded images in, top-k out.

The fused layout (the embedded target's default): the preprocess, classifier and postprocess stages
run one after the other in one stub, on one dynamic batch. The ensemble layouts hand every batch
from stub to stub through Triton (shared memory, a queue and a scheduler per hop); here the batch
stays in this process, which measured here serves more images per second on 2 CPU cores (README,
"Throughput"). The stages are the very classes the ensemble's models run, copied beside this file
by ``make repo`` (preprocess.py, classifier.py, postprocess.py), so both layouts answer alike.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


def _sibling(here: Path, name: str):
    """A stage module from this version folder, loaded by path (not by sys.path, where another module of
    that name could come first)."""
    spec = importlib.util.spec_from_file_location(f"_fused_{name}", here / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        here = Path(args["model_repository"]) / args["model_version"]
        self.pre = _sibling(here, "preprocess")
        self.preprocess = self.pre.Preprocessor.from_config(config, here)
        self.classifier = _sibling(here, "classifier").OnnxClassifier.from_config(config, here)
        self.top_k = _sibling(here, "postprocess").TopK.from_config(config, here)
        self.out_names = [o["name"] for o in config["output"]]  # probabilities, labels, scores

    def execute(self, requests):
        try:
            decoded = self.preprocess.decode([pb_utils.get_input_tensor_by_name(r, self.preprocess.in_name).as_numpy()
                                              for r in requests])
        except Exception as e:
            return self._failed("preprocess", e, requests)
        good = [d for d in decoded if not isinstance(d, self.pre.Rejected)]
        try:
            values = self.top_k(self.classifier(np.concatenate(good))[0]) if good else None
        except Exception as e:
            return self._failed("classifier", e, requests)
        responses, start = [], 0
        for d in decoded:
            if isinstance(d, self.pre.Rejected):
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(d), pb_utils.TritonError.INVALID_ARG)))
                continue
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(name, v[start:start + len(d)]) for name, v in zip(self.out_names, values)]))
            start += len(d)
        return responses

    def _failed(self, stage, err, requests):
        error = self.pre.internal_error(stage, err)
        return [pb_utils.InferenceResponse(error=error) for _ in requests]
