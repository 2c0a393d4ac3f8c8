"""Inference runners, as a registry: a model -> a function from a preprocessed batch to its logits.

Every measurement runs what serves: export validation, quantization scoring and its latencies, live
publishing's accuracy gate, the in-process ceiling and the GPU check take their runner from here, and
the ONNX Runtime runner creates its session with the served classifier's own factory
(:func:`served.engines.ort_session`: threads as configured, idle threads not spinning).

    run = make_runner("onnxruntime", "artifacts/model.onnx", threads=0)
    logits = run(batch)            # float32 [N, num_classes]

The runners are the engine registry's (served/engines.py: each engine's record names its runner, and whether
measurements run it in a process of its own): adding a runtime is one class with ``__call__(batch) ->
logits`` and one record there. Heavy libraries (ONNX Runtime, OpenVINO, TensorRT, torch) are imported by the
runner that needs them.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from served import engines
from served.engines import OrtRunner, OvRunner, Runner, TorchRunner, TrtRunner

__all__ = ["OrtRunner", "OvRunner", "Runner", "TorchRunner", "TrtRunner", "isolated", "latency", "logits_of",
           "make_runner", "openvino_capabilities", "score_isolated"]


def make_runner(kind: str, model: Any, **options: Any) -> Runner:
    """A runner of ``kind`` (a registered engine) for ``model`` (a path or bytes for ONNX Runtime, a plan for
    TensorRT, a module for PyTorch); ``options`` go to its class."""
    return engines.get(kind, what="runner").runner(model, **options)


def latency(run: Runner, inputs: np.ndarray, batches: Sequence[int] = (1, 8, 16, 32), min_time: float = 0.5) -> dict:
    """ms per batch and images/s at each batch size; best = highest images/s."""
    out = {}
    for b in batches:
        x = np.ascontiguousarray(inputs[:b])
        if len(x) < b:
            x = np.concatenate([x] * (b // max(1, len(x)) + 1))[:b]
        run(x)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_time:
            run(x)
            n += 1
        ms = 1000 * (time.perf_counter() - start) / n
        out[b] = {"ms": ms, "images_per_s": b * 1000 / ms}
    best = max(out, key=lambda b: out[b]["images_per_s"])
    return {"batch1_ms": out[1]["ms"], "best_batch": best, "best_images_per_s": out[best]["images_per_s"],
            "by_batch": out}


def isolated(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a fresh interpreter (spawned, not forked), its result returned and its
    exception raised here; the child is gone when this returns, on every exit path. ``fn`` must be a
    module-level function, its arguments and result picklable; a script calling this (directly or through
    build.quantize or perf.reference.ceiling) needs the usual ``if __name__ == "__main__":`` guard, since the child
    imports the caller's main module."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args, kwargs)


def score_isolated(models: dict[str, tuple[str, bytes, str]], spec: dict, paths: Sequence[str], sample: np.ndarray,
                   min_time: float = 0.5) -> dict[str, dict]:
    """For each ``name: (engine, ONNX bytes, precision hint)``: its logits over the images at ``paths``
    (preprocessed here by ``spec``, streamed one batch at a time) and its latency on ``sample``, or the error
    the engine (OpenVINO: an isolated one of served/engines.py) raised compiling it. Meant to run :func:`isolated`."""
    from core.preprocess import DaliPreprocessor, PreprocessSpec

    out: dict[str, dict] = {}
    runs: dict[str, Runner] = {}
    for name, (engine, blob, hint) in models.items():
        try:
            runs[name] = engines.get(engine).measuring(blob, hint)
        except RuntimeError as e:  # a file this engine cannot compile
            out[name] = {"error": " ".join(str(e).split())[-400:]}
    logits: dict[str, list[np.ndarray]] = {name: [] for name in runs}
    for batch in DaliPreprocessor(PreprocessSpec.from_dict(spec), batch_size=32).iter_files([Path(p) for p in paths]):
        for name, run in runs.items():
            logits[name].append(run(np.ascontiguousarray(batch)))
    for name in list(runs):
        out[name] = {"logits": np.concatenate(logits[name]),
                     "latency": latency(runs.pop(name), sample, min_time=min_time)}
    return out


def logits_of(kind: str, model: Any, x: np.ndarray, **options: Any) -> np.ndarray:
    """One batch through a fresh runner of ``kind``: ``isolated(logits_of, "openvino", path, x)``."""
    return make_runner(kind, model, **options)(x)


def openvino_capabilities() -> list[str]:
    """OpenVINO's view of this CPU (its OPTIMIZATION_CAPABILITIES); [] without OpenVINO. Run it isolated."""
    try:
        import openvino as ov
    except ImportError:
        return []
    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
