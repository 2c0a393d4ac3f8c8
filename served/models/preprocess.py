"""Triton Python-backend model: encoded image bytes -> normalized CHW float, with DALI on the CPU.

Runs the serialized DALI pipeline ``model.dali``, which ``build.render_repo`` serializes from
``dali.py`` beside it: the graph the training package evaluates with (served/dali_graph.py). The
GPU target's DALI backend serializes the same ``dali.py`` itself, with its own DALI.

The stage itself (header checks, per-image isolation, the pipeline rebuilt after a failed batch) is
``stages.Preprocessor`` (served/stages.py): only the requests holding a bad image get an INVALID_ARG
error naming the image's index; a failure that is not the images' fault is INTERNAL for the requests
of that batch, and is logged.
"""

import json
import sys
from pathlib import Path

import triton_python_backend_utils as pb_utils

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the served package, copied beside this file (<model>/1/served/) by `make repo`
from served import metrics, stages  # noqa: E402


def internal_error(stage: str, err: Exception):
    """Not the images' fault: every request of the batch fails with this, and it is logged."""
    message = stages.internal_message(stage, err)
    pb_utils.Logger.log_error(message)
    return pb_utils.TritonError(message, pb_utils.TritonError.INTERNAL)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.stage = stages.Preprocessor.from_config(config, Path(args["model_repository"]) / args["model_version"])
        self.metrics = metrics.ServedMetrics(args, config, stages.REFUSALS) if metrics.enabled(config) else None
        out = config["output"][0]  # tensor names come from the rendered config
        self.out_name, self.out_dtype = out["name"], pb_utils.triton_string_to_numpy(out["data_type"])

    def execute(self, requests):
        try:
            decoded = self.stage.decode([pb_utils.get_input_tensor_by_name(r, self.stage.in_name).as_numpy()
                                         for r in requests])
        except Exception as e:
            error = internal_error("preprocess", e)
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        if self.metrics is not None:
            self.metrics.observe_inputs(self.stage.observed)
        return [pb_utils.InferenceResponse(error=pb_utils.TritonError(str(d), pb_utils.TritonError.INVALID_ARG))
                if isinstance(d, stages.Rejected) else
                pb_utils.InferenceResponse([pb_utils.Tensor(self.out_name, d.astype(self.out_dtype, copy=False))])
                for d in decoded]

    def finalize(self):
        if self.metrics is not None:
            self.metrics.close()
