"""Shadow rollout, the served side: a share of the answered batches mirrored to a candidate model, answers
compared, off the request path.

The served model (the fused layout's) hands over each batch it answered: the encoded image rows and its
own top-1 label per image. A thread of its own sends the batch, as one request with the same rows, to the
candidate (``target``, a model loaded beside it in the same server) through Triton's BLS, and compares
the candidate's top-1 with the served one. Clients are answered before any of this happens and never
see the candidate; a full queue drops the batch (counted) rather than wait. The counts are written, at
most every ``flush_s`` and at close, to ``<directory>/<instance>.json`` (one file per model instance,
replaced atomically), which `python -m serve.rollout` reads to promote or withdraw the candidate.

Copied with the served package beside the served model by ``make repo`` (build/render_repo.py), so it
imports only the standard
library and NumPy; the BLS call is passed in (``send``), so this runs without Triton too.
"""

from __future__ import annotations

import json
import os
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

QUEUE_SIZE = 64  # batches waiting for the mirror; more are dropped (and counted)
RECORD = ".json"


def pad_rows(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Encoded images (1-D uint8 rows of any length) -> one zero-padded [N, max_len] batch."""
    out = np.zeros((len(rows), max(len(r) for r in rows)), np.uint8)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


class ShadowMirror:
    def __init__(self, send: Callable[[np.ndarray], list[str]], directory: Path | str, instance: str,
                 percent: float = 100.0, flush_s: float = 1.0):
        """``send``: the candidate's top-1 labels for a padded batch of encoded images (raises on failure)."""
        self.send, self.percent, self.flush_s = send, float(percent), flush_s
        self.path = Path(directory) / f"{instance}{RECORD}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.counts = {"mirrored": 0, "agreed": 0, "errors": 0, "dropped_batches": 0, "skipped": 0}
        self.pairs: Counter[tuple[str, str]] = Counter()  # (served, candidate) top-1 where they differ
        self.latency_ms: list[float] = []  # the candidate's, per mirrored batch (BLS round trip)
        self.last_error = ""
        self._queue: queue.Queue = queue.Queue(QUEUE_SIZE)
        self._lock = threading.Lock()
        self._written = 0.0
        self._thread = threading.Thread(target=self._run, name="shadow-mirror", daemon=True)
        self._thread.start()

    def offer(self, rows: Sequence[np.ndarray], served_top1: Sequence[str]) -> None:
        """A batch the served model answered: its encoded rows and its top-1 labels, in order. Never blocks."""
        if not rows:
            return
        if self.percent < 100 and random.random() * 100 >= self.percent:
            with self._lock:
                self.counts["skipped"] += len(rows)
            return
        try:
            self._queue.put_nowait((pad_rows(rows), list(served_top1)))
        except queue.Full:
            with self._lock:
                self.counts["dropped_batches"] += 1

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch, served = item
            start = time.perf_counter()
            try:
                theirs = self.send(batch)
                if len(theirs) != len(served):
                    raise RuntimeError(f"the candidate answered {len(theirs)} images for {len(served)}")
            except Exception as e:  # the candidate's failure is a figure, never the served model's
                with self._lock:
                    self.counts["errors"] += len(served)
                    self.last_error = str(e)[:500]
                self._maybe_write()
                continue
            with self._lock:
                self.latency_ms.append(1000 * (time.perf_counter() - start))
                self.counts["mirrored"] += len(served)
                for ours, cand in zip(served, theirs, strict=True):
                    if ours == cand:
                        self.counts["agreed"] += 1
                    else:
                        self.pairs[(ours, cand)] += 1
            self._maybe_write()

    def summary(self) -> dict:
        with self._lock:
            return {**self.counts, "disagreements": [[a, b, n] for (a, b), n in self.pairs.most_common()],
                    "latency_ms": list(self.latency_ms), "last_error": self.last_error}

    def _maybe_write(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._written < self.flush_s:
            return
        self._written = now
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            tmp.write_text(json.dumps(self.summary()))
            os.replace(tmp, self.path)  # the reader sees the old summary or the new one, never half of one
        except OSError:  # the reader has decided and removed the folder: nobody reads these counts any more
            pass

    def close(self, timeout_s: float = 10.0) -> dict:
        """Mirror what is queued (for at most ``timeout_s``), write the final counts, return them."""
        self._queue.put(None)
        self._thread.join(timeout_s)
        self._maybe_write(force=True)
        return self.summary()


def read_summaries(directory: Path | str) -> dict:
    """Every instance's counts under ``directory``, summed (latencies pooled)."""
    total = {"mirrored": 0, "agreed": 0, "errors": 0, "dropped_batches": 0, "skipped": 0}
    pairs: Counter[tuple[str, str]] = Counter()
    latency: list[float] = []
    errors = []
    for f in sorted(Path(directory).glob(f"*{RECORD}")):
        if f.name.startswith("."):
            continue
        s = json.loads(f.read_text())
        for k in total:
            total[k] += s[k]
        pairs.update({(a, b): n for a, b, n in s["disagreements"]})
        latency += s["latency_ms"]
        if s["last_error"]:
            errors.append(s["last_error"])
    return {**total, "disagreements": [[a, b, n] for (a, b), n in pairs.most_common()], "latency_ms": latency,
            "errors_seen": errors}
