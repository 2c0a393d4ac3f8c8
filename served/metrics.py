"""The served model's own Prometheus metrics, next to Triton's on its /metrics endpoint.

Triton's custom-metrics API for the Python backend (``pb_utils.MetricFamily``). In the package copied beside
the models that see images or predictions; what is measured comes from the Triton-free stages (served/stages.py:
``Preprocessor.observed``, ``prediction_summary``).

    image_classifier_top1_confidence_bucket{le}  the top-1 probability of each answer (a histogram)
    image_classifier_entropy_bucket{le}          each answer's entropy over log(classes), 0..1
    image_classifier_input_bytes_bucket{le}      encoded size of each accepted image
    image_classifier_input_pixels_bucket{le}     decoded size (width x height, from the header)
    image_classifier_predictions_total{class}    answers by predicted class
    image_classifier_inputs_total{format}        accepted images by format (JPEG, PNG)
    image_classifier_refusals_total{reason}      refused images by reason (stages.REFUSALS)
    image_classifier_drift_psi{signal}           the model version's last drift_window answers (all its
                                                 instances together: stages.SharedDriftWindow) against its
                                                 answers on its val split (PSI of the confidence and of the
                                                 class mix; absent until the window is full, and for a model
                                                 exported without a reference)

Each histogram is a Prometheus histogram in its text form (cumulative ``_bucket`` series with ``le``,
``_sum`` and ``_count``; ``histogram_quantile`` reads it), made of counters. Why not the API's own
HISTOGRAM kind: every ``observe`` is one message from the stub to the backend process, and one per image
and histogram cost the demo model 24% of its throughput (docs/monitoring.md). Here a batch only adds to
counts in this process, and a thread hands the changes to Triton every ``served_metrics_interval_ms``
(default 1000; 0 = at the end of every batch), so the figures are at most that late. Every metric carries
the model's name and version.
"""

import json
import tempfile
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from served import stages  # the package, copied beside every Python model (the model's file puts it on the path)

# the buckets are the client's too (clients/metrics.py); the drift score bins the confidence alike
CONFIDENCE_BUCKETS, ENTROPY_BUCKETS = stages.CONFIDENCE_BUCKETS, stages.ENTROPY_BUCKETS
BYTES_BUCKETS, PIXELS_BUCKETS = stages.BYTES_BUCKETS, stages.PIXELS_BUCKETS
M = stages.METRICS
# the served model versions' shared drift windows (small files, removed by their last instance)
DRIFT_FOLDER = Path(tempfile.gettempdir()) / "image_classifier_drift"


def enabled(config):
    """Whether the rendered config asks for the served metrics (served_metrics = 1, the default)."""
    return _parameter(config, "served_metrics", "1") != "0"


def _parameter(config, name, default):
    return config.get("parameters", {}).get(name, {}).get("string_value", default)


class Histogram:
    """Counts per bucket, sum and count, added to in this process; ``flush`` hands what changed to Triton."""

    def __init__(self, name, description, labels, buckets):
        kind = pb_utils.MetricFamily.COUNTER
        self.families = [pb_utils.MetricFamily(name=f"{name}_{part}", description=f"{description} ({part})",
                                               kind=kind) for part in ("bucket", "sum", "count")]
        bucket, total, count = self.families
        self.edges = np.array([*buckets, np.inf])
        self.buckets = [bucket.Metric(labels={**labels, "le": _le(b)}) for b in self.edges]
        self.sum, self.count = total.Metric(labels=labels), count.Metric(labels=labels)
        self.pending = np.zeros(len(self.edges)), 0.0, 0

    def add(self, values):
        values = np.asarray(values, dtype=np.float64)
        if values.size:  # cumulative, as Prometheus histograms are: bucket le=x counts every value <= x
            counts, total, n = self.pending
            self.pending = (counts + (values[:, None] <= self.edges).sum(axis=0), total + values.sum(),
                            n + values.size)

    def take(self):
        """What was added since the last take, and start again from nothing (under the caller's lock)."""
        taken, self.pending = self.pending, (np.zeros(len(self.edges)), 0.0, 0)
        return taken

    def send(self, taken):
        counts, total, n = taken
        if n:
            for metric, c in zip(self.buckets, counts.tolist(), strict=True):
                if c:
                    metric.increment(c)
            self.sum.increment(total)
            self.count.increment(n)


def _le(bound):
    return stages.prometheus_float(bound)


class Counts:
    """A counter family by one label, added to here and flushed like :class:`Histogram`."""

    def __init__(self, name, description, labels, label, values):
        self.family = pb_utils.MetricFamily(name=name, description=description, kind=pb_utils.MetricFamily.COUNTER)
        self.metrics = {v: self.family.Metric(labels={**labels, label: v}) for v in values}
        self.pending = Counter()

    def add(self, values):
        self.pending.update(values)

    def take(self):
        taken, self.pending = self.pending, Counter()
        return taken

    def send(self, taken):
        for value, n in taken.items():
            self.metrics[value].increment(n)


class Drift:
    """The drift scores as gauges: set from the window at every flush (scored under the caller's lock)."""

    def __init__(self, labels, window):
        name, description = stages.METRICS["drift"]
        self.family = pb_utils.MetricFamily(name=name, description=description, kind=pb_utils.MetricFamily.GAUGE)
        self.window, self.labels, self.gauges = window, labels, {}

    def take(self):
        return self.window.scores()

    def send(self, scores):
        for signal, value in (scores or {}).items():
            if signal not in self.gauges:  # created when first scored: no series before the window is full
                self.gauges[signal] = self.family.Metric(labels={**self.labels, "signal": signal})
            self.gauges[signal].set(value)


class ServedMetrics:
    """One model's metrics: what arrives (``inputs``), what it answers (``predictions``), or both; flushed
    to Triton by a thread every ``served_metrics_interval_ms``, and when the model is unloaded."""

    def __init__(self, args, config, refusal_reasons=None, classes=None):
        """``refusal_reasons`` (stages.REFUSALS): the model sees the images; ``classes``: it answers."""
        labels = {"model": args["model_name"], "version": str(args["model_version"])}
        self.metrics = []
        self.drift = None
        if refusal_reasons is not None:
            self.size = Histogram(*M["bytes"], labels, BYTES_BUCKETS)
            self.pixels = Histogram(*M["pixels"], labels, PIXELS_BUCKETS)
            self.formats = Counts(*M["formats"], labels, "format", stages.FORMATS)
            self.refusals = Counts(*M["refusals"], labels, "reason", refusal_reasons)
            self.metrics += [self.size, self.pixels, self.formats, self.refusals]
        if classes is not None:
            self.confidence = Histogram(*M["confidence"], labels, CONFIDENCE_BUCKETS)
            self.entropy = Histogram(*M["entropy"], labels, ENTROPY_BUCKETS)
            self.classes = list(classes)
            self.predictions = Counts(*M["predictions"], labels, "class", self.classes)
            self.metrics += [self.confidence, self.entropy, self.predictions]
            reference = _parameter(config, "drift_reference", "")
            window = int(_parameter(config, "drift_window", "0"))
            if reference and window > 0:
                # one window for the model version, shared by its instances (stages.SharedDriftWindow): a score
                # after `window` answers in all; every instance sets the same series to the same score
                shared = stages.SharedDriftWindow(json.loads(reference), window, DRIFT_FOLDER,
                                                  f"{args['model_name']}-v{args['model_version']}")
                self.drift = Drift(labels, shared)
                self.metrics.append(self.drift)
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.interval = int(_parameter(config, "served_metrics_interval_ms", "1000")) / 1000
        self.thread = None
        if self.interval > 0:
            self.thread = threading.Thread(target=self._run, name="served-metrics", daemon=True)
            self.thread.start()

    def observe_inputs(self, observed):
        """``observed``: stages.Preprocessor.observed after a batch."""
        with self.lock:
            self.size.add([i.num_bytes for i in observed.inputs])
            self.pixels.add([i.width * i.height for i in observed.inputs])
            self.formats.add(i.kind for i in observed.inputs)
            self.refusals.add(observed.refusals)
        self._maybe_flush()

    def observe_predictions(self, summary):
        """``summary``: stages.prediction_summary of the batch's probabilities."""
        top1, entropy, predicted = summary
        with self.lock:
            self.confidence.add(top1)
            self.entropy.add(entropy)
            self.predictions.add(self.classes[i] for i in predicted.tolist())
            if self.drift is not None:
                self.drift.window.add(top1, predicted)
        self._maybe_flush()

    def _maybe_flush(self):
        if self.thread is None:
            self.flush()

    def flush(self):
        with self.lock:  # a batch's additions are taken whole; the messages to Triton go outside the lock
            taken = [m.take() for m in self.metrics]
        for m, t in zip(self.metrics, taken, strict=True):
            m.send(t)

    def _run(self):
        while not self.stop.wait(self.interval):
            try:
                self.flush()
            except Exception as e:  # never take the model down for its metrics
                pb_utils.Logger.log_error(f"served metrics: {type(e).__name__}: {e}")

    def close(self):
        """Stop the thread and hand over what is left (the model's finalize)."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join(5)
        self.flush()
        if self.drift is not None:
            self.drift.window.close()
