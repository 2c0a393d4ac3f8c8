"""Drive the real perf_analyzer binary with real JPEG payloads.

Each point of a sweep (one concurrency or one request rate, over HTTP or gRPC) is a separate
perf_analyzer run whose CSV is kept, and Triton's statistics are read before and after it, so every
point carries the server-side breakdown (queue, compute input/infer/output, average batch) of every
composing model of the ensemble, plus CPU and memory of the server process tree.

    python -m perf.load.perf_analyzer --url localhost:8000 --concurrency 1 4 16 --images data/synthetic/val   # HTTP
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from build.render_repo import render
from build.settings import RepoSettings, read_manifest
from core import protocol as P
from perf.load.bodies import sample_images
from perf.load.deployment import Deployment
from perf.load.stats import UsageMeter, metrics_summary, model_stats, scrape_metrics, stats_delta
from serve import die_with_parent
from serve.server import TritonServer


def perf_analyzer_binary() -> Path:
    """The perf_analyzer that tritonclient[all]==2.51.0 installs next to this Python."""
    exe = Path(sys.executable).parent / "perf_analyzer"
    if not exe.exists():
        found = shutil.which("perf_analyzer")
        if not found:
            raise FileNotFoundError("perf_analyzer not found: it ships with tritonclient[all]==2.51.0 "
                                    "(run `make venv`)")
        exe = Path(found)
    return exe


def perf_analyzer_env() -> dict[str, str]:
    """perf_analyzer links libcudart.so.12 even without a GPU: take it from nvidia-cuda-runtime-cu12."""
    import nvidia.cuda_runtime

    lib = Path(list(nvidia.cuda_runtime.__path__)[0]) / "lib"
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(lib), env.get("LD_LIBRARY_PATH")]))
    return env


# A request-rate point is open-loop: requests leave on schedule whether or not earlier ones have returned.
# perf_analyzer's default there is synchronous with 4 threads, i.e. at most 4 requests in flight: at ~5 ms a
# request that caps the offered rate near 800/s whatever the server could do (measured: 1,167 and 1,556
# offered, 782 achieved, p99 lower than below it). Asynchronous workers keep any number in flight.
OPEN_LOOP = ("--async", "--max-threads", "8")
BEHIND = "not able to keep up with the desired load"  # perf_analyzer's warning when it falls behind the schedule
QUEUE_FULL = "Exceeds maximum queue size"  # Triton's refusal when a model's queue policy limit is reached
# A rate point is short of what it offered below this fraction of it
SHORT = 0.95


def rate_limits(points: list[dict]) -> list[str]:
    """Per request-rate point (in offered order): what limited it. "offered": it got the rate it was offered;
    "server": it fell short and latency rose (the server saturated); "generator": it fell short while latency
    stayed at the unloaded level or perf_analyzer said it fell behind, so the load generator, not the server,
    set the figure: such a point is kept out of every headline."""
    rates = [p for p in points if p["mode"] == "request_rate"]
    if not rates:
        return []
    floor = min(float(p["client"]["p99 latency"]) for p in rates)  # the least loaded point's p99
    limits = []
    for p in rates:
        achieved, p99 = float(p["client"]["Inferences/Second"]), float(p["client"]["p99 latency"])
        if achieved >= SHORT * p["value"]:
            limits.append("offered")
        elif p.get("generator_behind") or p99 < 2 * floor:
            limits.append("generator")
        else:
            limits.append("server")
    return limits


def write_input_data(blobs: list[bytes], path: Path) -> Path:
    """perf_analyzer --input-data JSON: one entry per JPEG, bytes as base64, shape = byte length."""
    data = {"data": [{P.IMAGE: {"b64": base64.b64encode(b).decode(), "shape": [len(b)]}} for b in blobs]}
    path.write_text(json.dumps(data))
    return path


@dataclass
class PerfPoint:
    protocol: str
    mode: str                # "concurrency" or "request_rate"
    value: float
    client: dict             # perf_analyzer's CSV row (throughput, latency percentiles in µs, ...)
    server: dict             # per composing model: stats_delta()
    usage: dict              # server process tree: cores busy, memory
    metrics: dict            # from Triton's Prometheus endpoint over the run: per model and CPU/memory
    generator_behind: bool = False  # perf_analyzer said it could not keep up with the rate asked of it

    @property
    def throughput(self) -> float:
        return float(self.client["Inferences/Second"])

    def latency_ms(self, pct: int) -> float:
        return float(self.client[f"p{pct} latency"]) / 1000.0

    def to_dict(self) -> dict:
        return {"protocol": self.protocol, "mode": self.mode, "value": self.value, "client": self.client,
                "server": self.server, "usage": self.usage, "metrics": self.metrics,
                "generator_behind": self.generator_behind}


def run_point(url: str, http_url: str | None, protocol: str, mode: str, value: float, input_json: Path,
              out_dir: Path, server_pid: int | None = None, interval_ms: int = 2000, model: str = P.ENSEMBLE,
              timeout_s: float = 300, metrics_url: str | None = None, request_count: int = 0,
              deployment: Deployment | None = None) -> PerfPoint:
    """One perf_analyzer measurement; raises RuntimeError with perf_analyzer's own output on failure.
    ``request_count`` > 0: exactly that many requests, no stabilization (a smoke test on a busy machine
    cannot fail to stabilize). ``deployment``: a server this run did not start (``url`` is its own): its keys
    and TLS go to perf_analyzer, its statistics are read over its protocol (``http_url`` unused), and the keys
    are in no log or error."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{protocol}_{mode}_{value:g}"
    csv_path = out_dir / f"perf_analyzer_{tag}.csv"
    rng = f"{int(value)}:{int(value)}" if mode == "concurrency" else f"{value:g}:{value:g}"
    cmd = [str(perf_analyzer_binary()), "-m", model, "-u", url, "-i", protocol, "--input-data", str(input_json),
           f"--{mode.replace('_', '-')}-range", rng, *(OPEN_LOOP if mode == "request_rate" else ()),
           "--measurement-interval", str(interval_ms),
           "--max-trials", "5", "--stability-percentage", "50", "-f", str(csv_path), "--verbose-csv",
           *(["--request-count", str(request_count)] if request_count else []),
           *(deployment.perf_analyzer_args() if deployment else [])]
    if deployment is not None:
        stats: Callable[[], dict[str, dict]] = deployment.statistics
    elif http_url is not None:
        stats = partial(model_stats, http_url)
    else:
        raise ValueError("run_point needs http_url (the statistics API) or a deployment")
    shown = deployment.redact if deployment else str
    before = stats()
    m_before = scrape_metrics(metrics_url) if metrics_url else {}
    meter = UsageMeter(server_pid).start() if server_pid else None
    # it dies with us, however we die (a killed make); a timeout or Ctrl-C kills it (subprocess.run)
    r = subprocess.run([*die_with_parent(), *cmd], env=perf_analyzer_env(), capture_output=True, text=True,
                       timeout=timeout_s)
    usage = meter.stop() if meter else {}
    (out_dir / f"perf_analyzer_{tag}.log").write_text(shown("$ " + " ".join(cmd) + "\n" + r.stdout + r.stderr))
    if r.returncode != 0 or not csv_path.exists():
        raise RuntimeError(shown(f"perf_analyzer failed ({' '.join(cmd)}):\n{(r.stdout + r.stderr)[-2000:]}"))
    with open(csv_path) as f:
        row = next(csv.DictReader(f))
    server = stats_delta(before, stats())
    metrics = metrics_summary(m_before, scrape_metrics(metrics_url)) if metrics_url else {}
    return PerfPoint(protocol, mode, value, row, server, usage, metrics, BEHIND in r.stdout + r.stderr)


def write_tensor_input_data(name: str, batch: np.ndarray, path: Path) -> Path:
    """perf_analyzer --input-data JSON of pre-decoded inputs: one FP32 tensor per image, with its shape."""
    data = {"data": [{name: {"content": x.ravel().tolist(), "shape": list(x.shape)}} for x in batch]}
    path.write_text(json.dumps(data))
    return path


Sources = tuple[tuple[str, str, Path], ...]  # (source, model to call, perf_analyzer --input-data file)


def jpeg_and_tensor_inputs(classifier_input: str, blobs: list[bytes], pixels: np.ndarray, out_dir: Path) -> Sources:
    """perf_analyzer input files for :func:`jpegs_and_tensors`, written once for any number of servers: the
    JPEG bytes for the ensemble and ``pixels`` (the preprocessed ``blobs``) for the classifier alone."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return (("jpeg", P.ENSEMBLE, write_input_data(blobs, out_dir / "input_jpeg.json")),
            ("tensors", P.CLASSIFIER,
             write_tensor_input_data(classifier_input, pixels, out_dir / "input_tensors.json")))


def jpegs_and_tensors(url: str, http_url: str, protocol: str, sources: Sources, concurrencies: list[int],
                      out_dir: Path, server_pid: int | None = None, interval_ms: int = 2000,
                      request_count: int = 0) -> list[dict]:
    """Served throughput from JPEG bytes (the ensemble: decode, resize, model) and from pre-decoded tensors
    (the classifier alone), ``sources`` from :func:`jpeg_and_tensor_inputs`, at each concurrency,
    alternating: the gap is what preprocessing and the ensemble's hops cost."""
    rows = []
    for c in concurrencies:
        for source, model, data in sources:
            p = run_point(url, http_url, protocol, "concurrency", c, data, out_dir / source, server_pid,
                          interval_ms, model=model, request_count=request_count)
            rows.append({"source": source, "model": model, "protocol": protocol, "concurrency": c,
                         "images_per_s": p.throughput, "p50_ms": p.latency_ms(50), "p99_ms": p.latency_ms(99)})
            print(f"perf_analyzer {source:7s} {protocol} concurrency {c}: {p.throughput:.0f} img/s, "
                  f"p99 {p.latency_ms(99):.1f} ms")
    return rows


@contextmanager
def rendered_server(onnx: Path, settings: RepoSettings,
                    layout: str | None = None) -> Iterator[tuple[TritonServer, dict]]:
    """A throw-away (embedded) repository for ``onnx`` with ``settings`` and ``layout``, served by the real server
    on free ports: the server and the rendered repository's manifest (build.json). Both go away on exit."""
    with tempfile.TemporaryDirectory(prefix="perf-repo-") as tmp:
        render(onnx, Path(tmp), settings, layout=layout)
        with TritonServer(Path(tmp), None) as server:
            yield server, read_manifest(Path(tmp))


def measure_rendered(onnx: Path, settings: RepoSettings, protocol: str, concurrency: int, input_json: Path,
                     out_dir: Path, interval_ms: int = 2000, request_count: int = 0,
                     layout: str | None = None) -> tuple[PerfPoint, dict]:
    """Serve ``onnx`` with ``settings`` (rendered_server) and measure it at one concurrency: the point and the
    rendered repository's manifest."""
    with rendered_server(onnx, settings, layout) as (server, manifest):
        url = server.http_url if protocol == "http" else server.grpc_url
        point = run_point(url, server.http_url, protocol, "concurrency", concurrency, input_json, out_dir,
                          server.process.pid, interval_ms, request_count=request_count)
    return point, manifest


def sweep(url: str, http_url: str | None, protocol: str, mode: str, values: list[float], blobs: list[bytes],
          out_dir: Path, server_pid: int | None = None, interval_ms: int = 2000,
          metrics_url: str | None = None, request_count: int = 0, shed: list[float] | None = None,
          deployment: Deployment | None = None) -> list[PerfPoint]:
    """One point per value. A request rate past the server's capacity fills its queue and the server sheds
    load ("Exceeds maximum queue size"): that rate goes into ``shed`` and the sweep stops (higher ones
    would too); any other perf_analyzer failure raises. ``deployment``: as run_point's."""
    out_dir.mkdir(parents=True, exist_ok=True)
    input_json = write_input_data(blobs, out_dir / "perf_analyzer_input.json")
    points = []
    for v in values:
        try:
            p = run_point(url, http_url, protocol, mode, v, input_json, out_dir, server_pid, interval_ms,
                          metrics_url=metrics_url, request_count=request_count, deployment=deployment)
        except RuntimeError as e:
            if mode != "request_rate" or QUEUE_FULL not in str(e) or shed is None:
                raise
            print(f"perf_analyzer {protocol} {mode}={v:g}: the server shed load (its queue was full)")
            shed.append(v)
            break
        print(f"perf_analyzer {protocol} {mode}={v:g}: {p.throughput:.0f} img/s, p50 {p.latency_ms(50):.1f} ms, "
              f"p99 {p.latency_ms(99):.1f} ms")
        points.append(p)
    return points


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="perf_analyzer sweep against a running server")
    p.add_argument("--url", default="localhost:8000", help="endpoint of --protocol")
    p.add_argument("--http-url", default="localhost:8000", help="HTTP endpoint for the statistics API")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--concurrency", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    p.add_argument("--request-rate", type=float, nargs="*", default=[])
    p.add_argument("--images", type=Path, default=Path("data/synthetic/val"))
    p.add_argument("--out", type=Path, default=Path("perf/reports/perf_analyzer"))
    p.add_argument("--interval-ms", type=int, default=2000)
    return p


def main(args: argparse.Namespace) -> list[PerfPoint]:
    blobs = [b for _, b in sample_images(args.images)]
    points = sweep(args.url, args.http_url, args.protocol, "concurrency", args.concurrency, blobs, args.out,
                   interval_ms=args.interval_ms)
    points += sweep(args.url, args.http_url, args.protocol, "request_rate", args.request_rate, blobs, args.out,
                    interval_ms=args.interval_ms)
    (args.out / "points.json").write_text(json.dumps([p.to_dict() for p in points], indent=2))
    return points


if __name__ == "__main__":
    main(get_args_parser().parse_args())
