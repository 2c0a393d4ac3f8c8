"""The in-process ceiling's schedules: decoding overlapped with inference, and stopped on every exit."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from perf.reference import ceiling


def _stage(seconds: float):
    """A stage that takes ``seconds`` per batch and releases the GIL meanwhile, as DALI and the engines do."""
    def run(x):
        time.sleep(seconds)
        return np.zeros((len(x), 1), np.float32)
    return run


def _sequential_rate(decode, infer, blobs, batch, min_time):
    def run():
        for i in range(0, len(blobs), batch):
            infer(decode(blobs[i:i + batch]))
    return ceiling._rate(run, len(blobs), min_time)


def test_overlapped_schedule_runs_decode_and_inference_at_once():
    blobs, decode, infer = [b"x"] * 32, _stage(0.02), _stage(0.02)
    sequential = _sequential_rate(decode, infer, blobs, 8, 0.6)
    overlapped = ceiling.overlapped_rate(decode, infer, blobs, 8, 0.6)
    # equal stages: one after the other 8 images / 40 ms, overlapped 8 / 20 ms (sleeps: no CPU contention)
    assert overlapped > 1.4 * sequential
    assert not [t for t in threading.enumerate() if t.name == "ceiling-decode"]


def test_a_decoding_error_is_raised_and_the_thread_stopped():
    calls = []

    def decode(chunk):
        calls.append(len(chunk))
        if len(calls) == 3:
            raise ValueError("corrupt image in the sample")
        return np.zeros((len(chunk), 1), np.float32)

    with pytest.raises(ValueError, match="corrupt image in the sample"):
        ceiling.overlapped_rate(decode, _stage(0.001), [b"x"] * 16, 4, 5.0)
    assert not [t for t in threading.enumerate() if t.name == "ceiling-decode"]
    # an error in inference stops the decoding thread too, however full its queue
    with pytest.raises(RuntimeError, match="engine failed"):
        ceiling.overlapped_rate(_stage(0.0), lambda x: (_ for _ in ()).throw(RuntimeError("engine failed")),
                                [b"x"] * 16, 4, 5.0)
    time.sleep(0.3)
    assert not [t for t in threading.enumerate() if t.name == "ceiling-decode"]


def test_ceiling_measures_the_served_engine(onnx_model, val_files):
    r = ceiling.measure_isolated(onnx_model, val_files[0].parent.parent, batches=(8,), min_time=0.2, stages=False,
                                 engine="openvino", inference_precision="bf16")
    assert (r["engine"], r["inference_precision"]) == ("openvino", "bf16")
    assert set(r["images_per_s_by_schedule"]) == set(ceiling.SCHEDULES)
    assert r["ceiling_images_per_s"] == max(v[8] for v in r["images_per_s_by_schedule"].values()) > 0
    with pytest.raises(ValueError, match="engine must be one of"):  # raised in the child, here
        ceiling.measure_isolated(onnx_model, val_files[0].parent.parent, engine="tflite")
