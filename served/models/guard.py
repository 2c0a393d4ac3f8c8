"""Triton Python-backend model: the GPU target's first stage, the decode policy's checks before DALI.

Triton's DALI backend decodes whatever it is given: it has no per-image refusal (a decode error fails every
request of its batch) and no size limit, so one small PNG declaring billions of pixels can exhaust the
host's or the GPU's memory. This model refuses such requests with the embedded target's checks and messages
(``stages.Guard``: ``max_image_bytes``, ``max_image_pixels``, JPEG/PNG, a sound header), each request on its
own (INVALID_ARG naming the image's index), and passes every other request on unchanged.
"""

import json
import sys
from pathlib import Path

import triton_python_backend_utils as pb_utils

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the served package, copied beside this file (<model>/1/served/) by `make repo`
from served import metrics, stages  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.stage = stages.Guard.from_config(config)
        self.metrics = metrics.ServedMetrics(args, config, stages.REFUSALS) if metrics.enabled(config) else None
        self.in_name, self.out_name = config["input"][0]["name"], config["output"][0]["name"]

    def execute(self, requests):
        checked = self.stage.check([pb_utils.get_input_tensor_by_name(r, self.in_name).as_numpy() for r in requests])
        if self.metrics is not None:
            self.metrics.observe_inputs(self.stage.observed)
        return [pb_utils.InferenceResponse(error=pb_utils.TritonError(str(c), pb_utils.TritonError.INVALID_ARG))
                if isinstance(c, stages.Rejected) else pb_utils.InferenceResponse([pb_utils.Tensor(self.out_name, c)])
                for c in checked]

    def finalize(self):
        if self.metrics is not None:
            self.metrics.close()
