"""Triton Python-backend model: the whole embedded pipeline in one model, encoded images in, top-k out.

The fused layout (the embedded target's default): the preprocess, classifier and postprocess stages
run one after the other in one stub, on one dynamic batch. The ensemble layouts hand every batch
from stub to stub through Triton (shared memory, a queue and a scheduler per hop); here the batch
stays in this process, which measured here serves more images per second on 2 CPU cores
(docs/performance.md, "Throughput"). The stages are the very classes the ensemble's models run
(served/stages.py, in the package copied beside this file by ``make repo``), so both layouts answer alike.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the served package, copied beside this file (<model>/1/served/) by `make repo`
from served import metrics, payloads, shadow, stages  # noqa: E402


def failed(stage, err, requests):
    """Not the images' fault: every request of the batch fails with this, and it is logged."""
    message = stages.internal_message(stage, err)
    pb_utils.Logger.log_error(message)
    return [pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INTERNAL))
            for _ in requests]


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        here = Path(args["model_repository"]) / args["model_version"]
        self.preprocess = stages.Preprocessor.from_config(config, here)
        self.classifier = stages.classifier_from_config(config, here)
        self.top_k = stages.TopK.from_config(config, here)
        self.out_names = [o["name"] for o in config["output"]]  # probabilities, labels, scores
        self.metrics = (metrics.ServedMetrics(args, config, stages.REFUSALS, self.top_k.classes)
                        if metrics.enabled(config) else None)
        self.payloads = sampler(args, config)
        self.shadow = mirror(args, config, self.preprocess.in_name, self.out_names[1])

    def execute(self, requests):
        start = time.perf_counter()
        try:
            name = self.preprocess.in_name
            raw = [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
            decoded = self.preprocess.decode(raw)
        except Exception as e:
            return failed("preprocess", e, requests)
        good = [d for d in decoded if not isinstance(d, stages.Rejected)]
        try:
            values = self.top_k(self.classifier(np.concatenate(good))[0]) if good else None
        except Exception as e:
            return failed("classifier", e, requests)
        if self.metrics is not None:
            self.metrics.observe_inputs(self.preprocess.observed)
            if values is not None:
                self.metrics.observe_predictions(stages.prediction_summary(values[0]))
        per_request = stages.split_rows(values, [len(d) for d in good]) if good else []
        # the accepted requests' rows, gathered only for the side paths that want them (not on every batch)
        accepted = ([r for r, d in zip(raw, decoded, strict=True) if not isinstance(d, stages.Rejected)]
                    if good and (self.payloads is not None or self.shadow is not None) else [])
        if self.payloads is not None and good:
            sample(self.payloads, accepted, per_request, 1000 * (time.perf_counter() - start))
        if self.shadow is not None and good:  # the answered rows and their top-1, for the candidate
            rows = [row for r in accepted for row in (r.reshape(1, -1) if r.ndim == 1 else r)]
            self.shadow.offer(rows, [label_text(row_labels[0]) for _, labels, _ in per_request
                                     for row_labels in labels])
        answers = iter(per_request)
        return [pb_utils.InferenceResponse(error=pb_utils.TritonError(str(d), pb_utils.TritonError.INVALID_ARG))
                if isinstance(d, stages.Rejected) else
                pb_utils.InferenceResponse([pb_utils.Tensor(n, v) for n, v in zip(self.out_names, next(answers),
                                                                                     strict=True)])
                for d in decoded]

    def finalize(self):
        if self.metrics is not None:
            self.metrics.close()
        if self.payloads is not None:
            pb_utils.Logger.log_info(self.payloads.close())
        if self.shadow is not None:
            self.shadow.close()


def label_text(label):
    return label.decode() if isinstance(label, bytes) else str(label)


def mirror(args, config, in_name, labels_name):
    """The shadow mirror the config asks for (a shadow_model parameter, set by `python -m serve.rollout` when it
    reloads this model), else None: answered batches go to that model too, through BLS, off the request path."""
    params = stages.parameters(config)
    target = params.get("shadow_model", "")
    if not target:
        return None

    def send(batch):
        request = pb_utils.InferenceRequest(model_name=target, requested_output_names=[labels_name],
                                            inputs=[pb_utils.Tensor(in_name, batch)])
        response = request.exec()
        if response.has_error():
            raise RuntimeError(response.error().message())
        labels = pb_utils.get_output_tensor_by_name(response, labels_name).as_numpy()
        return [label_text(row[0]) for row in labels]

    return shadow.ShadowMirror(send, params["shadow_dir"], args["model_instance_name"],
                               float(params.get("shadow_percent", "100")))


def sampler(args, config):
    """The payload sampler the rendered config asks for (payload_percent > 0 and a payload_dir), else None."""
    params = stages.parameters(config)
    percent, directory = float(params.get("payload_percent", "0")), params.get("payload_dir", "")
    if percent <= 0 or not directory:
        return None
    # one folder per instance, each with its share of the bound: an instance deletes only what it wrote, so the
    # bound holds for the model as a whole (the folders are read together: payloads.read_samples)
    instances = sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or 1
    return payloads.PayloadSampler(Path(directory) / args["model_name"] / args["model_instance_name"], percent,
                                   1024 * int(params.get("payload_max_kb", "262144")) // instances,
                                   params.get("payload_images", "1") != "0", args["model_name"],
                                   str(args["model_version"]))


def sample(sampler_, raw, per_request, latency_ms):
    """Hand the sampler the answered images it picks, with their format, labels and scores."""
    rows_of = [rows.reshape(1, -1) if rows.ndim == 1 else rows for rows in raw]
    picked = iter(sampler_.picks(sum(len(rows) for rows in rows_of)))
    chosen = []
    for rows, (_, labels, scores) in zip(rows_of, per_request, strict=True):
        for row, row_labels, row_scores in zip(rows, labels, scores, strict=True):
            if next(picked):
                data = stages.image_bytes(row)
                chosen.append((data, stages.image_kind(data), [x.decode() if isinstance(x, bytes) else str(x)
                                                               for x in row_labels], row_scores.tolist()))
    if chosen:
        sampler_.offer(chosen, latency_ms)
