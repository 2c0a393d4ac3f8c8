"""Inference runners, as a registry: a model -> a function from a preprocessed batch to its logits.

Every measurement runs what serves: export validation, quantization scoring and its latencies, live
publishing's accuracy gate, the in-process ceiling and the GPU check take their runner from here, and
the ONNX Runtime runner creates its session with the served classifier's own factory
(:func:`core.stages.ort_session`: threads as configured, idle threads not spinning).

    run = make_runner("onnxruntime", "artifacts/model.onnx", threads=0)
    logits = run(batch)            # float32 [N, num_classes]

Adding a runtime is one class with ``__call__(batch) -> logits`` and one entry in :data:`RUNNERS`.
Heavy libraries (ONNX Runtime, OpenVINO, TensorRT, torch) are imported by the runner that needs them.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.stages import OpenVinoClassifier, ort_session

Runner = Callable[[np.ndarray], np.ndarray]  # a batch of preprocessed images -> logits


class OrtRunner:
    """ONNX Runtime on the CPU. ``threads`` 0 = one per core (measurements); the served classifier runs
    its configured count. ``outputs``: run() returns that many outputs (logits, then probabilities)."""

    def __init__(self, model: Path | str | bytes, threads: int = 0, allow_spinning: bool = False):
        self.session = ort_session(model, threads, allow_spinning)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, x: np.ndarray, outputs: int = 1, batch_size: int | None = None) -> list[np.ndarray]:
        """The first ``outputs`` outputs, in batches of ``batch_size`` (None: all at once)."""
        step = batch_size or max(1, len(x))
        runs = [self.session.run(self.output_names[:outputs], {self.input_name: x[i:i + step]})
                for i in range(0, len(x), step)]
        return [np.concatenate([r[k] for r in runs]) for k in range(outputs)]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(self.output_names[:1], {self.input_name: x})[0])


class OvRunner:
    """OpenVINO on the CPU, as served (core.stages.OpenVinoClassifier), at an inference precision hint
    (f32 or bf16). ``threads`` 0 = one per core.

    Measurements run it in a process of its own (:func:`isolated`): OpenVINO 2026.4 loaded into a process
    that also trains, exports with torch and starts subprocesses corrupted that process's heap (seen here:
    a segfault in PyObject_Free some minutes later, only with OpenVINO loaded). The served model runs it in
    its own stub process, which does nothing else."""

    def __init__(self, model: Path | str | bytes, threads: int = 0, inference_precision: str = "f32"):
        self.classifier = OpenVinoClassifier(model, threads, inference_precision)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.classifier(x)[0])


class TorchRunner:
    """A PyTorch module in eval mode, under inference mode, in batches of ``batch_size``."""

    def __init__(self, model: Any, batch_size: int = 128, device: Any = "cpu"):
        self.model, self.batch_size, self.device = model.eval(), batch_size, device

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            outs = [self.model(torch.from_numpy(x[i:i + self.batch_size]).to(self.device)).float().cpu().numpy()
                    for i in range(0, len(x), self.batch_size)]
        return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


class TrtRunner:
    """A TensorRT plan on GPU 0: preprocessed batch (numpy) -> logits (numpy, float32).

    TensorRT 10/11 name-based I/O (set_input_shape, set_tensor_address, execute_async_v3) with torch
    CUDA tensors as device buffers, on a stream of its own: torch's legacy default stream synchronizes
    with every other stream, which adds waits and inflates the latencies measured here. Timings include
    the host<->device copies (from pinned memory).
    """

    def __init__(self, plan: Path | str, output: str = "logits"):
        """``output``: the output returned (the export's logits); every output gets a buffer, as TensorRT needs."""
        import tensorrt as trt
        import torch

        self.trt, self.torch = trt, torch
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(Path(plan).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {plan} (see the log above)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.output = output if output in self.outputs else self.outputs[0]
        self.stream = torch.cuda.Stream()

    def _dtype(self, name: str) -> Any:
        return self.trt.nptype(self.engine.get_tensor_dtype(name))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        host = torch.from_numpy(np.ascontiguousarray(x, dtype=self._dtype(self.input))).pin_memory()
        with torch.cuda.stream(self.stream):  # copies, inference and the copy back, in order on one stream
            xt = host.to("cuda", non_blocking=True)
            self.context.set_input_shape(self.input, tuple(xt.shape))
            self.context.set_tensor_address(self.input, xt.data_ptr())
            buffers = {}
            for name in self.outputs:
                dtype = getattr(torch, np.dtype(self._dtype(name)).name)
                buffers[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device="cuda")
                self.context.set_tensor_address(name, buffers[name].data_ptr())
            yt = buffers[self.output]
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"TensorRT inference failed for a batch of shape {tuple(xt.shape)}")
            out = torch.empty(yt.shape, dtype=torch.float32, pin_memory=True)
            out.copy_(yt.float(), non_blocking=True)
        self.stream.synchronize()
        return np.asarray(out.numpy())


RUNNERS: dict[str, Callable[..., Runner]] = {"onnxruntime": OrtRunner, "openvino": OvRunner, "tensorrt": TrtRunner,
                                             "pytorch": TorchRunner}


def make_runner(kind: str, model: Any, **options: Any) -> Runner:
    """A runner of ``kind`` for ``model`` (a path or bytes for ONNX Runtime, a plan for TensorRT, a module
    for PyTorch); ``options`` go to its class."""
    if kind not in RUNNERS:
        raise ValueError(f"runner must be one of {tuple(RUNNERS)}, got {kind!r}")
    return RUNNERS[kind](model, **options)


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
    build.quantize or perf.ceiling) needs the usual ``if __name__ == "__main__":`` guard, since the child
    imports the caller's main module."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args, kwargs)


def score_openvino(models: dict[str, tuple[bytes, str]], spec: dict, paths: Sequence[str], sample: np.ndarray,
                   min_time: float = 0.5) -> dict[str, dict]:
    """For each ``name: (ONNX bytes, precision hint)``: its logits over the images at ``paths`` (preprocessed
    here by ``spec``, streamed one batch at a time) and its latency on ``sample``, or the error OpenVINO
    raised compiling it. Meant to run :func:`isolated`."""
    from core.preprocess import DaliPreprocessor, PreprocessSpec

    out: dict[str, dict] = {}
    runs: dict[str, Runner] = {}
    for name, (blob, hint) in models.items():
        try:
            runs[name] = OvRunner(blob, inference_precision=hint)
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
