"""locust users sending real JPEGs: Triton over HTTP (KServe v2 + binary tensor extension), Triton
over gRPC, and the naive baseline. Every answer is checked (label count and label set); a wrong
answer counts as a failure.

Configured by environment (perf/load/loadtest.py sets it):
  LOAD_IMAGES   ImageFolder split with the JPEGs to send (round-robin)
  LOAD_LABELS   file with the class names, one per line (the answers must come from this set)
  LOAD_GRPC     host:port of Triton's gRPC endpoint (TritonGrpcUser)
  LOAD_TOPK     expected number of labels per answer
  LOAD_TLS      TritonGrpcUser's gRPC over TLS: clients.client.Tls's fields as JSON
  $TRITON_INFERENCE_KEY  the inference key Triton's users send (clients.keys), if set
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

import grpc.experimental.gevent as grpc_gevent
from locust import FastHttpUser, User, constant, events, task

from clients.client import Tls
from clients.keys import INFERENCE
from core import protocol as P
from perf.load.bodies import sample_images
from perf.load.loadtest import TLS_ENV

IMAGES = [b for _, b in sample_images(Path(os.environ.get("LOAD_IMAGES", "data/synthetic/val")), 64)]
LABELS = set(Path(os.environ["LOAD_LABELS"]).read_text().split()) if os.environ.get("LOAD_LABELS") else None
TOPK = int(os.environ.get("LOAD_TOPK", "5"))
REQUEST_TIMEOUT_S = 60.0  # FastHttpUser's network and connection timeouts default to the same
KEY = os.environ.get(INFERENCE.env)  # run_locust sets it to the key to send, or leaves it out
TLS = (Tls(**{k: v and Path(v) for k, v in json.loads(os.environ[TLS_ENV]).items()})
       if os.environ.get(TLS_ENV) else None)

# grpcio must cooperate with locust's gevent loop: patch once, before any channel exists
grpc_gevent.init_gevent()


def check_labels(labels) -> None:
    if len(labels) != TOPK:
        raise ValueError(f"expected {TOPK} labels, got {len(labels)}")
    if LABELS is not None and not set(labels) <= LABELS:
        raise ValueError(f"unknown labels {sorted(set(labels) - LABELS)}")


def kserve_binary_request(data: bytes) -> tuple[bytes, dict]:
    """KServe v2 inference request with the input as raw bytes after the JSON header."""
    header = json.dumps({
        "inputs": [{"name": P.IMAGE, "shape": [1, len(data)], "datatype": "UINT8",
                    "parameters": {"binary_data_size": len(data)}}],
        "outputs": [{"name": P.LABELS, "parameters": {"binary_data": False}},
                    {"name": P.SCORES, "parameters": {"binary_data": False}}],
    }).encode()
    return header + data, {"Inference-Header-Content-Length": str(len(header)),
                           "Content-Type": "application/octet-stream", **INFERENCE.headers("http", KEY)}


class TritonHttpUser(FastHttpUser):
    wait_time = constant(0)

    def on_start(self):
        self.images = itertools.cycle(IMAGES)

    @task
    def infer(self):
        body, headers = kserve_binary_request(next(self.images))
        with self.client.post(f"/v2/models/{P.ENSEMBLE}/infer", data=body, headers=headers,
                              name="triton-http", catch_response=True) as r:
            try:
                outputs = {o["name"]: o for o in r.json()["outputs"]}
                if outputs[P.LABELS]["shape"] != [1, TOPK]:
                    raise ValueError(f"LABELS shape {outputs[P.LABELS]['shape']}")
                check_labels(outputs[P.LABELS]["data"])
            except Exception as e:
                r.failure(f"bad answer (HTTP {r.status_code}): {e}")


class TritonGrpcUser(User):
    wait_time = constant(0)

    def on_start(self):
        import tritonclient.grpc as grpcclient

        self.mod = grpcclient
        self.client = grpcclient.InferenceServerClient(os.environ.get("LOAD_GRPC", "localhost:8001"),
                                                       **(TLS.grpc_kwargs() if TLS else {}))
        self.headers = INFERENCE.headers("grpc", KEY) or None
        self.images = itertools.cycle(IMAGES)
        self.outputs = [grpcclient.InferRequestedOutput(P.LABELS), grpcclient.InferRequestedOutput(P.SCORES)]

    def on_stop(self):
        self.client.close()  # an open channel keeps grpcio's threads, and so locust, from exiting

    @task
    def infer(self):
        import numpy as np

        data = next(self.images)
        inp = self.mod.InferInput(P.IMAGE, [1, len(data)], "UINT8")
        inp.set_data_from_numpy(np.frombuffer(data, np.uint8)[None])
        start, exc = time.perf_counter(), None
        try:
            result = self.client.infer(P.ENSEMBLE, [inp], outputs=self.outputs, client_timeout=REQUEST_TIMEOUT_S,
                                       headers=self.headers)
            labels = result.as_numpy(P.LABELS)
            if labels.shape != (1, TOPK):
                raise ValueError(f"LABELS shape {labels.shape}")
            check_labels([x.decode() for x in labels[0]])
        except Exception as e:
            exc = e
        events.request.fire(request_type="grpc", name="triton-grpc", response_time=(time.perf_counter() - start) * 1000,
                            response_length=len(data), exception=exc, context={})


class BaselineUser(FastHttpUser):
    wait_time = constant(0)

    def on_start(self):
        self.images = itertools.cycle(IMAGES)

    @task
    def predict(self):
        with self.client.post("/predict", data=next(self.images), name="baseline",
                              headers={"Content-Type": "application/octet-stream"}, catch_response=True) as r:
            try:
                check_labels(r.json()["labels"])
            except Exception as e:
                r.failure(f"bad answer (HTTP {r.status_code}): {e}")
