"""Payload sampling: a share of the served requests recorded, for retraining and for a person to relabel.

The served model (the fused layout's, which holds both the image bytes and the answer) asks which of its
answered images to record (``percent`` of them, :meth:`PayloadSampler.picks`) and hands over only those;
they are queued and written by a thread of its own, off the request path: per sample one JSON record
(time, model and version, the image's sha256, encoded size and format, the top-k labels and scores, the
batch's latency) and, if asked, the image bytes beside it, into one folder, at most ``max_bytes`` in all
(the oldest samples are deleted first). A full queue drops the sample rather than wait. ``python -m
training.relabel`` turns the samples into an ImageFolder tree by predicted class for a person to
correct; training reads it as any data set.

Copied with the served package beside the served model by ``make repo`` (build/render_repo.py), so it
imports only the standard
library and NumPy.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

RECORD = ".json"
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png"}
QUEUE_SIZE = 256  # samples waiting for the writer; more are dropped (and counted)
# each instance re-reads the folder at most this often, so the bound holds across a model's instances to
# within what the others write in that time
RESCAN_S = 1.0


class PayloadSampler:
    def __init__(self, directory: Path | str, percent: float, max_bytes: int, keep_images: bool, model: str,
                 version: str):
        self.dir, self.percent, self.max_bytes = Path(directory), float(percent), int(max_bytes)
        self.keep_images, self.model, self.version = keep_images, model, version
        self.dir.mkdir(parents=True, exist_ok=True)
        self.files: list[Path] = []
        self.sizes: dict[Path, int] = {}
        self.total, self.scanned = 0, 0.0
        self._scan()
        self.queue: queue.Queue[dict[str, Any] | None] = queue.Queue(QUEUE_SIZE)
        self.dropped = self.written = 0
        self.thread = threading.Thread(target=self._run, name="payload-sampler", daemon=True)
        self.thread.start()

    def picks(self, n: int) -> list[bool]:
        """Which of ``n`` answered images to record: decided before the caller gathers anything for them."""
        return [random.random() * 100 < self.percent for _ in range(n)]

    def offer(self, samples: Sequence[tuple[bytes, str, Sequence[str], Sequence[float]]], latency_ms: float) -> None:
        """Picked images as (bytes, format, labels, scores): queued for the writer, never waited on."""
        for data, fmt, labels, scores in samples:
            try:
                self.queue.put_nowait({"data": bytes(data), "format": fmt, "labels": [str(x) for x in labels],
                                       "scores": [float(x) for x in scores], "latency_ms": latency_ms,
                                       "time": time.time()})
            except queue.Full:
                self.dropped += 1

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            try:
                self._write(item)
            except OSError:  # a full disk or a removed folder costs samples, never the model
                self.dropped += 1

    def _write(self, item: dict[str, Any]) -> None:
        data = item.pop("data")
        sha = hashlib.sha256(data).hexdigest()
        fmt = item["format"]
        stem = f"{time.time_ns():020d}-{sha[:16]}"
        record = {"time": item["time"], "model": self.model, "version": self.version, "sha256": sha,
                  "bytes": len(data), "format": fmt, "labels": item["labels"], "scores": item["scores"],
                  "latency_ms": item["latency_ms"], "image": None}
        written = []
        if self.keep_images and fmt in EXTENSIONS:
            record["image"] = stem + EXTENSIONS[fmt]
            written.append(self._atomic(self.dir / record["image"], data))
        written.append(self._atomic(self.dir / (stem + RECORD), json.dumps(record).encode()))
        for p in written:
            self.files.append(p)
            self.sizes[p] = p.stat().st_size
            self.total += self.sizes[p]
        self.written += 1
        if time.monotonic() - self.scanned > RESCAN_S:
            self._scan()  # what the model's other instances wrote and deleted meanwhile
        while self.total > self.max_bytes and self.files:  # the oldest first (names start with the time),
            stem = self.files[0].name.split(".", 1)[0]      # a record and its image together
            gone = [p for p in self.files if p.name.split(".", 1)[0] == stem]
            self.files = [p for p in self.files if p not in gone]
            for p in gone:
                self.total -= self.sizes.pop(p, 0)
                p.unlink(missing_ok=True)

    def _scan(self) -> None:
        """The folder as it is now. Every instance of the model writes into it and deletes from it, so a file
        listed may be gone before it is measured (a model loading while another instance serves: a reload)."""
        sizes = {}
        for p in self.dir.iterdir():
            if p.name.startswith("."):
                continue
            try:
                sizes[p] = p.stat().st_size
            except FileNotFoundError:
                continue
        self.files, self.sizes = sorted(sizes, key=lambda p: p.name), sizes
        self.total, self.scanned = sum(sizes.values()), time.monotonic()

    @staticmethod
    def _atomic(path: Path, data: bytes) -> Path:
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return path

    def close(self, timeout_s: float = 10.0) -> str:
        """Write what is queued, then stop the thread (the model's finalize); what it did, to log."""
        self.queue.put(None)
        self.thread.join(timeout_s)
        return f"payload samples: {self.written} written to {self.dir}, {self.dropped} dropped"


def read_samples(directory: Path | str) -> Iterator[dict[str, Any]]:
    """Every sample's record under ``directory`` (the model's folder: one subfolder per instance), oldest
    first, with ``path`` (its image's, or None)."""
    for record in sorted(Path(directory).rglob("*" + RECORD), key=lambda p: p.name):
        if record.name.startswith("."):
            continue
        r = json.loads(record.read_text())
        image = record.parent / r["image"] if r.get("image") else None
        yield {**r, "path": image if image is not None and image.is_file() else None}
