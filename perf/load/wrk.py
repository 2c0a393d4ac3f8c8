"""Side by side with one load generator: every HTTP server measured by wrk, in alternating rounds.

    python -m perf.fair --repo model_repository --ckpt artifacts/best.pt --images data/synthetic/val   # make compare

perf_analyzer speaks only Triton's protocols and locust is itself CPU-bound on 2 cores, so neither can
compare Triton with other servers fairly. wrk (C, event loop; Debian's package) drives any HTTP server:
perf/wrk/post_bodies.lua POSTs pre-built bodies in turn, the same JPEGs for every server, one image per
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
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from core import protocol as P
from perf.common import REPORTS, sample_images
from perf.harness import request_body, start_baseline, verdicts

LUA = Path(__file__).resolve().parent / "wrk" / "post_bodies.lua"


@dataclass(frozen=True)
class Target:
    name: str
    url: str      # http://host:port
    path: str     # what to POST to
    kind: str     # "kserve": a KServe v2 binary-tensor request; "raw": the encoded image as the body;
                  # "multipart": the image as the form file field "images"


def wrk_binary() -> str:
    exe = shutil.which("wrk")
    if not exe:
        raise FileNotFoundError("wrk not found: `make venv` installs it (Debian package wrk)")
    return exe


def write_bodies(images: list[bytes], kind: str, out: Path) -> int:
    """One request body per image into ``out``, with its headers beside it; how many."""
    out.mkdir(parents=True, exist_ok=True)
    for i, blob in enumerate(images):
        body, headers = request_body(blob, kind)
        (out / f"{i:05d}.hdr").write_text("".join(f"{k}: {v}\n" for k, v in headers.items()))
        (out / f"{i:05d}.bin").write_bytes(body)
    return len(images)


def read_headers(path: Path) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in path.read_text().splitlines() if ": " in line)


def check_bodies(target: Target, bodies: Path, count: int) -> None:
    """Every body is answered 200 by ``target`` before it is measured: wrk counts statuses, not answers."""
    import urllib.error
    import urllib.request

    for i in range(count):
        req = urllib.request.Request(target.url + target.path, (bodies / f"{i:05d}.bin").read_bytes(),
                                     read_headers(bodies / f"{i:05d}.hdr"))
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                r.read()
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{target.name} answered request body {i} with {e.code}: {e.read()[:300]!r}") from None


def run_wrk(target: Target, bodies: Path, count: int, seconds: int, connections: int, threads: int) -> dict:
    """One wrk run of ``seconds`` (whole: wrk takes no fractions) against ``target``: its figures, and the
    generator's CPU in cores."""
    if int(seconds) != seconds or seconds < 1:
        raise ValueError(f"wrk runs for whole seconds, not {seconds}")
    cmd = [wrk_binary(), "-t", str(threads), "-c", str(connections), "-d", f"{int(seconds)}s", "--timeout", "30s",
           "-s", str(LUA), target.url + target.path, "--", str(bodies), str(count), target.path]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if r.returncode != 0 or line is None:
        raise RuntimeError(f"wrk against {target.name} failed ({r.returncode}): "
                           f"{r.stderr[-1000:] or r.stdout[-1000:]}")
    out = json.loads(line.split(" ", 1)[1])
    wall = out["duration_us"] / 1e6
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    out.update(seconds=round(wall, 2), per_s=round(out["requests"] / wall, 1),
               errors=sum(out[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors",
                                           "timeouts")),
               generator_cores=round(cpu_s / wall, 3))
    return out


def latency_sweep(target: Target, images: list[bytes], concurrencies: Sequence[int], seconds: int = 5,
                  threads: int = 2) -> list[dict]:
    """p50/p99 and throughput of ``target`` at each number of connections, one wrk run each, ascending (a
    closed loop: each connection sends its next request when the answer arrives)."""
    with tempfile.TemporaryDirectory(prefix="sweep-bodies-") as tmp:
        count = write_bodies(images, target.kind, Path(tmp))
        check_bodies(target, Path(tmp), count)
        run_wrk(target, Path(tmp), count, 2, min(concurrencies), min(threads, min(concurrencies)))  # untimed warm-up
        rows = []
        for c in sorted(concurrencies):
            r = run_wrk(target, Path(tmp), count, seconds, c, min(threads, c))
            rows.append({"concurrency": c, "images_per_s": r["per_s"], "p50_ms": r["p50_us"] / 1e3,
                         "p99_ms": r["p99_us"] / 1e3, "errors": r["errors"]})
    return rows


def within_budget(rows: list[dict], p99_budget_ms: float) -> dict | None:
    """The highest concurrency whose p99 is within the budget (and answered every request), or None."""
    ok = [r for r in rows if r["p99_ms"] <= p99_budget_ms and r["errors"] == 0]
    return max(ok, key=lambda r: r["concurrency"]) if ok else None


def spread(xs: list[float]) -> dict:
    return {"median": round(float(np.median(xs)), 2), "min": round(min(xs), 2), "max": round(max(xs), 2)}


def compare(targets: list[Target], images: list[bytes], rounds: int = 3, seconds: int = 10, connections: int = 16,
            threads: int = 2, warmup_s: int = 2, ceiling: Callable[[], float] | None = None) -> dict:
    """Every target once per round, the order rotated each round; per target the rounds and their spread;
    per round the throughput ratio of the first target to each other one. ``ceiling``: measures the
    in-process ceiling (images/s, no server, no generator) at the start of each round, and the first
    target's share of it is reported the same way."""
    with tempfile.TemporaryDirectory(prefix="fair-bodies-") as tmp:
        bodies = {kind: Path(tmp) / kind for kind in {t.kind for t in targets}}
        count = {kind: write_bodies(images, kind, d) for kind, d in bodies.items()}
        for t in targets:  # untimed: first requests pay for lazy initialisation
            check_bodies(t, bodies[t.kind], count[t.kind])
            run_wrk(t, bodies[t.kind], count[t.kind], warmup_s, connections, threads)
        runs: dict[str, list[dict]] = {t.name: [] for t in targets}
        order_log = []
        ceilings: list[float] = []
        for r in range(rounds):
            if ceiling is not None:
                ceilings.append(ceiling())
            order = targets[r % len(targets):] + targets[:r % len(targets)]
            order_log.append([t.name for t in order])
            for t in order:
                runs[t.name].append(run_wrk(t, bodies[t.kind], count[t.kind], seconds, connections, threads))
    first = targets[0].name
    summary = {name: {"images_per_s": spread([x["per_s"] for x in rs]),
                      "p50_ms": spread([x["p50_us"] / 1000 for x in rs]),
                      "p99_ms": spread([x["p99_us"] / 1000 for x in rs]),
                      "errors": sum(x["errors"] for x in rs), "requests": sum(x["requests"] for x in rs),
                      "generator_cores": spread([x["generator_cores"] for x in rs])} for name, rs in runs.items()}
    ratios = {f"{first} / {t.name}": spread([a["per_s"] / b["per_s"]
                                             for a, b in zip(runs[first], runs[t.name], strict=True)])
              for t in targets[1:]}
    if ceilings:
        summary["in-process ceiling"] = {"images_per_s": spread(ceilings)}
        ratios[f"{first} / in-process ceiling"] = spread([a["per_s"] / c
                                                          for a, c in zip(runs[first], ceilings, strict=True)])
    version = subprocess.run([wrk_binary(), "-v"], capture_output=True, text=True).stdout
    return {"generator": "wrk " + version.split("[")[0].replace("wrk ", "").strip(),
            "connections": connections, "threads": threads, "seconds": seconds,
            "rounds": rounds, "images": len(images), "order": order_log, "targets": [t.__dict__ for t in targets],
            "summary": summary, "throughput_ratios": ratios, "runs": runs}


def plot(r: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "images_per_s", "images/s (one per request)"),
                           (axes[1], "p99_ms", "p99 latency (ms)")):
        names = [n for n in r["summary"] if key in r["summary"][n]]
        med = [r["summary"][n][key]["median"] for n in names]
        lo = [m - r["summary"][n][key]["min"] for m, n in zip(med, names, strict=True)]
        hi = [r["summary"][n][key]["max"] - m for m, n in zip(med, names, strict=True)]
        ax.bar(names, med, yerr=[lo, hi], capsize=6, color=[plt.cm.tab10(i) for i in range(len(names))])
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{r['generator']}, {r['connections']} connections, {r['rounds']} rounds of {r['seconds']:g} s "
                 "(median, bars: min-max)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(s: dict) -> str:
    """A median with its range in brackets."""
    return f"{s['median']:g} [{s['min']:g}–{s['max']:g}]"


def render_markdown(r: dict, heading: str = "#", image: str | None = "compare.png") -> str:
    """The comparison as Markdown: ``heading`` its level, ``image`` the plot's file (None: not shown)."""
    forms = ", ".join(f"{t['name']} {t['kind']}" for t in r["targets"])
    lines = [f"{heading} Side by side, one load generator", "",
             f"Measured {r.get('when', '')} with {r['generator']} ({r['threads']} threads, "
             f"{r['connections']} connections, "
             f"the same {r['images']} JPEGs, one image per request, each in its server's own form: {forms}), "
             f"{r['rounds']} rounds of {r['seconds']:g} s, every "
             "server once per round in a rotated order, after an untimed warm-up. Median over the rounds, "
             "range in brackets. "
             "The generator runs on the same 2 cores as the servers; its CPU is shown.", "",
             "| server | images/s | p50 (ms) | p99 (ms) | errors | generator CPU (cores) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, s in r["summary"].items():
        if "p50_ms" not in s:  # the in-process ceiling: no server, no requests
            batch = f", batches of {r['ceiling_batch']}" if "ceiling_batch" in r else ""
            lines.append(f"| {name} (DALI + ONNX Runtime in this process{batch}) | {_fmt(s['images_per_s'])} "
                         "| | | | |")
            continue
        lines.append(f"| {name} | {_fmt(s['images_per_s'])} | {_fmt(s['p50_ms'])} | {_fmt(s['p99_ms'])} | "
                     f"{s['errors']} | {_fmt(s['generator_cores'])} |")
    lines += ["", "Throughput ratios, taken within each round:", ""]
    lines += [f"- {k}: {_fmt(v)}" for k, v in r["throughput_ratios"].items()]
    lines += ["", "Targets (issue 12), at this concurrency:", ""] + [f"- {v}" for v in verdicts(r)]
    lines += ["", f"![compare]({image})", ""] if image else [""]
    return "\n".join(lines)


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


def side_by_side(repo: Path, ckpt: Path, image_dir: Path, out: Path, rounds: int = 3, seconds: int = 10,
                 connections: int = 16, layouts: tuple[str, ...] = (), peers: tuple[str, ...] = (),
                 baseline_port: int = 0) -> dict:
    """Serve ``repo`` (and the same model in ``layouts``), start ``peers`` and the baseline (on ``ckpt``), and
    measure them all with :func:`compare`, the in-process ceiling at each round's start. Logs go to ``out``."""
    from build.layouts import LAYOUTS
    from build.render_repo import render
    from build.settings import read_manifest, settings_from_manifest
    from perf.peers import launch
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
    baseline = start_baseline(str(ckpt), port, out / "baseline.log")
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
            targets.append(Target("baseline", f"http://127.0.0.1:{port}", "/predict", "raw"))
            best, per_round = ceiling_per_round(onnx, image_dir, seconds, manifest)
            r = compare(targets, images, rounds, seconds, connections, ceiling=per_round)
    finally:
        stop_baseline(baseline)
    r.update(when=time.strftime("%Y-%m-%d %H:%M"), repo=str(repo), ceiling_batch=best,
             ceiling_engine=manifest.get("engine", "onnxruntime"), settings=manifest["settings"])
    return r


def peer_targets(stack: contextlib.ExitStack, repo: Path, peers: tuple[str, ...], probe: bytes,
                 out: Path) -> list[Target]:
    """``peers`` started on ``stack``, each serving what ``repo`` serves: the same ONNX file, preprocessing and
    batching settings; ``probe`` (an encoded image) must be answered first. Logs go to ``out``."""
    from perf.peers import launch
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
    from perf import ceiling

    engine = {"engine": manifest.get("engine", "onnxruntime"),
              "inference_precision": manifest.get("inference_precision") or "f32"}
    first = ceiling.measure_isolated(onnx, image_dir, min_time=1.0, stages=False, **engine)
    best, schedule = first["best_batch"], first["best_schedule"]

    def per_round() -> float:
        return ceiling.measure_isolated(onnx, image_dir, batches=(best,), min_time=seconds, stages=False,
                                        schedules=(schedule,), **engine)["ceiling_images_per_s"]

    return best, per_round


Variant = tuple[str, dict, dict]  # a server of variants(): its name, the settings it changes, TritonServer options


@contextlib.contextmanager
def variant_servers(repo: Path, out: Path, servers: Sequence[Variant]) -> Iterator[tuple[list[Target], dict]]:
    """The repository's model, layout and settings served once per ``(name, settings changed, server options)``,
    all at once, each in a throw-away folder: (their wrk targets, the running servers by name)."""
    from build.artifacts import rendered_candidate
    from build.render_repo import render
    from build.settings import read_manifest, rendered_onnx, settings_from_manifest
    from serve.server import TritonServer

    manifest = read_manifest(repo)
    onnx, settings = rendered_onnx(repo), settings_from_manifest(manifest)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        targets, running = [], {}
        for i, (name, changes, options) in enumerate(servers):
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="variant-")))
            # on the engine and precision the repository serves (OpenVINO's, say), not the file's default
            render(onnx, tmp, replace(settings, **changes), layout=manifest["layout"],
                   served=rendered_candidate(manifest, onnx))
            running[name] = stack.enter_context(TritonServer(tmp, None, log_file=out / f"tritonserver-{i}.log",
                                                             **options))
            targets.append(Target(name, f"http://{running[name].http_url}", f"/v2/models/{P.ENSEMBLE}/infer",
                                  "kserve"))
        yield targets, running


def variants(repo: Path, image_dir: Path, out: Path, servers: Sequence[Variant], rounds: int = 3,
             seconds: int = 10, connections: int = 16,
             after: Callable[[dict], dict] | None = None) -> dict:
    """The servers of :func:`variant_servers`, measured by :func:`compare` (the first against each other);
    ``after``: given the running servers by name, its result is added to the report (e.g. what each server
    counted)."""
    from build.settings import read_manifest

    manifest = read_manifest(repo)
    images = [b for _, b in sample_images(image_dir, 64)]
    with variant_servers(repo, out, servers) as (targets, running):
        r = compare(targets, images, rounds, seconds, connections)
        if after is not None:
            r.update(after(running))
    r.update(repo=str(repo), layout=manifest["layout"], settings=manifest["settings"])
    return r


def variants_main(description: str, out: Path, measure: Callable[..., dict],
                  markdown: Callable[[dict], str] = render_markdown,
                  options: dict[str, dict[str, Any]] | None = None) -> None:
    """The command line of a side-by-side measurement, ``measure(repo, images, out, rounds, seconds,
    connections, **options)``: ``options`` maps each extra flag to its add_argument keywords, and its value
    is passed by the flag's name (``--flood-connections`` as ``flood_connections``). Writes report.json and
    report.md to --out and prints the Markdown."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--out", type=Path, default=out)
    for flag, kw in (options or {}).items():
        p.add_argument(flag, **kw)
    a = p.parse_args()
    names = [flag.lstrip("-").replace("-", "_") for flag in options or {}]
    extra = {name: getattr(a, name) for name in names}
    try:
        result = measure(a.repo, a.images, a.out, a.rounds, a.seconds, a.connections, **extra)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "report.json").write_text(json.dumps(result, indent=2))
    (a.out / "report.md").write_text(markdown(result))
    print(markdown(result))


def stop_baseline(baseline: subprocess.Popen) -> None:
    """Stop the baseline server: SIGTERM, and SIGKILL if it is not gone within 10 s."""
    baseline.terminate()
    try:
        baseline.wait(10)
    except subprocess.TimeoutExpired:
        baseline.kill()
        baseline.wait()


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
