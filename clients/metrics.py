"""The served model's metrics from the client's side, for a server with no Python on the request path.

    from clients.client import ImageClassifierClient
    from clients.metrics import ClientMetrics
    metrics = ClientMetrics.from_reference("artifacts/model.onnx")   # the exported model: its drift reference
    metrics.start_http_server(9400)                                  # Prometheus scrapes this process
    with ImageClassifierClient("gpu-host:8001", protocol="grpc", metrics=metrics) as c:
        c.classify_files(paths)

The embedded target's Python models export these figures next to Triton's own (served/models/
metrics.py). The GPU target's default layout (``classification``: DALI backend -> TensorRT, the top k from
Triton's classification extension) has no Python model, and adding one would be a Python hop for every
request. So the client library computes them, from what it sent and what came back: the same series, names,
buckets and labels (served/stages.py METRICS, the *_BUCKETS; labels model and version), so the dashboards and
the drift alert read either side. What it costs: no server work at all; on the client, a header parse per
image and one ``prediction_summary`` per answered batch, and the answers carry every class's probability
(the entropy needs them all: on the classification layout that is ``class_count`` = the number of classes,
one "score:index:label" string each). ``make client-metrics-cost`` measures it.

What differs from the server's side, by construction:
- only requests sent through this library are counted, once per client process (scrape each client, or
  write the text file for node_exporter's textfile collector: ``write_textfile``);
- a refusal's reason is the header check's (served/stages.py inspect_image with the decode policy's default
  limits) for an image the server refused; one whose header is fine counts as "undecodable";
- the drift window is this client's last ``window`` answers;
- the server counts the inputs it decoded: a good image in a batch refused for another image's fault is
  decoded, then decoded again when the client resends it alone, and counted twice there, once here.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server, write_to_textfile

from core.metadata import read_metadata
from core.preprocess import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS
from served import stages


class Answer(Protocol):
    """What observe reads of an answer (clients.client.Prediction; not imported: the client imports this)."""

    labels: list[str]
    probabilities: list[float] | None
    bad_input: bool

    @property
    def ok(self) -> bool: ...


M = stages.METRICS
LABELS = ("model", "version")
UNLIMITED = np.iinfo(np.int64).max  # the header is read for its figures here, not to refuse anything
OTHER_FORMAT = "other"  # an answered image whose header is neither JPEG nor PNG (its pixels are not counted)


def load_reference(path: Path | str) -> dict[str, Any]:
    """The drift reference: from an exported ONNX file's metadata (build.export_onnx stores the model's
    answers on its val split there) or from a JSON file holding just that."""
    path = Path(path)
    if path.suffix == ".onnx":
        reference = read_metadata(path).export.reference
        if reference is None:
            raise ValueError(f"{path} carries no drift reference (it was not exported by `make onnx`)")
        return dict(reference)
    reference = json.loads(path.read_text())
    if not {"confidence", "classes"} <= set(reference):
        raise ValueError(f"{path} is not a drift reference: it needs 'confidence' and 'classes' fractions")
    return dict(reference)


def refusal_reason(data: bytes) -> str:
    """Why the server refused ``data``, as far as its header tells (the decode policy's default limits)."""
    try:
        stages.inspect_image(data, MAX_IMAGE_PIXELS, MAX_IMAGE_BYTES)
    except stages.Rejected as e:
        return e.reason
    return "undecodable"


class ClientMetrics:
    """The served metrics of the answers one client process got, in a prometheus_client registry of its own."""

    def __init__(self, reference: dict[str, Any] | None = None, window: int = 500,
                 registry: CollectorRegistry | None = None):
        """``reference``: the model's answers on its val split (:func:`load_reference`); with it and a
        ``window`` > 0, the drift score of the last ``window`` answers is exported too."""
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.size = Histogram(*M["bytes"], LABELS, buckets=stages.BYTES_BUCKETS, registry=r)
        self.pixels = Histogram(*M["pixels"], LABELS, buckets=stages.PIXELS_BUCKETS, registry=r)
        self.formats = Counter(*M["formats"], (*LABELS, "format"), registry=r)
        self.refusals = Counter(*M["refusals"], (*LABELS, "reason"), registry=r)
        self.confidence = Histogram(*M["confidence"], LABELS, buckets=stages.CONFIDENCE_BUCKETS, registry=r)
        self.entropy = Histogram(*M["entropy"], LABELS, buckets=stages.ENTROPY_BUCKETS, registry=r)
        self.predictions = Counter(*M["predictions"], (*LABELS, "class"), registry=r)
        self.window = stages.DriftWindow(reference, window) if reference is not None and window > 0 else None
        self.drift = Gauge(*M["drift"], (*LABELS, "signal"), registry=r) if self.window else None
        self.lock = threading.Lock()  # the drift window (prometheus_client's own metrics are thread-safe)
        self._server: Any = None

    @classmethod
    def from_reference(cls, path: Path | str | None, window: int = 500) -> ClientMetrics:
        return cls(load_reference(path) if path is not None else None, window)

    def observe(self, model: str, version: str, blobs: Sequence[bytes], predictions: Sequence[Answer]) -> None:
        """One answered batch: ``predictions[i]`` is the answer (or the error) for ``blobs[i]``; an answer
        carries every class's probability (the client asks for them when it has metrics)."""
        labels = (model, version)
        answered = [(b, p) for b, p in zip(blobs, predictions, strict=True) if p.ok and p.probabilities]
        for b, p in zip(blobs, predictions, strict=True):
            if not p.ok and p.bad_input:
                self.refusals.labels(*labels, refusal_reason(b)).inc()
        if not answered:
            return
        for b, _ in answered:
            try:
                info = stages.inspect_image(b, UNLIMITED, UNLIMITED)[1]
            except stages.Rejected:  # answered, yet no JPEG or PNG header we read: the GPU target's DALI decodes
                self.size.labels(*labels).observe(len(b))  # more formats (WebP, BMP, TIFF) than the embedded one
                self.formats.labels(*labels, OTHER_FORMAT).inc()
                continue
            self.size.labels(*labels).observe(info.num_bytes)
            self.pixels.labels(*labels).observe(info.width * info.height)
            self.formats.labels(*labels, info.kind).inc()
        probs = np.array([p.probabilities for _, p in answered], np.float32)
        top1, entropy, predicted = stages.prediction_summary(probs)
        confidence, spread = self.confidence.labels(*labels), self.entropy.labels(*labels)
        for c, e, (_, p) in zip(top1.tolist(), entropy.tolist(), answered, strict=True):
            confidence.observe(c)
            spread.observe(e)
            self.predictions.labels(*labels, p.labels[0]).inc()
        if self.window is not None and self.drift is not None:
            with self.lock:
                self.window.add(top1, predicted)
                scores = self.window.scores()
            for signal, value in (scores or {}).items():
                self.drift.labels(*labels, signal).set(value)

    # -- export -----------------------------------------------------------------------------------
    def start_http_server(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve /metrics on ``port`` (0: any free one) from a thread, until :meth:`close`; the port."""
        self._server, _ = start_http_server(port, addr, registry=self.registry)
        return int(self._server.server_port)

    def write_textfile(self, path: Path | str) -> None:
        """The text exposition, written atomically (node_exporter's textfile collector reads such files)."""
        write_to_textfile(str(path), self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
