"""TensorRT engines from the FP16 / INT8 ONNX artifacts: `make engine PRECISION=fp16|int8`.

A builder class in the style of TensorRT's Python samples, one short step per method:

    EngineBuilder(onnx, profile).check_environment().parse().configure().build(out)

Precision comes from the ONNX itself: TensorRT 11 networks are strongly typed (FP16 from AutoCast,
INT8 from explicit Q/DQ nodes); on TensorRT 10 the network is parsed the same way and the FP16/INT8
builder flags are set too. The optimization profile (min/opt/max batch) follows the repository's
batching settings. Every plan gets a stamp ``<plan>.json`` (TensorRT version, GPU compute capability,
profile, source ONNX sha256); :func:`check_plan` refuses a plan built for another TensorRT or GPU
before Triton ever tries to load it.

Needs a GPU and TensorRT, i.e. the NGC container from docker/ (``make -C docker engine``). Anywhere
else it stops at once with a message saying what is missing and how to run it.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from build.render_repo import add_settings_args, repo_settings
from core.atomic_io import atomic_write_bytes

RUN_IN_CONTAINER = ("run it in the NGC TensorRT/Triton container: `make -C docker engine PRECISION=...` "
                    "(see docker/README.md), on a machine with an NVIDIA GPU and the NVIDIA container toolkit")


class EngineEnvironmentError(RuntimeError):
    """What is missing to build or load an engine here, and how to get it."""


@dataclass(frozen=True)
class BatchProfile:
    min: int = 1
    opt: int = 16
    max: int = 32

    @classmethod
    def from_repo_settings(cls, max_batch_size: int, preferred: tuple[int, ...] = ()) -> BatchProfile:
        """opt = the largest preferred batch size (what the dynamic batcher aims for), else half the max."""
        opt = max(preferred) if preferred else max(1, max_batch_size // 2)
        return cls(1, min(opt, max_batch_size), max_batch_size)


@dataclass(frozen=True)
class PlanStamp:
    tensorrt_version: str
    compute_capability: str   # "9.0" for H100
    gpu_name: str
    precision: str
    profile: dict
    onnx_sha256: str
    strongly_typed: bool
    sparse_weights: bool = False  # built with SPARSE_WEIGHTS (2:4 weights from `make prune SPARSITY=2:4`)


def gpu_compute_capability() -> tuple[str, str] | None:
    """(compute capability, GPU name) of GPU 0 from nvidia-smi, or None without a GPU."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=compute_cap,name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    line = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    if not line:
        return None
    cc, name = (x.strip() for x in line.split(",", 1))
    return cc, name


# The server's TensorRT backend; the TensorRT library it links is the one that must load our plans
SERVER_TRT_BACKEND = Path("/opt/tritonserver/backends/tensorrt/libtriton_tensorrt.so")


def release(version: str) -> str:
    """major.minor.patch of a TensorRT version ('10.5.0.18' -> '10.5.0'): what a plan is tied to."""
    return ".".join(version.split(".")[:3])


def linked_library(binary: Path, soname_prefix: str) -> Path | None:
    """The file the dynamic loader resolves for the library ``binary`` links whose name starts with
    ``soname_prefix`` (from ldd), or None."""
    try:
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        name, _, rest = line.strip().partition(" => ")
        path = rest.split(" (")[0].strip()
        if name.startswith(soname_prefix) and path and path != "not found":
            return Path(path)
    return None


def server_tensorrt_version(backend: Path = SERVER_TRT_BACKEND) -> str:
    """The TensorRT version of the library the server's TensorRT backend loads, from the library itself
    (getInferLibVersion: major*10000 + minor*100 + patch since TensorRT 10, major*1000 + ... before).
    The pip bindings may be another version than the server's library; only the server's counts."""
    lib = linked_library(Path(backend), "libnvinfer.so") if Path(backend).is_file() else None
    if lib is None:
        raise EngineEnvironmentError(f"cannot tell the serving TensorRT version: {backend} (Triton's TensorRT backend) "
                                     f"{'links no libnvinfer' if Path(backend).is_file() else 'is missing'}; "
                                     f"{RUN_IN_CONTAINER}")
    v = int(ctypes.CDLL(str(lib)).getInferLibVersion())
    major, rest = (v // 10000, v % 10000) if v >= 100000 else (v // 1000, v % 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def check_environment() -> tuple[object, str, str]:
    """(tensorrt module, compute capability, GPU name), or EngineEnvironmentError saying what is missing."""
    gpu = gpu_compute_capability()
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError:
        trt = None
    missing = [what for what, ok in (("an NVIDIA GPU (nvidia-smi found none)", gpu), ("TensorRT (import tensorrt failed)", trt)) if not ok]
    if missing:
        raise EngineEnvironmentError(f"cannot build a TensorRT engine here: missing {' and '.join(missing)}. "
                                     f"TensorRT is not installable from PyPI on this machine; {RUN_IN_CONTAINER}.")
    return trt, gpu[0], gpu[1]


def check_plan(stamp_path: Path, tensorrt_version: str, compute_capability: str) -> PlanStamp:
    """Refuse a plan built for another TensorRT version or GPU architecture, with the reason."""
    stamp_path = Path(stamp_path)
    if not stamp_path.is_file():
        raise EngineEnvironmentError(f"{stamp_path} is missing: the plan's build stamp is needed to know what it was "
                                     "built for; rebuild it with `make engine`")
    stamp = PlanStamp(**json.loads(stamp_path.read_text()))
    problems = []
    if release(stamp.tensorrt_version) != release(tensorrt_version):
        problems.append(f"built with TensorRT {stamp.tensorrt_version}, this runtime is TensorRT {tensorrt_version}")
    if stamp.compute_capability != compute_capability:
        problems.append(f"built for compute capability {stamp.compute_capability} ({stamp.gpu_name}), "
                        f"this GPU is {compute_capability}")
    if problems:
        raise EngineEnvironmentError(f"refusing {stamp_path.with_suffix('')}: " + "; ".join(problems) +
                                     ". A TensorRT plan only loads on the TensorRT version and GPU it was built for: "
                                     "rebuild it with `make engine` on the serving machine's container.")
    return stamp


def verify_repository(repo: Path, tensorrt_version: str, compute_capability: str) -> PlanStamp:
    """check_plan for the plan a GPU repository serves (run before tritonserver starts, e.g. in compose)."""
    from core.protocol import CLASSIFIER

    plan = Path(repo) / CLASSIFIER / "1" / "model.plan"
    if not plan.is_file():
        raise EngineEnvironmentError(f"{plan} is missing: build it with `make engine` and render with "
                                     "`make repo TARGET=gpu PLAN=...`")
    return check_plan(Path(f"{plan}.json"), tensorrt_version, compute_capability)


class TrtRunner:
    """A plan on GPU 0 as a function: preprocessed batch (numpy) -> logits (numpy, float32).

    TensorRT 10/11 name-based I/O (set_input_shape, set_tensor_address, execute_async_v3) with torch
    CUDA tensors as device buffers, on a stream of its own: torch's legacy default stream synchronizes
    with every other stream, which adds waits and inflates the latencies measured here. Timings include
    the host<->device copies (from pinned memory).
    """

    def __init__(self, plan: Path, output: str = "logits"):
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

    def _dtype(self, name: str):
        return self.trt.nptype(self.engine.get_tensor_dtype(name))

    def __call__(self, x):
        import numpy as np

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
        return out.numpy()


class EngineBuilder:
    """ONNX -> serialized TensorRT plan, with an optimization profile and a reusable timing cache."""

    def __init__(self, onnx_path: Path, profile: BatchProfile, precision: str, workspace_gib: float = 4.0,
                 timing_cache: Path | None = None, sparse_weights: bool = False):
        self.onnx_path, self.profile, self.precision = Path(onnx_path), profile, precision
        self.workspace_gib, self.timing_cache, self.sparse_weights = workspace_gib, timing_cache, sparse_weights
        self.trt = self.logger = self.builder = self.network = self.config = None

    def check_environment(self, server_backend: Path = SERVER_TRT_BACKEND) -> EngineBuilder:
        """GPU and TensorRT present; inside a Triton install, the bindings must be the server's TensorRT."""
        self.trt, self.cc, self.gpu_name = check_environment()
        if Path(server_backend).is_file():
            served = server_tensorrt_version(server_backend)
            if release(self.trt.__version__) != served:
                raise EngineEnvironmentError(f"the TensorRT Python bindings are {self.trt.__version__} but the server's "
                                             f"TensorRT is {served}: a plan built here would not load there; install "
                                             f"tensorrt-cu12=={served} (docker/requirements-gpu.txt)")
        self.major = int(self.trt.__version__.split(".")[0])
        return self

    def parse(self) -> EngineBuilder:
        """Parse the ONNX into a network; strongly typed on TensorRT >= 11 so precision comes from the ONNX."""
        trt = self.trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.builder = trt.Builder(self.logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if self.major >= 11 else 0
        self.strongly_typed = bool(flags)
        self.network = self.builder.create_network(flags)
        parser = trt.OnnxParser(self.network, self.logger)
        if not parser.parse_from_file(str(self.onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {self.onnx_path}: {errors}")
        return self

    def configure(self) -> EngineBuilder:
        """Workspace limit, optimization profile over the batch dimension, timing cache, (TRT 10) flags."""
        trt = self.trt
        self.config = self.builder.create_builder_config()
        self.config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.workspace_gib * (1 << 30)))
        profile = self.builder.create_optimization_profile()
        for i in range(self.network.num_inputs):
            inp = self.network.get_input(i)
            rest = tuple(inp.shape)[1:]
            profile.set_shape(inp.name, (self.profile.min, *rest), (self.profile.opt, *rest), (self.profile.max, *rest))
        self.config.add_optimization_profile(profile)
        if not self.strongly_typed:  # TensorRT 10: precision by flags (Q/DQ nodes still define INT8 scales)
            self.config.set_flag(trt.BuilderFlag.FP16)
            if self.precision == "int8":
                self.config.set_flag(trt.BuilderFlag.INT8)
        if self.sparse_weights:  # let TensorRT pick sparse tensor-core kernels for layers whose weights are 2:4
            self.config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
        cache_bytes = self.timing_cache.read_bytes() if self.timing_cache and self.timing_cache.exists() else b""
        self._cache = self.config.create_timing_cache(cache_bytes)
        self.config.set_timing_cache(self._cache, ignore_mismatch=False)
        return self

    def build(self, out: Path) -> PlanStamp:
        """Build and write the plan and its stamp atomically; save the timing cache for the next build."""
        plan = self.builder.build_serialized_network(self.network, self.config)
        if plan is None:
            raise RuntimeError(f"TensorRT failed to build an engine from {self.onnx_path} (see the log above)")
        stamp = PlanStamp(self.trt.__version__, self.cc, self.gpu_name, self.precision, asdict(self.profile),
                          hashlib.sha256(self.onnx_path.read_bytes()).hexdigest(), self.strongly_typed,
                          self.sparse_weights)
        atomic_write_bytes(out, lambda tmp: tmp.write_bytes(bytes(plan)))
        atomic_write_bytes(Path(f"{out}.json"), lambda tmp: tmp.write_text(json.dumps(asdict(stamp), indent=2)))
        if self.timing_cache:
            cache = self.config.get_timing_cache().serialize()
            atomic_write_bytes(self.timing_cache, lambda tmp: tmp.write_bytes(bytes(cache)))
        return stamp


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Build a TensorRT engine from the FP16 or INT8 ONNX (GPU + TensorRT only), "
                                "or --verify that a GPU repository's plan fits this TensorRT and GPU")
    p.add_argument("--onnx", type=Path)
    p.add_argument("--precision", choices=("fp16", "int8"))
    p.add_argument("--out", type=Path, help="the .plan to write (a .plan.json stamp goes beside it)")
    p.add_argument("--repo", type=Path, default=Path("model_repository_gpu"),
                   help="the GPU repository whose batching settings (build.json) set the optimization profile")
    add_settings_args(p, only=("max_batch_size", "preferred_batch_sizes"))
    p.add_argument("--workspace-gib", type=float, default=4.0)
    p.add_argument("--sparsity", action="store_true",
                   help="SPARSE_WEIGHTS: sparse tensor-core kernels (Ampere+) for 2:4 weights (make prune SPARSITY=2:4)")
    p.add_argument("--timing-cache", type=Path, default=Path("artifacts/trt_timing.cache"))
    p.add_argument("--verify", type=Path, metavar="REPO",
                   help="only check the plan REPO serves against the server's TensorRT and this GPU (exit 2 with the reason)")
    p.add_argument("--server-backend", type=Path, default=SERVER_TRT_BACKEND,
                   help="Triton's TensorRT backend library, whose libnvinfer is the serving TensorRT")
    return p


def main(args: argparse.Namespace) -> int:
    try:
        if args.verify:  # against the server's TensorRT library and this GPU; Python TensorRT is not needed
            gpu = gpu_compute_capability()
            if gpu is None:
                raise EngineEnvironmentError(f"cannot verify a plan here: missing an NVIDIA GPU (nvidia-smi found none); "
                                             f"{RUN_IN_CONTAINER}")
            stamp = verify_repository(args.verify, server_tensorrt_version(args.server_backend), gpu[0])
            print(f"{args.verify}: plan built for TensorRT {stamp.tensorrt_version}, compute capability "
                  f"{stamp.compute_capability}: matches the server's TensorRT and this GPU")
            return 0
        missing = [f"--{a}" for a in ("onnx", "precision", "out") if getattr(args, a) is None]
        if missing:
            print(f"error: {', '.join(missing)} required to build an engine (or --verify REPO)", file=sys.stderr)
            return 2
        if not args.onnx.is_file():
            print(f"error: {args.onnx} not found: build it first with `make quantize` (FP16/INT8 ONNX)", file=sys.stderr)
            return 2
        settings = repo_settings(args, args.repo)
        profile = BatchProfile.from_repo_settings(settings.max_batch_size, settings.preferred_batch_sizes)
        builder = EngineBuilder(args.onnx, profile, args.precision, args.workspace_gib, args.timing_cache,
                                args.sparsity)
        stamp = builder.check_environment().parse().configure().build(args.out)
    except EngineEnvironmentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"built {args.out} ({stamp.precision}, TensorRT {stamp.tensorrt_version}, compute capability "
          f"{stamp.compute_capability}, batch {profile.min}/{profile.opt}/{profile.max})")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
