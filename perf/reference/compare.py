"""Side by side with one load generator: every HTTP server measured by wrk, in alternating rounds.

    python -m perf.reference.compare --repo model_repository --ckpt artifacts/best.pt --images data/synthetic/val
    make compare

perf_analyzer speaks only Triton's protocols and locust is itself CPU-bound on 2 cores, so neither can
compare Triton with other servers fairly. wrk (C, event loop; Debian's package; perf/load/wrk.py) drives any
HTTP server: perf/load/post_bodies.lua POSTs pre-built bodies in turn, the same JPEGs for every server, one image per
request (each server batches on its own side), as a KServe v2 binary-tensor request for Triton and as
raw bytes for the baseline and Ray Serve, as a multipart file upload for BentoML (how their
clients send a file). Each round measures every server once, in an order rotated from round to
round, after one untimed warm-up each; a server's figure is the median over the rounds with the range
beside it, and the ratios are taken within each round. The generator's own CPU (its user + system
time over the run, from getrusage) is reported, since it shares the cores with the servers.

``--layouts`` adds the served model in other repository layouts (rendered into throw-away folders with
the repository's own settings), each behind its own server, measured in the same rounds.

Writes perf/reports/compare/report.{json,md} and compare.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from core import protocol as P
from perf.load.bodies import sample_images
from perf.load.rounds import compare
from perf.load.wrk import Target
from perf.paths import REPORTS
from perf.reference.baseline_process import start_baseline, stop_baseline
from perf.reference.compare_report import plot, render_markdown


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Triton and the naive baseline measured side by side by one generator (wrk)")
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--ckpt", type=Path, default=Path("artifacts/best.pt"), help="the baseline serves this checkpoint")
    p.add_argument("--images", type=Path, default=Path("data/synthetic/val"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=10, help="per server and round")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--layouts", default="", help="comma-separated other embedded layouts to measure beside the "
                   "repository's own (fused, postprocess, classification); '' = none")
    p.add_argument("--peers", default="ray,bentoml", help="comma-separated peer servers to measure (ray, bentoml; "
                   "`make peers` installs them); '' = none")
    p.add_argument("--baseline-port", type=int, default=0, help="0: a free port")
    p.add_argument("--out", type=Path, default=REPORTS / "compare")
    return p


def side_by_side(repo: Path, ckpt: Path | None, image_dir: Path, out: Path, rounds: int = 3, seconds: int = 10,
                 connections: int = 16, layouts: tuple[str, ...] = (), peers: tuple[str, ...] = (),
                 baseline_port: int = 0) -> dict:
    """Serve ``repo`` (and the same model in ``layouts``), start ``peers`` and the baseline (on ``ckpt``), and
    measure them all with :func:`compare`, the in-process ceiling at each round's start. Logs go to ``out``.
    ``ckpt`` None (an imported model: no PyTorch checkpoint): no baseline."""
    from build.layouts import LAYOUTS
    from build.render_repo import render
    from build.settings import read_manifest, settings_from_manifest
    from perf.reference.peers import launch
    from serve.publish import served_onnx
    from serve.server import TritonServer, free_ports

    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(repo)
    layouts = tuple(x for x in layouts if x != manifest["layout"])
    if unknown := set(layouts) - set(LAYOUTS):
        raise ValueError(f"unknown layout(s) {sorted(unknown)}; choose from {LAYOUTS}")
    if unknown := set(peers) - set(launch.PEERS):
        raise ValueError(f"unknown peer(s) {sorted(unknown)}; choose from {sorted(launch.PEERS)}")
    for name in peers:
        launch.python_of(launch.PEERS[name])  # installed? (before anything starts)
    images = [b for _, b in sample_images(image_dir, 64)]
    onnx = served_onnx(repo)
    port = baseline_port or free_ports(1)[0]
    baseline = start_baseline(str(ckpt), port, out / "baseline.log") if ckpt is not None else None
    try:
        with contextlib.ExitStack() as stack:
            server = stack.enter_context(TritonServer(repo, None, log_file=out / "tritonserver.log"))
            path = f"/v2/models/{P.ENSEMBLE}/infer"
            targets = [Target(f"triton ({manifest['layout']})", f"http://{server.http_url}", path, "kserve")]
            for layout in layouts:  # the same model and settings, another layout, its own server
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"compare-{layout}-")))
                render(onnx, tmp, settings_from_manifest(manifest), layout=layout)
                other = stack.enter_context(TritonServer(tmp, None, log_file=out / f"tritonserver-{layout}.log"))
                targets.append(Target(f"triton ({layout})", f"http://{other.http_url}", path, "kserve"))
            targets += peer_targets(stack, repo, peers, images[0], out)
            if baseline is not None:
                targets.append(Target("baseline", f"http://127.0.0.1:{port}", "/predict", "raw"))
            best, per_round = ceiling_per_round(onnx, image_dir, seconds, manifest)
            r = compare(targets, images, rounds, seconds, connections, ceiling=per_round)
    finally:
        if baseline is not None:
            stop_baseline(baseline)
    r.update(when=time.strftime("%Y-%m-%d %H:%M"), repo=str(repo), ceiling_batch=best,
             ceiling_engine=manifest.get("engine", "onnxruntime"), settings=manifest["settings"])
    return r


def peer_targets(stack: contextlib.ExitStack, repo: Path, peers: tuple[str, ...], probe: bytes,
                 out: Path) -> list[Target]:
    """``peers`` started on ``stack``, each serving what ``repo`` serves: the same ONNX file, preprocessing and
    batching settings; ``probe`` (an encoded image) must be answered first. Logs go to ``out``."""
    from perf.reference.peers import launch
    from serve.server import free_ports

    spec = launch.write_spec(repo, out / "peer_spec.json")
    targets = []
    for name in peers:
        peer = launch.PEERS[name]
        url = stack.enter_context(launch.running(peer, spec, free_ports(1)[0], out / f"{name}.log", probe))
        targets.append(Target(peer.name, url, peer.path, peer.kind))
    return targets


def ceiling_per_round(onnx: Path, image_dir: Path, seconds: int, manifest: dict) -> tuple[int, Callable[[], float]]:
    """The served model itself in this process, on the served engine and precision (``manifest``): the batch
    size and schedule where it does best (chosen once, untimed), and a measurement of its images/s with those
    over ``seconds``, to be taken at each round's start."""
    from perf.reference import ceiling

    engine = {"engine": manifest.get("engine", "onnxruntime"),
              "inference_precision": manifest.get("inference_precision") or "f32"}
    first = ceiling.measure_isolated(onnx, image_dir, min_time=1.0, stages=False, **engine)
    best, schedule = first["best_batch"], first["best_schedule"]

    def per_round() -> float:
        return ceiling.measure_isolated(onnx, image_dir, batches=(best,), min_time=seconds, stages=False,
                                        schedules=(schedule,), **engine)["ceiling_images_per_s"]

    return best, per_round


def _split(text: str) -> tuple[str, ...]:
    """A comma-separated list, empty items dropped."""
    return tuple(x for x in text.split(",") if x)


def main(a: argparse.Namespace) -> dict:
    try:
        r = side_by_side(a.repo, a.ckpt, a.images, a.out, a.rounds, a.seconds, a.connections, _split(a.layouts),
                         _split(a.peers), a.baseline_port)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from e
    plot(r, a.out / "compare.png")
    (a.out / "report.json").write_text(json.dumps(r, indent=2))
    (a.out / "report.md").write_text(render_markdown(r))
    print(render_markdown(r))
    return r


if __name__ == "__main__":
    main(get_args_parser().parse_args())
