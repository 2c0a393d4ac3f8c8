"""Measuring for the report: the in-process ceiling, perf_analyzer sweeps and locust runs on the real
server, the naive baseline under the same locust load, and the side-by-side comparison (perf/reference/compare.py:
Triton, its other layouts, the peers and the baseline under one generator). Returns one dict of figures.
A deployment (a running server at a URL, perf/load/deployment.py) is measured by measure_deployment instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from build.artifacts import ARTIFACT_NAMES, CANDIDATES, current_report
from build.model_config import config_text, read_configs
from build.render_repo import labels_file
from build.settings import read_manifest, rendered_onnx
from clients.keys import ADMIN
from core.metadata import parameter_count, read_metadata, source_checkpoint
from perf.load.bodies import sample_images
from perf.load.deployment import PROTOCOL_NAMES, Deployment, DeploymentError
from perf.load.loadtest import TRITON_USERS, run_locust
from perf.load.perf_analyzer import PerfPoint, sweep
from perf.load.stats import machine_info
from perf.reference import ceiling
from perf.reference.baseline_process import start_baseline
from perf.reference.compare import side_by_side
from serve.server import TritonServer, free_ports


@dataclass(frozen=True)
class Profile:
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    protocols: tuple[str, ...] = ("http", "grpc")
    # of the best measured throughput; past 1.0 the server's latency turns or it sheds load
    rate_fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.25)
    interval_ms: int = 3000
    locust_users: int = 16
    locust_seconds: int = 20
    ceiling_seconds: float = 3.0
    parts: tuple[str, ...] = ("ceiling", "perf", "loadtest", "compare")  # what to measure
    # compare: perf/reference/compare.py, every server under one generator (wrk) in alternating rounds
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


def measure_all(repo: Path, images: Path, out: Path, profile: Profile) -> dict:
    """Every part of ``profile``, in turn: the in-process ceiling (and the other precisions), the side-by-side
    comparison, perf_analyzer and locust on one server, then the baseline under the same locust load."""
    manifest = read_manifest(repo)
    onnx = rendered_onnx(repo)
    meta = read_metadata(onnx)
    ckpt = str(source_checkpoint(onnx, meta)) if meta.has_checkpoint else None
    labels = labels_file(repo)
    top_k = min(manifest["settings"]["top_k"], manifest["classes"])
    blobs = [b for _, b in sample_images(images)]
    r = describe(repo, images, profile, manifest, ckpt, blobs)
    if ckpt is None:  # the naive baseline serves a PyTorch checkpoint of this project
        r["baseline_left_out"] = (f"{onnx.name} was imported (make import), not exported from a checkpoint of "
                                  "this project: the naive Flask + PyTorch baseline has no model to serve, so it "
                                  "is left out")
        print(f"note: {r['baseline_left_out']}")
    if "ceiling" in profile.parts:
        r.update(measure_ceiling(onnx, images, profile, manifest))
    if "compare" in profile.parts:
        r["compare"] = measure_compare(repo, ckpt, images, out, profile)
    if not {"perf", "loadtest"} & set(profile.parts):
        return r
    with TritonServer(repo, None, log_file=out / "tritonserver.log") as server:
        shed: list[float] = []
        pa = perf_analyzer_sweeps(server, blobs, out, profile, shed)
        if pa:
            r["perf_analyzer"] = {k: [p.to_dict() for p in v] for k, v in pa.items()}
            r["rate_shed_at"] = shed[0] if shed else None
        if "loadtest" not in profile.parts:
            return r
        r["locust"] = locust_on_triton(server, images, out, profile, labels, top_k)
    if ckpt is not None:
        r["locust"]["BaselineUser"] = locust_on_baseline(ckpt, images, out, profile, labels, top_k)
    return r


def describe(repo: Path, images: Path, profile: Profile, manifest: dict, ckpt: str | None,
             blobs: list[bytes]) -> dict:
    """What is measured: the machine, the repository (its manifest and configurations) and the payload."""
    meta = read_metadata(manifest["onnx"])
    arch = {"arch": meta.arch, "parameters": parameter_count(Path(manifest["onnx"])),
            "weights": meta.pretrained_weights}
    return {"machine": machine_info(), "manifest": manifest, "profile": asdict(profile), "model": arch,
            "configs": {name: config_text(cfg) for name, cfg in read_configs(repo).items()},
            "checkpoint": ckpt, "images": str(images), "payload_images": len(blobs),
            "payload_mean_bytes": sum(map(len, blobs)) / len(blobs)}


def measure_ceiling(onnx: Path, images: Path, profile: Profile, manifest: dict) -> dict:
    """The in-process ceiling of what the repository serves (its engine and precision), and of every other
    candidate make quantize measured next to it (engine x precision; without its report, each artifact file
    on ONNX Runtime), same pipeline, same run: {"ceiling": ..., "precisions": ...}."""
    print("ceiling (in-process, no server) ...")
    served = {"engine": manifest.get("engine", "onnxruntime"),
              "inference_precision": manifest.get("inference_precision") or "f32"}
    r: dict = {"ceiling": ceiling.measure_isolated(onnx, images, min_time=profile.ceiling_seconds, **served),
               "precisions": {}}
    report = current_report(onnx.parent)
    names = [n for n in CANDIDATES if n in report["artifacts"] and n not in report["gate_failures"]] if report \
        else list(ARTIFACT_NAMES)
    for name in names:
        c = CANDIDATES[name]
        path = onnx.parent / ARTIFACT_NAMES[c.artifact]
        if path.is_file():
            m = ceiling.measure_isolated(path, images, min_time=profile.ceiling_seconds, engine=c.engine,
                                inference_precision=c.inference_precision,
                                schedules=(r["ceiling"]["best_schedule"],))
            r["precisions"][name] = {"file": path.name, "engine": c.engine, "precision": c.precision,
                                     "images_per_s": m["ceiling_images_per_s"], "best_batch": m["best_batch"],
                                     "schedule": m["best_schedule"],
                                     "model_only_images_per_s": m["model_only_images_per_s_at_best_batch"]}
    return r


def measure_compare(repo: Path, ckpt: str | None, images: Path, out: Path, profile: Profile) -> dict:
    """Every server under one generator (perf/reference/compare.py): Triton, its other layouts, the peers, the
    baseline (where there is a checkpoint)."""
    others = (*profile.compare_layouts, *profile.compare_peers, *(("baseline",) if ckpt else ()))
    print("side by side (wrk): Triton" + "".join(f", {x}" for x in others) + " ...")
    return side_by_side(repo, Path(ckpt) if ckpt else None, images, out / "compare", profile.compare_rounds,
                        profile.compare_seconds, profile.compare_connections, profile.compare_layouts,
                        profile.compare_peers)


def perf_analyzer_sweeps(server: TritonServer, blobs: list[bytes], out: Path, profile: Profile,
                         shed: list[float] | None = None) -> dict[str, list[PerfPoint]]:
    """perf_analyzer's concurrency sweep per protocol, then an open-loop gRPC request-rate sweep at fractions of
    the best throughput measured, up to past it (the first rate the server shed load at goes into ``shed``);
    none unless the profile's parts include perf."""
    assert server.proc is not None  # serving
    urls = {"http": server.http_url, "grpc": server.grpc_url}
    return sweeps(urls, blobs, out, profile, shed, server.http_url, server.proc.pid, server.metrics_url)


def sweeps(urls: dict[str, str], blobs: list[bytes], out: Path, profile: Profile, shed: list[float] | None = None,
           http_url: str | None = None, pid: int | None = None, metrics_url: str | None = None,
           deployment: Deployment | None = None) -> dict[str, list[PerfPoint]]:
    """perf_analyzer_sweeps on the endpoints ``urls`` (protocol: host:port) of the profile's protocols; the
    request-rate sweep ("<protocol>_rate") over gRPC where there is one. ``deployment``: run_point's."""
    pa: dict[str, list[PerfPoint]] = {}
    if "perf" not in profile.parts:
        return pa
    for proto in (p for p in profile.protocols if p in urls):
        pa[proto] = sweep(urls[proto], http_url, proto, "concurrency", list(profile.concurrency), blobs,
                          out / "perf_analyzer", pid, profile.interval_ms, metrics_url, profile.request_count,
                          deployment=deployment)
    if pa:
        peak = max(p.throughput for pts in pa.values() for p in pts)
        rates = [max(1.0, round(f * peak)) for f in profile.rate_fractions]
        proto = "grpc" if "grpc" in pa else next(iter(pa))
        pa[f"{proto}_rate"] = sweep(urls[proto], http_url, proto, "request_rate", rates, blobs, out / "perf_analyzer",
                                    pid, profile.interval_ms, metrics_url, profile.request_count, shed,
                                    deployment=deployment)
    return pa


# what a deployment (a server this run did not start, at a URL) cannot have measured, and why
LOCAL_ONLY = {
    "ceiling": "the in-process ceiling runs the local repository's model on this machine, not the server at the URL",
    "compare": "the side by side starts every server it measures (Triton's other layouts, the peers, the baseline)",
    "baseline": "the naive baseline is a Flask server started here on the local checkpoint, not the deployment",
}


def left_out(profile: Profile) -> dict[str, str]:
    """The parts of ``profile`` a deployment leaves out, with why (the baseline is the loadtest part's)."""
    asked = set(profile.parts) | ({"baseline"} if "loadtest" in profile.parts else set())
    return {part: why for part, why in LOCAL_ONLY.items() if part in asked}


def measure_deployment(deployment: Deployment, images: Path, out: Path, profile: Profile,
                       metrics_url: str | None = None) -> dict:
    """The profile's perf and loadtest parts on a running server, over its one URL, with its key and TLS: nothing
    is started or stopped, and nothing local is read but the JPEGs; the parts that need a local server are left
    out, each with a printed line saying why. What was measured is the server's own account of itself
    (Deployment.describe). ``metrics_url``: its Prometheus endpoint, scraped around each perf_analyzer point."""
    print(f"measuring the running server at {deployment.url} over {PROTOCOL_NAMES[deployment.protocol]} "
          "(nothing is started or stopped) ...")
    deployment, measured = deployment.describe()
    print(f"measured: Triton {measured['server']['version']} at {deployment.url}, model {measured['model']} version "
          f"{measured['version']}; {'TLS' if measured['tls'] else 'no TLS'}, "
          f"{'inference key sent' if measured['inference_key'] else 'no inference key'}; "
          f"configuration {measured['config_note']}")
    skipped = left_out(profile)
    for part, why in skipped.items():
        print(f"left out: {part}: {why}")
    if "perf" in profile.parts and measured["config"] is None:  # perf_analyzer reads it before measuring
        raise DeploymentError(f"perf_analyzer reads the configuration of model '{measured['model']}', and "
                              f"{deployment.url} does not let it be read: {measured['config_note']}. Set "
                              f"${ADMIN.env} to the server's admin key (or measure with `make loadtest URL=...`, "
                              "which needs the inference key only)")
    top_k = deployment.top_k(measured) if "loadtest" in profile.parts else 0  # refused before any load too
    blobs = [b for _, b in sample_images(images)]
    r: dict = {"deployment": measured, "left_out": skipped, "machine": machine_info(), "profile": asdict(profile),
               "images": str(images), "payload_images": len(blobs),
               "payload_mean_bytes": sum(map(len, blobs)) / len(blobs)}
    shed: list[float] = []
    pa = sweeps({deployment.protocol: deployment.url}, blobs, out, profile, shed, metrics_url=metrics_url,
                deployment=deployment)
    if pa:
        r["perf_analyzer"] = {k: [p.to_dict() for p in v] for k, v in pa.items()}
        r["rate_shed_at"] = shed[0] if shed else None
    if "loadtest" in profile.parts:
        user = TRITON_USERS[deployment.protocol]
        r["locust"] = {user: run_locust(user, f"http://{deployment.url}", profile.locust_users,
                                        profile.locust_seconds, out / "locust", images, None, top_k,
                                        deployment.url, key=deployment.key, tls=deployment.tls)}
    return r


def locust_on_triton(server: TritonServer, images: Path, out: Path, profile: Profile, labels: Path,
                     top_k: int) -> dict:
    """locust's HTTP and gRPC users against the server, one run each."""
    assert server.proc is not None  # serving
    return {user: run_locust(user, f"http://{server.http_url}", profile.locust_users, profile.locust_seconds,
                             out / "locust", images, labels, top_k, server.grpc_url, server_pid=server.proc.pid)
            for user in ("TritonHttpUser", "TritonGrpcUser")}


def locust_on_baseline(ckpt: str, images: Path, out: Path, profile: Profile, labels: Path, top_k: int) -> dict:
    """The naive baseline (serving ``ckpt``) under the same locust load, stopped afterwards."""
    (port,) = free_ports(1)
    baseline = start_baseline(ckpt, port, out / "locust" / "baseline_server.log")
    try:
        return run_locust("BaselineUser", f"http://127.0.0.1:{port}", profile.locust_users, profile.locust_seconds,
                          out / "locust", images, labels, top_k, server_pid=baseline.pid)
    finally:
        baseline.terminate()
        baseline.wait(30)
