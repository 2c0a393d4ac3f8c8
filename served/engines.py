"""The inference engines, as one registry: one record per engine says what it is, what it serves and how it runs.

    engine = get("openvino")
    classify = engine.classifier("model.onnx", 1, "bf16")        # what the served model runs (served.stages)
    run = engine.measuring("model.onnx", "bf16", threads=0)     # what every measurement runs (core.runners)

A record (:class:`Engine`) carries the engine's name (the ``engine`` parameter of a rendered config, build.json's
``engine``, the ENGINE of the CLIs), the target it serves, the artifact-file precisions it serves and the
precision hints it computes at (from which build.artifacts derives the CPU target's candidates), the factory
of its served classifier (the embedded target's engines run in Triton's Python backend), the factory of its
scoring runner, and whether measurements must run it in a process of its own. Adding an engine is one
:func:`register` call; every CLI's ENGINE choices, make quantize's candidates, scoring and timing, ``make
repo``'s choice, the served classifier and the in-process ceiling read it from here. TensorRT (the GPU
target's engine, served by Triton's own backend) and PyTorch (a reference runner, never served) are records
too.

The precisions and targets are one typed vocabulary (:class:`Precision`, :class:`InferencePrecision`,
:class:`Target`, :class:`EngineName`): string enums, equal to the strings they replace and written as them
(JSON, configs, messages), so build reports and rendered repositories stay as they were.

This module is served: ``make repo`` copies it with the served package into every Python-backend model, whose
served.stages imports it. It therefore imports nothing of the project, only NumPy at
import time (ONNX Runtime, OpenVINO, TensorRT, torch inside the factories that use them), and runs on the
GPU container's Python 3.10.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

if sys.version_info >= (3, 11):  # noqa: UP036 (the GPU container's served Python is 3.10)
    from enum import StrEnum
else:  # the GPU container's Python 3.10 (docker/base-image.json)
    class StrEnum(str, Enum):  # noqa: UP042 (enum.StrEnum is 3.11's)
        """enum.StrEnum of Python 3.11: members are their values, also in str() and format()."""

        def __str__(self) -> str:
            return str(self.value)

        def __format__(self, spec: str) -> str:
            return str(self.value).__format__(spec)


# ----------------------------------------------------------------------------------------------------------
# the vocabulary
# ----------------------------------------------------------------------------------------------------------

class Precision(StrEnum):
    """A precision the model is served at (PRECISION): an artifact file's own, or an engine's hint's."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"


class InferencePrecision(StrEnum):
    """An engine's precision hint: f32 computes as the file says; bf16 lowers an FP32 file's arithmetic."""

    F32 = "f32"
    BF16 = "bf16"


class Target(StrEnum):
    """Where the repository serves: the CPU (Python-backend models) or the GPU (TensorRT)."""

    EMBEDDED = "embedded"
    GPU = "gpu"


class EngineName(StrEnum):
    """The registered engines' names."""

    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"
    TENSORRT = "tensorrt"
    PYTORCH = "pytorch"


Array = NDArray[Any]
Runner = Callable[[Array], Array]  # a batch of preprocessed images -> logits
Classifier = Callable[..., list[Array]]  # (batch, outputs=1) -> the first ``outputs`` ONNX outputs

# OpenVINO's CPU precision hints: f32 computes as ONNX Runtime does; bf16 runs on AMX / AVX-512 BF16 units
# (where the CPU has none, OpenVINO computes in f32 instead). OpenVINO's own default on such a CPU is bf16,
# so the hint is always set: the accuracy gate scores exactly what serves.
INFERENCE_PRECISIONS = tuple(str(p) for p in InferencePrecision)


def fixed_batch(dim: Any) -> int | None:
    """The batch a graph's input is fixed at (its first dimension, where that is a number), None if it varies."""
    return dim if isinstance(dim, int) and dim > 0 else None


def in_fixed_batches(run: Callable[[Array], list[Array]], batch: Array, size: int | None) -> list[Array]:
    """``run``'s outputs for ``batch``, where the graph's batch is fixed at ``size`` (None: it varies, one call):
    one call per ``size`` images, the last call filled up with copies of its last image, whose rows are dropped.
    A model imported with its batch fixed inside (build.import_onnx) runs so: one image per call at batch 1."""
    if size is None or len(batch) in (0, size):
        return run(batch)
    parts = []
    for i in range(0, len(batch), size):
        chunk = batch[i:i + size]
        filled = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), axis=0)])
        parts.append([out[:len(chunk)] for out in run(filled)])
    return [np.concatenate(outs) for outs in zip(*parts, strict=True)]


def fixed_batch_cost(size: int) -> str:
    """What serving a graph whose batch is fixed at ``size`` costs, as `make import` and `make repo` say it."""
    calls = "one image per inference call" if size == 1 else f"{size} images per inference call (filled up)"
    return (f"served without batching: the classifier runs {calls}, so its throughput is that of batch {size} "
            "whatever the batch Triton forms (Triton still batches the requests and the preprocessing)")


# ----------------------------------------------------------------------------------------------------------
# ONNX Runtime
# ----------------------------------------------------------------------------------------------------------

def ort_session(model: Path | str | bytes, intra_op_threads: int = 1, allow_spinning: bool = False) -> Any:
    """An ONNX Runtime CPU session with the serving options: what the served classifier, the peers and every
    measurement (runners) create.

    ``intra_op_threads`` 0 = ORT's default, one per core. ORT's idle intra-op threads spin-wait by default:
    on a shared CPU that burns the cores the preprocessing and the server need (measured here: 1.14 cores
    spinning, 0.45 doing the work), so spinning is off unless asked for."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


class OnnxClassifier:
    """A batch in, the ONNX outputs in order out (logits, then the export's softmax probabilities where it
    has them), on ONNX Runtime."""

    def __init__(self, path: Path | str | bytes, intra_op_threads: int = 1):
        self.session = ort_session(path, intra_op_threads)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.fixed_batch = fixed_batch(self.session.get_inputs()[0].shape[0])

    def __call__(self, batch: Array, outputs: int = 1) -> list[Array]:
        """The first ``outputs`` ONNX outputs for ``batch``."""
        return in_fixed_batches(lambda b: list(self.session.run(self.output_names[:outputs], {self.input_name: b})),
                                batch, self.fixed_batch)


def onnxruntime_classifier(path: Path | str | bytes, threads: int = 1,
                           inference_precision: str = InferencePrecision.F32) -> OnnxClassifier:
    """The served ONNX Runtime classifier: one precision, the file's own."""
    if inference_precision != InferencePrecision.F32:
        raise ValueError(f"ONNX Runtime computes in the ONNX file's own precision, not {inference_precision}")
    return OnnxClassifier(path, threads)


class OrtRunner:
    """ONNX Runtime on the CPU. ``threads`` 0 = one per core (measurements); the served classifier runs
    its configured count. ``outputs``: run() returns that many outputs (logits, then probabilities)."""

    def __init__(self, model: Path | str | bytes, threads: int = 0, allow_spinning: bool = False):
        self.session = ort_session(model, threads, allow_spinning)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.fixed_batch = fixed_batch(self.session.get_inputs()[0].shape[0])

    def _run(self, x: Array, outputs: int) -> list[Array]:
        return in_fixed_batches(lambda b: list(self.session.run(self.output_names[:outputs], {self.input_name: b})),
                                x, self.fixed_batch)

    def run(self, x: Array, outputs: int = 1, batch_size: int | None = None) -> list[Array]:
        """The first ``outputs`` outputs, in batches of ``batch_size`` (None: all at once)."""
        step = batch_size or max(1, len(x))
        runs = [self._run(x[i:i + step], outputs) for i in range(0, len(x), step)]
        return [np.concatenate([r[k] for r in runs]) for k in range(outputs)]

    def __call__(self, x: Array) -> Array:
        return np.asarray(self._run(x, 1)[0])


# ----------------------------------------------------------------------------------------------------------
# OpenVINO
# ----------------------------------------------------------------------------------------------------------

def ov_compiled(model: Path | str | bytes, threads: int = 1, inference_precision: str = InferencePrecision.F32
                ) -> Any:
    """An OpenVINO CPU compiled model with the serving options: what the served classifier and every
    measurement (runners) create. ``threads`` 0 = OpenVINO's default, one per core.

    One stream (a Triton instance is one execution at a time; instances scale out) and no core pinning:
    the instances are separate processes, and pinned each would pin its threads to the same first cores."""
    import openvino as ov

    if inference_precision not in INFERENCE_PRECISIONS:
        raise ValueError(f"OpenVINO inference precision must be one of {INFERENCE_PRECISIONS}, "
                         f"got {inference_precision!r}")
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": str(inference_precision), "PERFORMANCE_HINT": "LATENCY",
                              "NUM_STREAMS": "1", "ENABLE_CPU_PINNING": False}
    if threads > 0:
        config["INFERENCE_NUM_THREADS"] = threads
    core = ov.Core()
    source = model if isinstance(model, bytes) else str(model)  # ONNX read directly, bytes or a path
    return core.compile_model(core.read_model(source), "CPU", config)


class OpenVinoClassifier:
    """The same as :class:`OnnxClassifier`, on OpenVINO's CPU plugin (the ONNX file read as it is)."""

    def __init__(self, path: Path | str | bytes, intra_op_threads: int = 1,
                 inference_precision: str = InferencePrecision.F32):
        self.compiled = ov_compiled(path, intra_op_threads, inference_precision)
        self.request = self.compiled.create_infer_request()
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]
        first = self.compiled.inputs[0].get_partial_shape()[0]
        self.fixed_batch = fixed_batch(first.get_length()) if first.is_static else None

    def _infer(self, batch: Array, outputs: int) -> list[Array]:
        self.request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
        # the request's output buffers are reused by the next call: copied out
        return [np.array(self.request.get_output_tensor(i).data) for i in range(outputs)]

    def __call__(self, batch: Array, outputs: int = 1) -> list[Array]:
        return in_fixed_batches(lambda b: self._infer(b, outputs), batch, self.fixed_batch)


class OvRunner:
    """OpenVINO on the CPU, as served (:class:`OpenVinoClassifier`), at an inference precision hint
    (f32 or bf16). ``threads`` 0 = one per core.

    Measurements run it in a process of its own (its record's ``isolated``; core.runners.isolated): OpenVINO
    2026.4 loaded into a process that also trains, exports with torch and starts subprocesses corrupted that
    process's heap (seen here: a segfault in PyObject_Free some minutes later, only with OpenVINO loaded).
    The served model runs it in its own stub process, which does nothing else."""

    def __init__(self, model: Path | str | bytes, threads: int = 0,
                 inference_precision: str = InferencePrecision.F32):
        self.classifier = OpenVinoClassifier(model, threads, inference_precision)

    def __call__(self, x: Array) -> Array:
        return np.asarray(self.classifier(x)[0])


# ----------------------------------------------------------------------------------------------------------
# PyTorch and TensorRT: measurements only (the GPU target's TensorRT is served by Triton's own backend)
# ----------------------------------------------------------------------------------------------------------

class TorchRunner:
    """A PyTorch module in eval mode, under inference mode, in batches of ``batch_size``."""

    def __init__(self, model: Any, batch_size: int = 128, device: Any = "cpu"):
        self.model, self.batch_size, self.device = model.eval(), batch_size, device

    def __call__(self, x: Array) -> Array:
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
        cuda: Any = torch.cuda
        self.stream = cuda.Stream()

    def _dtype(self, name: str) -> Any:
        return self.trt.nptype(self.engine.get_tensor_dtype(name))

    def __call__(self, x: Array) -> Array:
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


# ----------------------------------------------------------------------------------------------------------
# the registry
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Engine:
    """One engine: what it is called, what it serves, and how it runs served and measured."""

    name: str  # the config parameter, build.json's engine, ENGINE on the command line
    title: str  # its name in messages
    runner: Callable[..., Runner]  # its scoring runner: (model, **options) -> batch -> logits (core.runners)
    target: Target | None = None  # the target that serves it (None: a reference runner, never served)
    # its served classifier: (ONNX path or bytes, threads, inference precision) -> (batch, outputs) -> outputs;
    # every engine of the embedded target has one (it runs in Triton's Python backend, served.stages)
    classifier: Callable[..., Classifier] | None = None
    file_precisions: tuple[Precision, ...] = ()  # the artifact files' precisions it serves, as the file computes
    # the precision hints it computes at: f32 as the file says; another hint lowers the FP32 file's arithmetic
    inference_precisions: tuple[InferencePrecision, ...] = (InferencePrecision.F32,)
    isolated: bool = False  # measurements run it in a process of its own (core.runners.isolated)
    default: bool = False  # its target's default engine: served unless another is measured clearly faster
    # options of its fastest in-process runner (the ceiling, perf/reference/ceiling.py), not the served setting
    fastest_options: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.target == Target.EMBEDDED and self.classifier is None:
            raise ValueError(f"{self.name}: an engine of the embedded target needs its served classifier")

    @property
    def takes_hint(self) -> bool:
        """Whether it is given a precision hint (OpenVINO); otherwise it computes in the file's own (ONNX Runtime)."""
        return tuple(self.inference_precisions) != (InferencePrecision.F32,)

    def measuring(self, model: Any, inference_precision: str = InferencePrecision.F32, **options: Any) -> Runner:
        """Its scoring runner for ``model`` at ``inference_precision`` (given to an engine that takes a hint)."""
        hint = {"inference_precision": inference_precision} if self.takes_hint else {}
        return self.runner(model, **hint, **options)


REGISTRY: dict[str, Engine] = {}


def register(engine: Engine) -> Engine:
    """Add ``engine`` (its name must be new) and return it."""
    if engine.name in REGISTRY:
        raise ValueError(f"an engine named {str(engine.name)!r} is registered already")
    REGISTRY[str(engine.name)] = engine
    return engine


def engines(target: Target | str | None = None) -> tuple[Engine, ...]:
    """The registered engines, in registration order; those of ``target`` only, when given."""
    return tuple(e for e in REGISTRY.values() if target is None or e.target == target)


def names(target: Target | str | None = None) -> tuple[str, ...]:
    """The registered engines' names (plain strings: CLI choices and messages), of ``target`` when given."""
    return tuple(str(e.name) for e in engines(target))


def get(name: str, target: Target | str | None = None, what: str = "engine") -> Engine:
    """The engine called ``name`` (of ``target``, when given); a ValueError naming the registered ones if none."""
    found = next((e for e in engines(target) if e.name == name), None)
    if found is None:
        raise ValueError(f"{what} must be one of {names(target)}, got {name!r}")
    return found


def default_for(target: Target | str) -> Engine:
    """The default engine of ``target`` (ONNX Runtime on the CPU, TensorRT on the GPU)."""
    return next(e for e in engines(target) if e.default)


def with_hint(hint: str, among: Iterable[Engine] | None = None) -> Engine | None:
    """The first engine (of ``among``, default the embedded target's) that computes at the precision hint ``hint``."""
    return next((e for e in (engines(Target.EMBEDDED) if among is None else among)
                 if hint in e.inference_precisions), None)


FILE_PRECISIONS = (Precision.FP32, Precision.FP16, Precision.INT8)  # the precisions an artifact file has

register(Engine(EngineName.ONNXRUNTIME, "ONNX Runtime", OrtRunner, Target.EMBEDDED, onnxruntime_classifier,
                file_precisions=FILE_PRECISIONS, default=True, fastest_options={"allow_spinning": True}))
# OpenVINO is not given the FP16 file: its CPU plugin has no FP16 arithmetic on this CPU family (it would
# compute it in f32 or bf16), so it adds nothing to the bf16 hint.
register(Engine(EngineName.OPENVINO, "OpenVINO", OvRunner, Target.EMBEDDED, OpenVinoClassifier,
                file_precisions=(Precision.FP32, Precision.INT8),
                inference_precisions=(InferencePrecision.F32, InferencePrecision.BF16), isolated=True))
register(Engine(EngineName.TENSORRT, "TensorRT", TrtRunner, Target.GPU, file_precisions=FILE_PRECISIONS,
                default=True))
register(Engine(EngineName.PYTORCH, "PyTorch", TorchRunner))
