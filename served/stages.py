"""The served stages without Triton: image checks, DALI with per-image isolation, ONNX Runtime or OpenVINO, top-k.

What the Python-backend models run (served/models/: preprocess, classifier, postprocess, and the
fused model that runs all three on one batch), copied with the served package beside each of them by
``make repo``; the peer servers of ``make compare`` run the very same classes (perf/reference/peers/pipeline.py).
It therefore imports nothing but its own package (the engine registry, served/engines.py) and only NumPy
at import time (DALI, ONNX Runtime, OpenVINO where they are used): the
GPU target's postprocess model loads it in a Python backend that has neither.

Bad images never take the server or other requests down: every image's header is read first (format,
size limits, truncation), a DALI batch that fails to decode is retried image by image (DALI
invalidates a pipeline after an error, so it is rebuilt), and only the requests holding a bad image
get an error naming the image's index. A failure that is not the image's fault (out of memory, a
broken pipeline) propagates, and is not retried image by image. Bytes after a JPEG's end-of-image
marker (motion photos) are ignored, as DALI's and Pillow's decoders do, so serving agrees with
training (core/preprocess.py: the decode policy).
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from served import engines  # in a rendered repository, the package copied beside model.py

SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"))
FORMATS = tuple(name for _, name in SIGNATURES)
# JPEG start-of-frame markers (they carry the image size): C0-CF except DHT (C4), JPG (C8), DAC (CC)
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class Rejected(ValueError):
    """The image's own fault (too large, not JPEG/PNG, undecodable): answered INVALID_ARG with this message.
    ``reason``: one of REFUSALS, for the refusal counters of the served metrics."""

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


# Why an image is refused, as the served metrics count it (image_classifier_refusals_total{reason=...})
REFUSALS = ("empty", "too_many_bytes", "too_many_pixels", "not_jpeg_or_png", "truncated", "corrupt",
            "unsupported", "undecodable", "invalid")


def check_bytes(num_bytes: int, max_bytes: int) -> None:
    """The decode policy's limit on encoded bytes: checked first, before anything is parsed."""
    if num_bytes > max_bytes:
        raise Rejected(f"image is {num_bytes} bytes, over the limit of {max_bytes} bytes", "too_many_bytes")


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """The decode policy's limit on pixels, from the header: checked before decoding."""
    if width * height > max_pixels:
        raise Rejected(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} pixels",
                       "too_many_pixels")


def check_limits(num_bytes: int, width: int, height: int, max_pixels: int, max_bytes: int) -> None:
    """Both size limits of the decode policy (core/preprocess.py checks them for training)."""
    check_bytes(num_bytes, max_bytes)
    check_pixels(width, height, max_pixels)


def jpeg_extent(data: bytes) -> tuple[int, int, int]:
    """(width, height, end) of a baseline or progressive JPEG; ``end`` is just past its end-of-image
    marker. Walks the marker segments and the entropy-coded data (cheap: bytes.find), so a file cut
    short is caught here with a clear message, and trailing bytes are located, not guessed at."""
    n, pos, size = len(data), 2, None
    truncated = Rejected(f"truncated JPEG: {n} bytes and no end-of-image marker", "truncated")
    while True:
        if pos >= n:
            raise truncated
        if data[pos] != 0xFF:
            raise Rejected(f"corrupt JPEG: expected a marker at byte {pos}", "corrupt")
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            raise truncated
        marker, pos = data[pos], pos + 1
        if marker == 0xD9:  # end of image
            if size is None:
                raise Rejected("corrupt JPEG: no frame header before the end-of-image marker", "corrupt")
            return size[0], size[1], pos
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            continue
        if pos + 2 > n:
            raise truncated
        end = pos + int.from_bytes(data[pos:pos + 2], "big")
        if end > n:
            raise truncated
        if marker in SOF_MARKERS and end - pos >= 7:
            if data[pos + 2] != 8:  # DALI (and Pillow, which training decodes with) read 8-bit samples only
                raise Rejected(f"unsupported JPEG: {data[pos + 2]}-bit samples (8-bit JPEGs are served)",
                               "unsupported")
            size = (int.from_bytes(data[pos + 5:pos + 7], "big"), int.from_bytes(data[pos + 3:pos + 5], "big"))
        pos = end
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next marker
            if size is None:
                raise Rejected("corrupt JPEG: scan data before a frame header", "corrupt")
            while True:
                j = data.find(b"\xff", pos)
                if j < 0 or j + 1 >= n:
                    raise truncated
                following = data[j + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7:  # stuffed byte, restart marker
                    pos = j + 2
                elif following == 0xFF:  # fill byte before a marker
                    pos = j + 1
                else:
                    pos = j
                    break


def png_extent(data: bytes) -> tuple[int, int, int]:
    """(width, height, end) of a PNG; ``end`` is just past its IEND chunk."""
    n, pos, size = len(data), 8, None
    while True:
        if pos + 8 > n:
            raise Rejected(f"truncated PNG: {n} bytes and no IEND chunk", "truncated")
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        if kind == b"IHDR" and length >= 8 and pos + 16 <= n:
            size = (int.from_bytes(data[pos + 8:pos + 12], "big"), int.from_bytes(data[pos + 12:pos + 16], "big"))
        pos += 12 + length
        if kind == b"IEND":
            if pos > n:
                raise Rejected(f"truncated PNG: {n} bytes, IEND cut short", "truncated")
            if size is None:
                raise Rejected("corrupt PNG: no IHDR chunk", "corrupt")
            return size[0], size[1], pos


def strip_padding(row: np.ndarray) -> bytes:
    """Rows of a batch are zero-padded to a common length. A JPEG ends with FFD9 and a PNG with
    IEND's fixed CRC (AE426082), so trailing zero bytes are always padding."""
    data = row.tobytes()
    return data.rstrip(b"\x00") if data.endswith(b"\x00") else data


def image_bytes(row: np.ndarray) -> bytes:
    """A request row's encoded image, its zero padding stripped; a row of nothing but zeros is refused as
    such (stripped, it would look like an empty input)."""
    data = strip_padding(row)
    if not data and row.size:
        raise Rejected(f"no image bytes (the row is all zero padding: {row.size} zero bytes)", "empty")
    return data


@dataclass(frozen=True)
class ImageInfo:
    """What an image's header says: its format, size and encoded bytes (the served input metrics)."""

    kind: str  # JPEG or PNG
    width: int
    height: int
    num_bytes: int


@dataclass
class Observed:
    """What the last batch showed the served metrics: each accepted image, and each refusal's reason."""

    inputs: list[ImageInfo] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)


def check_image(data: bytes, max_pixels: int, max_bytes: int) -> bytes:
    """The encoded image without trailing bytes, ready for DALI; raises Rejected saying why not."""
    return inspect_image(data, max_pixels, max_bytes)[0]


def image_kind(data: bytes) -> str | None:
    """"JPEG" or "PNG" from the file's signature, else None."""
    return next((name for magic, name in SIGNATURES if data.startswith(magic)), None)


def inspect_image(data: bytes, max_pixels: int, max_bytes: int) -> tuple[bytes, ImageInfo]:
    """:func:`check_image`, and what the header said."""
    if not data:
        raise Rejected("empty input: 0 bytes", "empty")
    check_bytes(len(data), max_bytes)
    kind = image_kind(data)
    if kind is None:
        raise Rejected(f"not a JPEG or PNG image (starts with {data[:8].hex(' ')})", "not_jpeg_or_png")
    width, height, end = (jpeg_extent if kind == "JPEG" else png_extent)(data)
    check_pixels(width, height, max_pixels)
    if width == 0 or height == 0:
        raise Rejected(f"corrupt {kind}: {width}x{height} pixels", "corrupt")
    return data[:end], ImageInfo(kind, width, height, end)


def is_decode_failure(err: Exception) -> bool:
    """Whether DALI failed on the image data (its fault) rather than on resources or itself (ours)."""
    text = str(err)
    if isinstance(err, MemoryError) or any(s in text for s in ("bad_alloc", "out of memory", "Out of memory")):
        return False
    return any(s in text for s in ("Failed to decode", "Could not decode", "nvImageCodec", "Unsupported"))


def dali_reason(err: BaseException) -> str:
    """DALI's error text holds the pipeline definition's traceback; keep only what the decoder said."""
    text = str(err)
    tail = text.split("encountered:", 1)[1] if "encountered:" in text else text
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip() and "no longer valid" not in ln]
    return lines[-1] if lines else type(err).__name__


def internal_message(stage: str, err: BaseException) -> str:
    """What a request is told when its batch failed for a reason that is not the images' fault."""
    return f"{stage} failed internally ({type(err).__name__}: {dali_reason(err)})"


def split_rows(values: Sequence[np.ndarray], counts: Sequence[int]) -> list[list[np.ndarray]]:
    """A batch's outputs split back per request: for each request (``counts``: its rows), its slice of each."""
    out, start = [], 0
    for n in counts:
        out.append([v[start:start + n] for v in values])
        start += n
    return out


def parameters(config: dict[str, Any]) -> dict[str, str]:
    """A rendered config's parameters, as the Python backend hands them over (JSON)."""
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


class Preprocessor:
    """Per request, its rows of encoded images in; its pixels, or why its images were refused, out.

    ``make_pipeline``: a function that builds a fresh DALI pipeline whose external source is ``in_name``
    (the served model deserializes ``model.dali``; the peers build one from the spec)."""

    def __init__(self, make_pipeline: Callable[[], Any], in_name: str, max_batch: int, max_pixels: int,
                 max_bytes: int):
        self.make_pipeline, self.in_name, self.max_batch = make_pipeline, in_name, max(1, max_batch)
        self.max_pixels, self.max_bytes = max_pixels, max_bytes
        self.pipe = self.make_pipeline()
        self.observed = Observed()  # the last decode()'s images and refusals

    @classmethod
    def from_config(cls, config: dict[str, Any], here: Path) -> Preprocessor:
        """From a rendered config's parameters; ``here``: the version folder holding the serialized pipeline."""
        from nvidia.dali import Pipeline

        params = parameters(config)
        serialized = (here / params.get("dali_pipeline", "model.dali")).read_bytes()
        max_batch, threads = max(1, int(config["max_batch_size"])), int(params.get("dali_num_threads", "1"))

        def make_pipeline() -> Any:
            pipe = Pipeline.deserialize(serialized_pipeline=serialized, batch_size=max_batch, num_threads=threads,
                                        device_id=None, prefetch_queue_depth=1, exec_async=False,
                                        exec_pipelined=False)
            pipe.build()
            return pipe

        # the DALI external source has the model's input name
        return cls(make_pipeline, config["input"][0]["name"], max_batch, int(params["max_image_pixels"]),
                   int(params["max_image_bytes"]))

    def _run(self, images: list[bytes]) -> list[np.ndarray]:
        outs: list[np.ndarray] = []
        for i in range(0, len(images), self.max_batch):
            self.pipe.feed_input(self.in_name, [np.frombuffer(b, np.uint8) for b in images[i:i + self.max_batch]])
            (batch,) = self.pipe.run()
            outs.extend(batch.as_array())
        return outs

    def _run_isolating(self, images: list[bytes]) -> list[np.ndarray | Rejected]:
        """Per image: its array, or a Rejected. One DALI run for the whole batch when all decode.

        A failure that is not a decode failure propagates (INTERNAL): retrying image by image would
        only repeat it, once per image."""
        try:
            return list(self._run(images))
        except Exception as e:
            self.pipe = self.make_pipeline()
            if not is_decode_failure(e):
                raise
        results: list[np.ndarray | Rejected] = []
        for data in images:
            try:
                results.append(self._run([data])[0])
            except Exception as e:
                self.pipe = self.make_pipeline()
                if not is_decode_failure(e):
                    raise
                results.append(Rejected(f"could not decode the image data, corrupt or unsupported encoding "
                                        f"({dali_reason(e)})", "undecodable"))
        return results

    def decode(self, per_request: Sequence[np.ndarray]) -> list[np.ndarray | Rejected]:
        """Per request (an array of rows, or one row): its pixels (N, C, H, W) float32, or a Rejected naming
        each bad image by its index. Raises on a failure that is not the images' fault."""
        screened = screen(per_request, self.max_pixels, self.max_bytes)
        results = self._run_isolating(screened.good) if screened.good else []
        self.observed = Observed(
            [i for i, r in zip(screened.infos, results, strict=True) if not isinstance(r, Rejected)],
            screened.refusals() + [r.reason for r in results if isinstance(r, Rejected)])
        out: list[np.ndarray | Rejected] = []
        for slots in screened.slots:
            resolved = [results[s] if isinstance(s, int) else s for s in slots]
            out.append(request_refusal(resolved) or np.stack([r for r in resolved if not isinstance(r, Rejected)]))
        return out


@dataclass
class Screened:
    """A batch of requests after the decode policy's checks: per request, per image, the index of its bytes in
    ``good`` or why it was refused."""

    slots: list[list[int | Rejected]]
    good: list[bytes]
    infos: list[ImageInfo]

    def refusals(self) -> list[str]:
        return [s.reason for slots in self.slots for s in slots if isinstance(s, Rejected)]


def screen(per_request: Sequence[np.ndarray], max_pixels: int, max_bytes: int) -> Screened:
    """Every image of every request through :func:`inspect_image`, refusing bad ones up front."""
    screened = Screened([], [], [])
    for rows in per_request:
        rows = rows.reshape(1, -1) if rows.ndim == 1 else rows
        slots: list[int | Rejected] = []
        for row in rows:
            try:
                data, info = inspect_image(image_bytes(row), max_pixels, max_bytes)
                screened.good.append(data)
                screened.infos.append(info)
                slots.append(len(screened.good) - 1)
            except Rejected as e:
                slots.append(e)
        screened.slots.append(slots)
    return screened


def request_refusal(resolved: Sequence[Any]) -> Rejected | None:
    """One request's refusal naming each of its bad images by index, or None when all passed: a request is
    answered whole or refused whole."""
    errors = [f"image {i} of {len(resolved)}: {r}" for i, r in enumerate(resolved) if isinstance(r, Rejected)]
    return Rejected("; ".join(errors)) if errors else None


class Guard:
    """The GPU target's first stage: the decode policy's checks (size limits, JPEG/PNG, a sound header) before
    Triton's DALI backend sees the bytes. DALI cannot refuse one image: a decode error fails its whole batch,
    and a small PNG that decodes to billions of pixels exhausts the host's or the GPU's memory. So the same
    checks as the embedded target's, with the same messages; a request that passes goes on unchanged."""

    def __init__(self, max_pixels: int, max_bytes: int):
        self.max_pixels, self.max_bytes = max_pixels, max_bytes
        self.observed = Observed()

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Guard:
        params = parameters(config)
        return cls(int(params["max_image_pixels"]), int(params["max_image_bytes"]))

    def check(self, per_request: Sequence[np.ndarray]) -> list[np.ndarray | Rejected]:
        """Per request: its rows as they came, or a Rejected naming each bad image by its index."""
        screened = screen(per_request, self.max_pixels, self.max_bytes)
        self.observed = Observed(list(screened.infos), screened.refusals())
        return [request_refusal(slots) or rows for rows, slots in zip(per_request, screened.slots, strict=True)]


def make_classifier(engine: str, path: Path | str | bytes, threads: int = 1,
                    inference_precision: str = engines.InferencePrecision.F32) -> Any:
    """A classifier on ``engine`` (an embedded-target engine of served/engines.py); ONNX Runtime has one precision
    (the file's), OpenVINO takes a hint."""
    classifier = engines.get(engine, engines.Target.EMBEDDED).classifier
    assert classifier is not None  # every engine of the embedded target has one (engines.Engine)
    return classifier(path, threads, inference_precision)


def classifier_from_config(config: dict[str, Any], here: Path) -> Any:
    """The classifier a rendered config asks for (an older config without an engine: ONNX Runtime)."""
    params = parameters(config)
    return make_classifier(params.get("engine", engines.default_for(engines.Target.EMBEDDED).name),
                           here / params.get("onnx_file", "model.onnx"), int(params.get("intra_op_threads", "1")),
                           params.get("inference_precision", engines.InferencePrecision.F32))


def prediction_summary(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of probabilities: (top-1 confidence, entropy normalized by log(classes) to [0, 1], top-1 class):
    what the served metrics histogram and count."""
    p = probs.astype(np.float64, copy=False)
    entropy = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=1) / np.log(max(2, p.shape[1]))
    return p.max(axis=1), np.clip(entropy, 0.0, 1.0), p.argmax(axis=1)


class TopK:
    """Logits -> softmax probabilities and the top-k labels and scores."""

    def __init__(self, labels: Sequence[str], k: int):
        self.classes = list(labels)
        self.labels = np.array([label.encode() for label in labels], dtype=object)
        self.k = k

    @classmethod
    def from_config(cls, config: dict[str, Any], here: Path) -> TopK:
        return cls((here / "labels.txt").read_text().splitlines(), int(parameters(config).get("top_k", "5")))

    def __call__(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(probabilities, labels, scores) for a batch of logits."""
        logits = logits.astype(np.float32, copy=False)
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = z / z.sum(axis=1, keepdims=True)
        top = np.argsort(-probs, axis=1, kind="stable")[:, : self.k]
        return probs, self.labels[top], np.take_along_axis(probs, top, axis=1)


# --------------------------------------------------------------------------------------------------------
# Drift: the live answers against the model's own answers on its val split
# --------------------------------------------------------------------------------------------------------
#
# Two signals, each a distribution over fixed bins: the top-1 confidence (CONFIDENCE_BUCKETS, the served
# histogram's, plus the bin above the last) and the class mix. The reference is the exported model's answers
# on its val split (build.export_onnx stores it in the metadata contract, make repo in the served config);
# the live side is the last DRIFT_WINDOW answers. The score is the population stability index, PSI =
# sum (live - ref) * ln(live / ref): the field's usual drift score for binned distributions, symmetric,
# with a conventional reading (under 0.1 stable, over 0.25 a real shift: DRIFT_ALERT_PSI, the alert rule's
# threshold) that does not depend on the window's size the way a chi-square test's p-value does, which at
# hundreds of answers flags differences too small to matter. KS would need every raw value of the reference.
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
# the other served histograms' bucket edges (served/metrics.py on the server, clients/metrics.py
# on the client: one set, so the two sides' series add up and read alike)
ENTROPY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
BYTES_BUCKETS = tuple(2.0 ** k for k in range(10, 26, 2))   # 1 KiB .. 16 MiB
PIXELS_BUCKETS = tuple(4.0 ** k for k in range(6, 13))      # 64x64 .. 4096x4096
def prometheus_float(value: float) -> str:
    """A histogram bucket's bound as Prometheus' own clients write it (Go's float format: 0.05, 4096.0,
    1.048576e+06, +Inf), so the served models' series and the client library's (clients/metrics.py, with
    prometheus_client) are the very same series. Written here rather than imported from prometheus_client
    (its utils.floatToGoString, which the tests compare it with): the served models run in the container's
    Python, whose locked packages (docker/requirements-gpu.lock) do not include it."""
    value = float(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    text = repr(value)
    dot = text.find(".")
    if value > 0 and dot > 6:  # Go writes an exponent from 1e21 down to 7 digits before the point
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


# the served metrics' names and help, by what they measure (both sides export these, and the dashboards query them)
METRICS = {
    "bytes": ("image_classifier_input_bytes", "Encoded size of each accepted image, bytes"),
    "pixels": ("image_classifier_input_pixels", "Decoded size of each accepted image, width x height"),
    "formats": ("image_classifier_inputs_total", "Accepted images by format"),
    "refusals": ("image_classifier_refusals_total", "Refused images by reason"),
    "confidence": ("image_classifier_top1_confidence", "Top-1 probability of each answer"),
    "entropy": ("image_classifier_entropy", "Entropy of each answer over log(number of classes)"),
    "predictions": ("image_classifier_predictions_total", "Answers by predicted class"),
    "drift": ("image_classifier_drift_psi", "Population stability index of the last answers against the val "
              "split's (by signal)"),
}
DRIFT_ALERT_PSI = 0.25
# An empty bin has no logarithm: every bin of both sides gets half an answer more (Jeffreys' prior), so a class
# the reference saw rarely or never weighs what the counts on both sides show, not ln(1 / a fixed floor) (a
# floor of 1e-3 made each such class worth up to ln 1000, whatever the sizes)
PSI_PSEUDO_COUNT = 0.5
# The class mix is scored over at most this many bins. With more bins than a window fills (1,000 ImageNet
# classes against 500 answers) the in-distribution score's noise, about (bins - 1) * (1 / window + 1 /
# reference answers), would be over the alert threshold; so beyond it classes are grouped (class_bins)
MAX_CLASS_BINS = 20


def confidence_bins(top1: np.ndarray) -> np.ndarray:
    """Each answer's confidence bin: 0 for <= 0.1, ..., len(CONFIDENCE_BUCKETS) above the last edge."""
    return np.searchsorted(np.array(CONFIDENCE_BUCKETS), np.asarray(top1, np.float64), side="left")


def answer_distribution(probs: np.ndarray) -> dict[str, Any]:
    """The reference of a set of answers (rows of probabilities): fractions per confidence bin and per class."""
    top1, _, predicted = prediction_summary(probs)
    n = max(1, len(probs))
    return {"answers": int(len(probs)),
            "confidence": (np.bincount(confidence_bins(top1), minlength=len(CONFIDENCE_BUCKETS) + 1) / n).tolist(),
            "classes": (np.bincount(predicted, minlength=probs.shape[1]) / n).tolist()}


def smoothed(fractions: Sequence[float] | np.ndarray, answers: int) -> np.ndarray:
    """Fractions of ``answers`` answers with PSI_PSEUDO_COUNT answers added to every bin."""
    f = np.asarray(fractions, np.float64)
    return (f * answers + PSI_PSEUDO_COUNT) / (f.sum() * answers + PSI_PSEUDO_COUNT * len(f))


def psi(reference: Sequence[float] | np.ndarray, live: Sequence[float] | np.ndarray, reference_answers: int,
        live_answers: int) -> float:
    """Population stability index of ``live`` against ``reference`` (fractions over the same bins, of that many
    answers each), both smoothed (:func:`smoothed`)."""
    ref, cur = smoothed(reference, reference_answers), smoothed(live, live_answers)
    return float(((cur - ref) * np.log(cur / ref)).sum())


def class_bins(num_classes: int, max_bins: int = MAX_CLASS_BINS) -> np.ndarray:
    """Each class's bin in the class-mix score: its own up to ``max_bins`` classes; beyond, ``max_bins``
    contiguous ranges of class indices. Not groups by the reference's frequencies: those carry the reference
    sample's noise, and live traffic regresses from it (a 1,000-class model scored 0.58 on its own val split)."""
    return np.arange(num_classes) * min(num_classes, max_bins) // num_classes


class DriftWindow:
    """The last ``size`` answers' bins, scored against a reference (:func:`answer_distribution`)."""

    def __init__(self, reference: dict[str, Any], size: int):
        self.reference, self.size = reference, size
        self.confidence = np.zeros(size, np.int64)
        self.classes = np.zeros(size, np.int64)
        self.seen = 0
        self.class_bins = class_bins(len(reference["classes"]))
        self.reference_classes = np.bincount(self.class_bins, weights=np.asarray(reference["classes"], np.float64))

    def add(self, top1: np.ndarray, predicted: np.ndarray) -> None:
        bins, classes = confidence_bins(top1)[-self.size:], np.asarray(predicted)[-self.size:]
        self.seen += len(top1) - len(bins)  # a batch longer than the window: only its last answers stay
        slots = (self.seen + np.arange(len(bins))) % self.size
        self.confidence[slots], self.classes[slots] = bins, classes
        self.seen += len(bins)

    def scores(self) -> dict[str, float] | None:
        """PSI per signal over the window, once it is full (None before: a few answers say nothing)."""
        if self.seen < self.size:
            return None
        conf = np.bincount(self.confidence, minlength=len(self.reference["confidence"])) / self.size
        classes = np.bincount(self.class_bins[self.classes], minlength=len(self.reference_classes)) / self.size
        n = int(self.reference["answers"])
        return {"confidence": psi(self.reference["confidence"], conf, n, self.size),
                "class_mix": psi(self.reference_classes, classes, n, self.size)}


class SharedDriftWindow(DriftWindow):
    """One window for all the instances of a served model version, each a process of its own: the ring is a
    small file every instance reads and writes under an exclusive lock (fcntl.flock), so a score exists once
    the version has answered ``size`` images in all, whatever the instance count, and every instance reports
    the same one. The file's name carries the server's process id (the instances' parent): the last instance
    to close removes it, and one a killed server left is removed by the next instance that opens the folder."""

    HEADER = 3  # int64: answers seen, window size, instances attached; then the confidence and class rings

    def __init__(self, reference: dict[str, Any], size: int, folder: Path | str, name: str):
        super().__init__(reference, size)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        remove_orphans(folder)
        self.path = folder / f"{name}.{os.getppid()}.ring"
        self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        with self._locked():
            attached = self._load()
            self._save(attached + 1)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = self.fd
        if fd is None:
            raise ValueError(f"the drift window {self.path} is closed")
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _load(self) -> int:
        """The shared ring into this object (reset if another window size wrote it); the instances attached."""
        assert self.fd is not None
        data = os.pread(self.fd, 8 * (self.HEADER + 2 * self.size), 0)
        words = np.frombuffer(data[:len(data) - len(data) % 8], np.int64)
        if len(words) < self.HEADER + 2 * self.size or words[1] != self.size:
            self.seen = 0
            self.confidence[:] = 0
            self.classes[:] = 0
            return int(words[2]) if len(words) >= self.HEADER else 0
        self.seen = int(words[0])
        self.confidence[:] = words[self.HEADER:self.HEADER + self.size]
        self.classes[:] = words[self.HEADER + self.size:]
        return int(words[2])

    def _save(self, attached: int) -> None:
        assert self.fd is not None
        words = np.concatenate([[self.seen, self.size, attached], self.confidence, self.classes]).astype(np.int64)
        os.pwrite(self.fd, words.tobytes(), 0)

    def add(self, top1: np.ndarray, predicted: np.ndarray) -> None:
        with self._locked():
            attached = self._load()
            super().add(top1, predicted)
            self._save(attached)

    def scores(self) -> dict[str, float] | None:
        with self._locked():
            self._load()
            return super().scores()

    def close(self) -> None:
        """Detach; the last instance removes the file."""
        if self.fd is None:
            return
        with self._locked():
            attached = max(0, self._load() - 1)
            self._save(attached)
            if attached == 0:
                self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


def remove_orphans(folder: Path) -> None:
    """The shared windows of servers that are gone (their process id, in the file's name, is not running)."""
    for ring in folder.glob("*.ring"):
        pid = ring.suffixes[-2][1:] if len(ring.suffixes) >= 2 else ""
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            ring.unlink(missing_ok=True)
        except PermissionError:  # running, as another user
            pass
