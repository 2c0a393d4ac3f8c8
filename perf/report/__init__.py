"""One command, one load-testing report: `make report` -> perf/reports/<timestamp>/report.{html,md}.

In one run on this machine: the in-process ceiling (and DALI vs Pillow preprocessing), the real
Triton server under perf_analyzer (concurrency sweeps over HTTP and gRPC, a request-rate sweep) and
under locust (HTTP and gRPC users), and the naive Flask + PyTorch baseline under the same locust
load with the same JPEGs. Headline ratios come first; every figure is a measurement of this run.

    python -m perf.report --repo model_repository --images data/synthetic/val [--quick]

A running server instead (a deployment: nothing started or stopped, the parts that need a local server left out
with why, the inference key and gRPC TLS as the client sends them, what was measured as the server reports it):

    python -m perf.report --url triton.example.com:8001 --protocol grpc --tls-root-cert ca.pem --parts perf,loadtest

Split by what each step does: measure.py (run everything, one dict of figures), analysis.py (headline
ratios and verdicts), plots.py (figures), render.py (Markdown, and HTML through a template).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from clients.cli import add_tls_arguments, tls_options
from clients.keys import INFERENCE
from perf.load.deployment import PROTOCOLS, Deployment, DeploymentError
from perf.paths import REPORTS
from perf.reference.baseline_process import start_baseline
from perf.report.analysis import headline
from perf.report.measure import FULL, QUICK, Profile, measure_all, measure_deployment
from perf.report.plots import plots
from perf.report.render import markdown, to_html

PARTS = Profile().parts

__all__ = ["FULL", "QUICK", "Profile", "main", "run", "start_baseline"]


def run(repo: Path, images: Path, out_root: Path = REPORTS, profile: Profile = FULL,
        tuning_json: Path | None = None, browser: bool = True, workloads: tuple[str, ...] = (),
        workload_args: dict | None = None, deployment: Deployment | None = None,
        metrics_url: str | None = None) -> Path:
    """``workloads``: also measure these (perf/report/workloads.py) in this run, with ``workload_args`` (its
    measure()'s keyword arguments: work, demo_ckpt, demo_data, rounds, seconds, connections, ...).
    ``deployment``: measure that running server instead of serving ``repo`` (measure_deployment; ``repo`` unused,
    no workloads or tuning sweep: those are local servers' figures); ``metrics_url``: its Prometheus endpoint."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = out_root / stamp
    out.mkdir(parents=True, exist_ok=True)
    if deployment is None:
        r = measure_all(repo, images, out, profile)
    else:
        for what, asked in (("workloads", workloads), ("the batching sweep", tuning_json and tuning_json.exists())):
            if asked:
                print(f"left out: {what}: measured on servers started here, not on the deployment")
        workloads, tuning_json = (), None
        try:
            r = measure_deployment(deployment, images, out, profile, metrics_url)
        except DeploymentError:  # refused before anything was measured: no empty report folder left behind
            with contextlib.suppress(OSError):
                out.rmdir()
            raise
    if workloads:
        from perf.report import workloads as w

        r["workloads"] = w.measure(list(workloads), out=out / "workloads", **(workload_args or {}))
    r["timestamp"], r["out"] = stamp, str(out)
    tuning = json.loads(tuning_json.read_text()) if tuning_json and tuning_json.exists() else None
    h = headline(r)
    r["headline"] = h
    (out / "results.json").write_text(json.dumps(r, indent=2, default=str))
    md = markdown(r, h, plots(r, out, tuning), tuning)
    (out / "report.md").write_text(md)
    title = f"Load-testing report {stamp}" + (f": {deployment.url}" if deployment else "")
    (out / "report.html").write_text(to_html(md, title))
    print("\n".join(md.splitlines()[:8]))
    print(f"\nwrote {out / 'report.html'} and {out / 'report.md'}")
    if browser:  # seen, not assumed: the page in a real browser, its figures counted, a screenshot kept
        from perf.report.browser import check

        seen = check(out / "report.html", out / "report.png")
        print(f"headless Chromium: {seen['loaded']} of {seen['images']} figures loaded, {seen['tables']} tables; "
              f"screenshot {seen['screenshot']}")
        if seen["loaded"] != seen["images"]:
            raise RuntimeError(f"{out / 'report.html'}: only {seen['loaded']} of {seen['images']} figures loaded")
    return out


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Measure everything and write perf/reports/<timestamp>/report.{html,md}")
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--images", type=Path, default=Path("data/synthetic/val"))
    p.add_argument("--out", type=Path, default=REPORTS)
    p.add_argument("--tuning", type=Path, default=REPORTS / "tuning" / "tuning.json",
                   help="include this batching sweep (written by `make tune`) if it exists")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke profile instead of the full sweep")
    p.add_argument("--parts", default=",".join(PARTS), help="comma list of ceiling (in-process), perf "
                   "(perf_analyzer), loadtest (locust + baseline), compare (every server under wrk: "
                   "perf/reference/compare.py)")
    p.add_argument("--layouts", help="compare: other layouts of the same model (default postprocess; '' none)")
    p.add_argument("--peers", help="compare: peer servers (default ray,bentoml; '' none; `make peers` installs them)")
    p.add_argument("--compare-rounds", type=int, help="compare: rounds (default 3)")
    p.add_argument("--compare-seconds", type=int, help="compare: seconds per server and round (default 10)")
    p.add_argument("--no-browser", action="store_true", help="do not check the page in headless Chromium")
    p.add_argument("--workloads", default="", help="also measure these workloads in this run "
                   "(perf/report/workloads.py; comma-separated, e.g. demo-photos,resnet50-photos; 'all': every one)")
    p.add_argument("--ckpt", type=Path, default=Path("artifacts/best.pt"), help="workloads: the demo checkpoint")
    p.add_argument("--data", type=Path, default=Path("data/synthetic"), help="workloads: the demo data set")
    p.add_argument("--concurrency", type=int, nargs="*", help="perf_analyzer concurrencies (default 1 2 4 8 16 32)")
    p.add_argument("--users", type=int, help="locust users (default 16)")
    p.add_argument("--duration", type=int, help="locust seconds per run (default 20)")
    # a running server (a deployment): nothing is started or stopped, --repo is not read
    p.add_argument("--url", help="measure the running server at host:port (its --protocol endpoint) instead of "
                   f"serving --repo; the inference key is sent from ${INFERENCE.env}, else its key file "
                   f"(${INFERENCE.file_env}, default {INFERENCE.file()})")
    p.add_argument("--protocol", choices=PROTOCOLS, default="http", help="--url's protocol (default http)")
    add_tls_arguments(p)  # --url over gRPC
    p.add_argument("--metrics-url", help="--url's Prometheus endpoint (http://host:8002/metrics), scraped around "
                   "each perf_analyzer point")
    return p


def main(a: argparse.Namespace) -> Path:
    profile = QUICK if a.quick else FULL
    parts = tuple(x.strip() for x in a.parts.split(",") if x.strip())
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"error: unknown --parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    overrides = {"parts": parts}
    for flag, field in (("layouts", "compare_layouts"), ("peers", "compare_peers")):
        if getattr(a, flag) is not None:
            overrides[field] = tuple(x for x in getattr(a, flag).split(",") if x)
    if a.compare_rounds:
        overrides["compare_rounds"] = a.compare_rounds
    if a.compare_seconds:
        overrides["compare_seconds"] = a.compare_seconds
    if a.concurrency:
        overrides["concurrency"] = tuple(a.concurrency)
    if a.users:
        overrides["locust_users"] = a.users
    if a.duration:
        overrides["locust_seconds"] = a.duration
    profile = Profile(**{**asdict(profile), **overrides})
    from perf.report.workloads import WORKLOADS

    deployment = None
    tls = tls_options(a)
    try:
        if a.url:
            deployment = Deployment.from_environment(a.url, a.protocol, tls)
        elif tls or a.metrics_url:
            raise DeploymentError("--tls*, --metrics-url: options of --url (a running server)")
    except DeploymentError as e:
        raise SystemExit(f"error: {e}") from None
    names = tuple(WORKLOADS) if a.workloads == "all" else tuple(x for x in a.workloads.split(",") if x)
    if unknown := set(names) - set(WORKLOADS):
        raise SystemExit(f"error: unknown --workloads {sorted(unknown)}; choose from {', '.join(WORKLOADS)}")
    workload_args = {"work": Path(".cache/workloads"), "demo_ckpt": a.ckpt, "demo_data": a.data,
                     "rounds": profile.compare_rounds, "seconds": profile.compare_seconds,
                     "peers": profile.compare_peers}
    try:
        return run(a.repo, a.images, a.out, profile, a.tuning, not a.no_browser, names, workload_args, deployment,
                   a.metrics_url)
    except DeploymentError as e:  # unreachable, TLS, a key refused: the reason and the fix, no traceback
        raise SystemExit(f"error: {e}") from None
