"""The in-process ceiling: the served pipeline's own work with no server and no network.

Same preprocessing (the DALI CPU pipeline from the checkpoint's spec), the same engine on the same ONNX
file at the same precision as served (ONNX Runtime, or OpenVINO at its precision hint), same JPEGs, on
every core, at the best batch size, and the better of two schedules:

- ``sequential``: decode a batch, then infer it;
- ``overlapped``: a decoding thread keeps a queue of batches full while inference runs, as the server's
  instances overlap the two. For decode-bound work (large photos, a small model) this is what the
  machine can do; a sequential ceiling is then below the server it is meant to bound.

The most images per second this machine can push through the pipeline, which the server can approach
but not beat. Also measures each stage alone, and the same preprocessing done the naive way (Pillow +
NumPy, one image at a time) for the DALI-vs-Pillow plot.

    python -m perf.reference.ceiling --onnx artifacts/model.onnx --images data/synthetic/val [--engine openvino]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.metadata import read_metadata
from core.preprocess import DaliPreprocessor, pillow_preprocess
from core.runners import Runner, isolated
from perf.load.bodies import sample_images
from served import engines
from served.engines import InferencePrecision, Target

SCHEDULES = ("sequential", "overlapped")


def _rate(fn: Callable[[], object], n_images: int, min_time: float) -> float:
    fn()  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_time:
        fn()
        done += n_images
    return done / (time.perf_counter() - start)


def overlapped_rate(decode: Callable[[Sequence[bytes]], np.ndarray], infer: Callable[[np.ndarray], object],
                    blobs: list[bytes], batch: int, min_time: float, depth: int = 2) -> float:
    """Images/s with decoding in a thread of its own, ``depth`` batches ahead of inference (DALI and the
    engines release the GIL). The thread is stopped on every exit, and its error, if any, is raised here."""
    chunks = [blobs[i:i + batch] for i in range(0, len(blobs), batch)]
    batches: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            while not stop.is_set():
                for chunk in chunks:
                    item = (len(chunk), decode(chunk))
                    while not stop.is_set():
                        try:
                            batches.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
        except BaseException as e:  # handed to the consumer, which raises it
            batches.put((0, e))

    worker = threading.Thread(target=produce, name="ceiling-decode", daemon=True)
    worker.start()
    try:
        def take() -> int:
            n, x = batches.get(timeout=300)
            if isinstance(x, BaseException):
                raise x
            infer(x)
            return n

        take()  # warm-up: the queue filled once, one inference
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_time:
            done += take()
        return done / (time.perf_counter() - start)
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                batches.get_nowait()
            worker.join(0.1)


def engine_runner(onnx_path: Path | str, engine: str, inference_precision: str = InferencePrecision.F32) -> Runner:
    """The engine on every core; ONNX Runtime's idle threads spinning, as it does by default (the best this
    process can do, not the served setting)."""
    record = engines.get(engine, Target.EMBEDDED)  # its fastest options (ONNX Runtime: spinning), its hint
    return record.measuring(onnx_path, inference_precision, threads=0, **record.fastest_options)


def measure(onnx_path: Path, image_dir: Path, batches=(1, 8, 16, 32), threads: int = 0,
            min_time: float = 2.0, n_images: int = 64, stages: bool = True, engine: str = "onnxruntime",
            inference_precision: str = "f32", schedules: Sequence[str] = SCHEDULES) -> dict:
    """Images/s of DALI + the engine in this process at each batch size and schedule; ``stages``: also each
    stage alone. ``threads``: DALI's (0 = one per core)."""
    if unknown := set(schedules) - set(SCHEDULES):
        raise ValueError(f"schedules must be among {SCHEDULES}, got {sorted(unknown)}")
    spec = read_metadata(onnx_path).preprocess
    blobs = [b for _, b in sample_images(image_dir, n_images)]
    infer = engine_runner(onnx_path, engine, inference_precision)
    dali = DaliPreprocessor(spec, batch_size=max(batches), num_threads=threads or os.cpu_count() or 1)

    def sequential(batch: int) -> float:
        def run() -> None:
            for i in range(0, len(blobs), batch):
                infer(dali(blobs[i:i + batch]))
        return _rate(run, len(blobs), min_time)

    def overlapped(batch: int) -> float:
        return overlapped_rate(dali, infer, blobs, batch, min_time)

    run_schedule = {"sequential": sequential, "overlapped": overlapped}
    by_schedule = {s: {b: run_schedule[s](b) for b in batches} for s in schedules}
    schedule, best = max(((s, b) for s in by_schedule for b in by_schedule[s]),
                         key=lambda sb: by_schedule[sb[0]][sb[1]])
    r = {"engine": engine, "inference_precision": inference_precision, "images_per_s_by_schedule": by_schedule,
         "images_per_s_by_batch": by_schedule[schedule], "best_schedule": schedule, "best_batch": best,
         "ceiling_images_per_s": by_schedule[schedule][best], "images": len(blobs)}
    if not stages:
        return r
    dali_rate = _rate(lambda: dali(blobs), len(blobs), min_time)
    pillow_rate = _rate(lambda: [pillow_preprocess(b, spec) for b in blobs], len(blobs), min_time)
    inputs = dali(blobs[:best])
    model_rate = _rate(lambda: infer(inputs), len(inputs), min_time)
    return {**r, "preprocess_images_per_s": {"dali_cpu_batched": dali_rate, "pillow_numpy_one_by_one": pillow_rate},
            "model_only_images_per_s_at_best_batch": model_rate}


def measure_isolated(*args: Any, **kwargs: Any) -> dict:
    """:func:`measure` in a process of its own (core.runners.isolated): the engines' threads and OpenVINO
    stay out of the caller, which goes on to start servers and load generators."""
    return dict(isolated(measure, *args, **kwargs))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="In-process ceiling: DALI + the served engine, no server")
    p.add_argument("--onnx", type=Path, required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--engine", choices=engines.names(Target.EMBEDDED),
                   default=str(engines.default_for(Target.EMBEDDED).name))
    p.add_argument("--inference-precision", choices=("f32", "bf16"), default="f32", help="OpenVINO's hint")
    p.add_argument("--min-time", type=float, default=2.0, help="seconds per measurement")
    return p


if __name__ == "__main__":
    a = get_args_parser().parse_args()
    print(json.dumps(measure(a.onnx, a.images, min_time=a.min_time, engine=a.engine,
                             inference_precision=a.inference_precision), indent=2))
