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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # annotations only: TensorRT is imported at run time by check_environment
    import tensorrt

from build.settings import BatchProfile, add_settings_args, repo_settings
from core.atomic_io import atomic_write_bytes

RUN_IN_CONTAINER = ("run it in the NGC TensorRT/Triton container: `make -C docker engine PRECISION=...` "
                    "(see docker/README.md), on a machine with an NVIDIA GPU and the NVIDIA container toolkit")


class EngineEnvironmentError(RuntimeError):
    """What is missing to build or load an engine here, and how to get it."""


Handle = TypeVar("Handle")


def created(handle: Handle | None, what: str) -> Handle:
    """A TensorRT object a create_* call returned, or a clear error where it returned None."""
    if handle is None:
        raise RuntimeError(f"TensorRT could not create the {what}")
    return handle


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
        raise EngineEnvironmentError(f"cannot tell the serving TensorRT version: {backend} (Triton's TensorRT "
                                     f"backend) {'links no libnvinfer' if Path(backend).is_file() else 'is missing'}; "
                                     f"{RUN_IN_CONTAINER}")
    v = int(ctypes.CDLL(str(lib)).getInferLibVersion())
    major, rest = (v // 10000, v % 10000) if v >= 100000 else (v // 1000, v % 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def import_tensorrt() -> ModuleType | None:
    """The tensorrt module, or None where it is not installed."""
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return trt


def check_environment() -> tuple[ModuleType, str, str]:
    """(tensorrt module, compute capability, GPU name), or EngineEnvironmentError saying what is missing."""
    gpu = gpu_compute_capability()
    trt = import_tensorrt()
    if gpu is None or trt is None:
        missing = [what for what, ok in (("an NVIDIA GPU (nvidia-smi found none)", gpu),
                                         ("TensorRT (import tensorrt failed)", trt)) if not ok]
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


def apply_timing_cache(config: Any, path: Path | None, note: Callable[[str], None] = print) -> Any:
    """The timing cache in ``path`` set on ``config``; TensorRT refuses one made on another GPU or TensorRT
    (``set_timing_cache`` returns False, TensorRT 10.5), and then the build starts from an empty one."""
    data = path.read_bytes() if path and path.is_file() else b""
    cache = created(config.create_timing_cache(data), "timing cache")
    if config.set_timing_cache(cache, ignore_mismatch=False):
        return cache
    note(f"note: the timing cache {path} was made on another GPU or TensorRT: building without it "
         "(this build's cache replaces it)")
    cache = created(config.create_timing_cache(b""), "timing cache")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise RuntimeError("TensorRT refused an empty timing cache")
    return cache


class EngineBuilder:
    """ONNX -> serialized TensorRT plan, with an optimization profile and a reusable timing cache."""

    def __init__(self, onnx_path: Path, profile: BatchProfile, precision: str, workspace_gib: float = 4.0,
                 timing_cache: Path | None = None, sparse_weights: bool = False):
        self.onnx_path, self.profile, self.precision = Path(onnx_path), profile, precision
        self.workspace_gib, self.timing_cache, self.sparse_weights = workspace_gib, timing_cache, sparse_weights
        self.trt: ModuleType | None = None
        self.logger: tensorrt.Logger | None = None
        self.builder: tensorrt.Builder | None = None
        self.network: tensorrt.INetworkDefinition | None = None
        self.config: tensorrt.IBuilderConfig | None = None
        self.cc = self.gpu_name = ""
        self.major, self.strongly_typed = 0, False

    def check_environment(self, server_backend: Path = SERVER_TRT_BACKEND) -> EngineBuilder:
        """GPU and TensorRT present; inside a Triton install, the bindings must be the server's TensorRT."""
        trt, self.cc, self.gpu_name = check_environment()
        self.trt = trt
        if Path(server_backend).is_file():
            served = server_tensorrt_version(server_backend)
            if release(trt.__version__) != served:
                raise EngineEnvironmentError(f"the TensorRT Python bindings are {trt.__version__} but the "
                                             f"server's TensorRT is {served}: a plan built here would not load "
                                             f"there; install tensorrt-cu12=={served} (docker/requirements-gpu.txt)")
        self.major = int(trt.__version__.split(".")[0])
        return self

    def _tensorrt(self) -> ModuleType:
        if self.trt is None:
            raise RuntimeError("EngineBuilder.check_environment() must run first: TensorRT is not loaded")
        return self.trt

    def _network(self) -> tuple[tensorrt.Builder, tensorrt.INetworkDefinition]:
        if self.builder is None or self.network is None:
            raise RuntimeError("EngineBuilder.parse() must run first: there is no TensorRT network")
        return self.builder, self.network

    def parse(self) -> EngineBuilder:
        """Parse the ONNX into a network; strongly typed on TensorRT >= 11 so precision comes from the ONNX."""
        trt = self._tensorrt()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.builder = builder = trt.Builder(self.logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if self.major >= 11 else 0
        self.strongly_typed = bool(flags)
        self.network = network = created(builder.create_network(flags), "network definition")
        parser = created(trt.OnnxParser(network, self.logger), "ONNX parser")
        if not parser.parse_from_file(str(self.onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {self.onnx_path}: {errors}")
        return self

    def configure(self) -> EngineBuilder:
        """Workspace limit, optimization profile over the batch dimension, timing cache, (TRT 10) flags."""
        trt, (builder, network) = self._tensorrt(), self._network()
        self.config = config = created(builder.create_builder_config(), "builder config")
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.workspace_gib * (1 << 30)))
        profile = created(builder.create_optimization_profile(), "optimization profile")
        for i in range(network.num_inputs):
            inp = network.get_input(i)
            rest = tuple(inp.shape)[1:]
            profile.set_shape(inp.name, (self.profile.min, *rest), (self.profile.opt, *rest), (self.profile.max, *rest))
        config.add_optimization_profile(profile)
        if not self.strongly_typed:  # TensorRT 10: precision by flags (Q/DQ nodes still define INT8 scales)
            config.set_flag(trt.BuilderFlag.FP16)
            if self.precision == "int8":
                config.set_flag(trt.BuilderFlag.INT8)
        if self.sparse_weights:  # let TensorRT pick sparse tensor-core kernels for layers whose weights are 2:4
            config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
        self._cache = apply_timing_cache(config, self.cache_path())
        return self

    def cache_path(self) -> Path | None:
        """The timing cache of this GPU and TensorRT: a cache holds kernel timings of the GPU and TensorRT that
        made it, so its file name carries both (``trt_timing.cache`` -> ``trt_timing-trt10.5.0.18-sm90.cache``)."""
        if not self.timing_cache:
            return None
        t = Path(self.timing_cache)
        return t.with_name(f"{t.stem}-trt{self._tensorrt().__version__}-sm{self.cc.replace('.', '')}{t.suffix}")

    def _config(self) -> tensorrt.IBuilderConfig:
        if self.config is None:
            raise RuntimeError("EngineBuilder.configure() must run first: there is no TensorRT builder config")
        return self.config

    def build(self, out: Path) -> PlanStamp:
        """Build and write the plan and its stamp atomically; save the timing cache for the next build."""
        trt, (builder, network), config = self._tensorrt(), self._network(), self._config()
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError(f"TensorRT failed to build an engine from {self.onnx_path} (see the log above)")
        stamp = PlanStamp(trt.__version__, self.cc, self.gpu_name, self.precision, asdict(self.profile),
                          hashlib.sha256(self.onnx_path.read_bytes()).hexdigest(), self.strongly_typed,
                          self.sparse_weights)
        atomic_write_bytes(out, lambda tmp: tmp.write_bytes(bytes(plan)))
        atomic_write_bytes(Path(f"{out}.json"), lambda tmp: tmp.write_text(json.dumps(asdict(stamp), indent=2)))
        cache_path = self.cache_path()
        if cache_path:
            cache = created(config.get_timing_cache(), "timing cache to save").serialize()
            atomic_write_bytes(cache_path, lambda tmp: tmp.write_bytes(bytes(cache)))
        return stamp


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Build a TensorRT engine from the FP16 or INT8 ONNX (GPU + TensorRT "
                                "only), or --verify that a GPU repository's plan fits this TensorRT and GPU")
    p.add_argument("--onnx", type=Path)
    p.add_argument("--precision", choices=("fp16", "int8"))
    p.add_argument("--out", type=Path, help="the .plan to write (a .plan.json stamp goes beside it)")
    p.add_argument("--repo", type=Path, default=Path("model_repository_gpu"),
                   help="the GPU repository whose batching settings (build.json) set the optimization profile")
    add_settings_args(p, only=("max_batch_size", "preferred_batch_sizes"))
    p.add_argument("--workspace-gib", type=float, default=4.0)
    p.add_argument("--sparsity", action="store_true",
                   help="SPARSE_WEIGHTS: sparse tensor-core kernels (Ampere+) for 2:4 weights "
                   "(make prune SPARSITY=2:4)")
    p.add_argument("--timing-cache", type=Path, default=Path("artifacts/trt_timing.cache"))
    p.add_argument("--verify", type=Path, metavar="REPO",
                   help="only check the plan REPO serves against the server's TensorRT and this GPU "
                   "(exit 2 with the reason)")
    p.add_argument("--server-backend", type=Path, default=SERVER_TRT_BACKEND,
                   help="Triton's TensorRT backend library, whose libnvinfer is the serving TensorRT")
    return p


def main(args: argparse.Namespace) -> int:
    try:
        if args.verify:  # against the server's TensorRT library and this GPU; Python TensorRT is not needed
            gpu = gpu_compute_capability()
            if gpu is None:
                raise EngineEnvironmentError("cannot verify a plan here: missing an NVIDIA GPU (nvidia-smi found "
                                             f"none); {RUN_IN_CONTAINER}")
            stamp = verify_repository(args.verify, server_tensorrt_version(args.server_backend), gpu[0])
            print(f"{args.verify}: plan built for TensorRT {stamp.tensorrt_version}, compute capability "
                  f"{stamp.compute_capability}: matches the server's TensorRT and this GPU")
            return 0
        missing = [f"--{a}" for a in ("onnx", "precision", "out") if getattr(args, a) is None]
        if missing:
            print(f"error: {', '.join(missing)} required to build an engine (or --verify REPO)", file=sys.stderr)
            return 2
        if not args.onnx.is_file():
            print(f"error: {args.onnx} not found: build it first with `make quantize` (FP16/INT8 ONNX)",
                  file=sys.stderr)
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
