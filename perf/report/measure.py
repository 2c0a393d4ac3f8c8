"""Measuring for the report: the in-process ceiling, perf_analyzer sweeps and locust runs on the real
server, the naive baseline under the same locust load, and the side-by-side comparison (perf/fair.py:
Triton, its other layouts, the peers and the baseline under one generator). Returns one dict of figures.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from build.render_repo import config_text, labels_file, read_configs, read_manifest, rendered_onnx
from core.metadata import read_metadata, source_checkpoint
from perf import ceiling
from perf.common import machine_info, sample_images
from perf.loadtest import run_locust
from perf.perf_analyzer import PerfPoint, sweep
from serve.server import TritonServer, free_ports


@dataclass(frozen=True)
class Profile:
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    protocols: tuple[str, ...] = ("http", "grpc")
    rate_fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # of the best measured throughput
    interval_ms: int = 3000
    locust_users: int = 16
    locust_seconds: int = 20
    ceiling_seconds: float = 3.0
    parts: tuple[str, ...] = ("ceiling", "perf", "loadtest", "compare")  # what to measure
    # compare: perf/fair.py, every server under one generator (wrk) in alternating rounds
    compare_rounds: int = 3
    compare_seconds: int = 10
    compare_connections: int = 16
    compare_layouts: tuple[str, ...] = ("postprocess",)
    compare_peers: tuple[str, ...] = ("ray", "bentoml")
    request_count: int = 0  # > 0: every perf_analyzer point is exactly this many requests (no stabilization)


FULL = Profile()
QUICK = Profile(concurrency=(1, 4), rate_fractions=(0.5,), interval_ms=500, locust_users=4, locust_seconds=3,
                ceiling_seconds=0.3, compare_rounds=1, compare_seconds=1, compare_connections=4, compare_layouts=(),
                compare_peers=())


def start_baseline(ckpt: str, port: int, log_path: Path) -> subprocess.Popen:
    """The naive baseline server, its output to ``log_path``: Flask logs every request to stderr, and an
    unread pipe fills after about 950 requests and stalls the server (a stalled baseline reads as slow)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, "-m", "perf.baseline", "--ckpt", ckpt, "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"baseline server exited: {log_path.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                return proc
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"baseline server did not come up within 120 s (log: {log_path})")
    except BaseException:  # Ctrl-C included: never leave the child behind
        proc.kill()
        proc.wait(10)
        raise


def measure_all(repo: Path, images: Path, out: Path, profile: Profile) -> dict:
    manifest = read_manifest(repo)
    onnx = rendered_onnx(repo)
    meta = read_metadata(onnx)
    ckpt = str(source_checkpoint(onnx, meta))
    labels = labels_file(repo)
    top_k = manifest["settings"]["top_k"] if manifest["settings"]["top_k"] <= manifest["classes"] else manifest["classes"]
    blobs = [b for _, b in sample_images(images)]
    r: dict = {"machine": machine_info(), "manifest": manifest, "profile": asdict(profile),
               "configs": {name: config_text(cfg) for name, cfg in read_configs(repo).items()},
               "checkpoint": ckpt, "images": str(images), "payload_images": len(blobs),
               "payload_mean_bytes": sum(map(len, blobs)) / len(blobs)}

    if "ceiling" in profile.parts:
        print("ceiling (in-process, no server) ...")
        r["ceiling"] = ceiling.measure(onnx, images, min_time=profile.ceiling_seconds)
        # the other precisions built next to the served ONNX (make quantize), same pipeline, same run
        from build.quantize import ARTIFACT_NAMES

        r["precisions"] = {}
        for name, file in ARTIFACT_NAMES.items():
            path = onnx.parent / file
            if path.is_file():
                m = ceiling.measure(path, images, min_time=profile.ceiling_seconds)
                r["precisions"][name] = {"file": file, "images_per_s": m["ceiling_images_per_s"],
                                         "best_batch": m["best_batch"],
                                         "model_only_images_per_s": m["model_only_images_per_s_at_best_batch"]}

    if "compare" in profile.parts:
        from perf.fair import side_by_side

        print("side by side (wrk): Triton, " + ", ".join((*profile.compare_layouts, *profile.compare_peers, "baseline"))
              + " ...")
        r["compare"] = side_by_side(repo, Path(ckpt), images, out / "compare", profile.compare_rounds,
                                    profile.compare_seconds, profile.compare_connections, profile.compare_layouts,
                                    profile.compare_peers)
    if not {"perf", "loadtest"} & set(profile.parts):
        return r
    with TritonServer(repo, None, log_file=out / "tritonserver.log") as server:
        metrics_url = server.metrics_url
        pa: dict[str, list[PerfPoint]] = {}
        if "perf" not in profile.parts:
            profile = Profile(**{**asdict(profile), "protocols": (), "rate_fractions": ()})
        for proto in profile.protocols:
            url = server.http_url if proto == "http" else server.grpc_url
            pa[proto] = sweep(url, server.http_url, proto, "concurrency", list(profile.concurrency), blobs,
                              out / "perf_analyzer", server.proc.pid, profile.interval_ms, metrics_url,
                              profile.request_count)
        if pa:
            peak = max(p.throughput for pts in pa.values() for p in pts)
            rates = [max(1.0, round(f * peak)) for f in profile.rate_fractions]
            pa["grpc_rate"] = sweep(server.grpc_url, server.http_url, "grpc", "request_rate", rates, blobs,
                                    out / "perf_analyzer", server.proc.pid, profile.interval_ms, metrics_url,
                              profile.request_count)
            r["perf_analyzer"] = {k: [p.to_dict() for p in v] for k, v in pa.items()}
        if "loadtest" not in profile.parts:
            return r
        r["locust"] = {}
        for user in ("TritonHttpUser", "TritonGrpcUser"):
            r["locust"][user] = run_locust(user, f"http://{server.http_url}", profile.locust_users,
                                           profile.locust_seconds, out / "locust", images, labels, top_k,
                                           server.grpc_url, server_pid=server.proc.pid)

    (port,) = free_ports(1)
    baseline = start_baseline(ckpt, port, out / "locust" / "baseline_server.log")
    try:
        r["locust"]["BaselineUser"] = run_locust("BaselineUser", f"http://127.0.0.1:{port}", profile.locust_users,
                                                 profile.locust_seconds, out / "locust", images, labels, top_k,
                                                 server_pid=baseline.pid)
    finally:
        baseline.terminate()
        baseline.wait(30)
    return r

