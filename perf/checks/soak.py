"""Soak: a steady load for a long time, watching for leaks and drift.

    python -m perf.checks.soak --repo model_repository --images data/synthetic/val --duration 600   # make soak

Closed-loop clients (HTTP and gRPC in turn, perf.checks.reliability's workers) keep sending for ``duration``
seconds while a sampler reads, every second, the resident memory and open file descriptors of
tritonserver and its Python-backend stubs (/proc). Afterwards:

- every request must have been answered (0 errors of any kind);
- memory and descriptors must be flat: a straight line fitted over the steady part (after the first
  window, when allocators and connection pools settle) may add at most RSS_ALLOWANCE_MIB and
  FD_ALLOWANCE over the whole run; the slopes are reported per minute;
- latency percentiles and throughput per window (a minute by default) are tabled and plotted.

Writes perf/reports/soak/report.{json,md} and soak.png; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from perf.checks.reliability import OUTCOMES, background_load, counts, examples, to_batches
from perf.load.bodies import sample_images
from perf.paths import REPORTS
from serve.server import TritonServer
from serve.watchdog import children

RSS_ALLOWANCE_MIB = 16.0  # the fitted trend may add this much resident memory over the whole run
FD_ALLOWANCE = 4          # ... and this many open file descriptors
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Sample:
    t: float          # seconds since the load started
    rss_mib: float    # tritonserver + its stubs
    fds: int
    processes: int


def sample(pid: int) -> tuple[float, int, int]:
    """(resident MiB, open descriptors, processes) of ``pid`` and its children."""
    rss, fds, n = 0, 0, 0
    for p in (pid, *children(pid)):
        try:
            rss += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE
            fds += len(os.listdir(f"/proc/{p}/fd"))
            n += 1
        except (OSError, IndexError, ValueError):  # a stub that is being replaced
            pass
    return rss / 2**20, fds, n


def trend(ts: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over ts (units per second); 0 with fewer than 3 points."""
    return float(np.polyfit(ts, ys, 1)[0]) if len(ts) >= 3 else 0.0


def windows(calls, start: float, duration_s: float, window_s: float) -> list[dict]:
    """Per window of ``window_s`` (by send time): requests, answers/s, errors, latency percentiles (ms)."""
    out = []
    for i in range(int(np.ceil(duration_s / window_s))):
        lo, hi = start + i * window_s, start + min((i + 1) * window_s, duration_s)
        sel = [c for c in calls if lo <= c.sent < hi]
        ok = [1000 * (c.done - c.sent) for c in sel if c.outcome == "ok"]
        pct = {f"p{q}_ms": round(float(np.percentile(ok, q)), 1) if ok else None for q in (50, 90, 99)}
        out.append({"start_s": round(lo - start, 1), "requests": len(sel),
                    "answered_per_s": round(len(ok) / (hi - lo), 1), "errors": len(sel) - len(ok), **pct})
    return out


def soak(server: TritonServer, images: list[bytes], duration_s: float, workers: int = 4, batch: int = 4,
         window_s: float = 60.0, sample_s: float = 1.0) -> dict:
    """Hold ``workers`` closed-loop clients on ``server`` for ``duration_s``; the figures and the verdict."""
    samples: list[Sample] = []
    stop = threading.Event()
    assert server.proc is not None  # running
    pid = server.proc.pid

    def sampler(t0: float) -> None:
        while not stop.is_set():
            rss, fds, n = sample(pid)
            samples.append(Sample(round(time.monotonic() - t0, 2), round(rss, 2), fds, n))
            stop.wait(sample_s)

    stubs = children(pid)
    start = time.monotonic()
    sampling = threading.Thread(target=sampler, args=(start,), daemon=True)
    sampling.start()
    try:
        with background_load(server, to_batches(images, batch), workers) as calls:
            time.sleep(duration_s)
    finally:
        stop.set()
        sampling.join(timeout=10)
    # the steady part: after the first window (or the first fifth of a short run)
    settle = min(window_s, duration_s / 5)
    steady = [s for s in samples if s.t >= settle]
    ts = [s.t for s in steady]
    rss_slope, fd_slope = trend(ts, [s.rss_mib for s in steady]), trend(ts, [s.fds for s in steady])
    span = (ts[-1] - ts[0]) if len(ts) > 1 else 0.0
    c = counts(calls)
    r: dict = {"duration_s": duration_s, "workers": workers, "batch": batch, "window_s": window_s,
               "settle_s": settle,
               "requests": len(calls), **c, "errors": len(calls) - c["ok"],
               "answered_per_s": round(c["ok"] / duration_s, 1),
               "rss_mib": {"first": steady[0].rss_mib if steady else None,
                           "last": steady[-1].rss_mib if steady else None,
                           "max": max((s.rss_mib for s in samples), default=None),
                           "slope_per_min": round(60 * rss_slope, 3), "trend_over_run": round(rss_slope * span, 2),
                           "allowance": RSS_ALLOWANCE_MIB},
               "fds": {"first": steady[0].fds if steady else None, "last": steady[-1].fds if steady else None,
                       "max": max((s.fds for s in samples), default=None),
                       "slope_per_min": round(60 * fd_slope, 3), "trend_over_run": round(fd_slope * span, 2),
                       "allowance": FD_ALLOWANCE},
               "processes": sorted({s.processes for s in samples}), "stubs_same": children(pid) == stubs,
               "windows": windows(calls, start, duration_s, window_s),
               "samples": [s.__dict__ for s in samples],
               "examples": examples(calls, [k for k in OUTCOMES if k != "ok"])}
    r["checks"] = {"no_errors": r["errors"] == 0 and r["ok"] > 0,
                   "rss_flat": len(steady) >= 3 and rss_slope * span <= RSS_ALLOWANCE_MIB,
                   "fds_flat": len(steady) >= 3 and fd_slope * span <= FD_ALLOWANCE,
                   "stubs_same": r["stubs_same"]}  # no stub died (and was replaced) on the way
    r["passed"] = all(r["checks"].values())
    return r


def plot(r: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = r["windows"]
    mid = [x["start_s"] / 60 + r["window_s"] / 120 for x in w]
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for q, style in (("p50", "-o"), ("p90", "-s"), ("p99", "-^")):
        axes[0].plot(mid, [x[f"{q}_ms"] for x in w], style, label=q)
    axes[0].set_ylabel("latency (ms)")
    axes[0].set_title(f"Soak: {r['workers']} clients x batches of {r['batch']}, {r['duration_s']:.0f} s; "
                      f"{r['answered_per_s']} answers/s, {r['errors']} errors")
    axes[0].legend()
    t = [s["t"] / 60 for s in r["samples"]]
    axes[1].plot(t, [s["rss_mib"] for s in r["samples"]])
    axes[1].set_ylabel("resident memory (MiB)")
    axes[1].set_title(f"tritonserver + stubs: trend {r['rss_mib']['slope_per_min']:+.2f} MiB/min", fontsize=9)
    axes[2].plot(t, [s["fds"] for s in r["samples"]])
    axes[2].set_ylabel("open file descriptors")
    axes[2].set_title(f"trend {r['fds']['slope_per_min']:+.2f} /min", fontsize=9)
    axes[2].set_xlabel("minutes")
    for ax in axes:
        ax.axvline(r["settle_s"] / 60, color="grey", linestyle=":", linewidth=1)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render_markdown(r: dict) -> str:
    m, f = r["rss_mib"], r["fds"]
    lines = ["# Soak report", "",
             f"Measured on the real tritonserver, {r.get('when', '')}, repository `{r.get('repo', '')}`: "
             f"{r['workers']} closed-loop clients (HTTP and gRPC in turn, on the same machine) sending batches of "
             f"{r['batch']} JPEGs for {r['duration_s']:.0f} s.", "",
             f"Requests: {r['requests']}, answered {r['ok']} ({r['answered_per_s']}/s), errors {r['errors']}.", "",
             "| resource (server + stubs) | after settling | at the end | max | trend per minute "
             "| trend over the run | allowed |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| resident memory (MiB) | {m['first']} | {m['last']} | {m['max']} | {m['slope_per_min']:+} | "
             f"{m['trend_over_run']:+} | {m['allowance']} |",
             f"| open file descriptors | {f['first']} | {f['last']} | {f['max']} | {f['slope_per_min']:+} | "
             f"{f['trend_over_run']:+} | {f['allowance']} |",
             "", f"Trends are least-squares lines over the samples after the first {r['settle_s']:.0f} s.", "",
             "| window (start, s) | requests | answers/s | errors | p50 (ms) | p90 (ms) | p99 (ms) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {x['start_s']} | {x['requests']} | {x['answered_per_s']} | {x['errors']} | {x['p50_ms']} | "
              f"{x['p90_ms']} | {x['p99_ms']} |"
              for x in r["windows"]]
    lines += ["", "![soak](soak.png)", "",
              "Checks: " + ", ".join(f"{k} {'passed' if v else 'FAILED'}" for k, v in r["checks"].items()), ""]
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Hold a steady load on the real tritonserver; check memory, descriptors, errors")
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--images", type=Path, default=Path("data/synthetic/val"))
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    p.add_argument("--workers", type=int, default=4, help="closed-loop clients")
    p.add_argument("--window", type=float, default=60.0, help="seconds per row of latency percentiles")
    p.add_argument("--out", type=Path, default=REPORTS / "soak")
    return p


def main(args: argparse.Namespace) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    images = [b for _, b in sample_images(args.images, 64)]
    # served as `make serve` serves it: explicit model control, an admin key, the stub watchdog
    with TritonServer(args.repo, None, model_control="explicit", admin_key=secrets.token_urlsafe(24),
                      log_file=args.out / "tritonserver.log") as server:
        print(f"soaking for {args.duration:.0f} s ...", flush=True)
        r = soak(server, images, args.duration, args.workers, window_s=args.window)
    r.update(when=time.strftime("%Y-%m-%d %H:%M"), repo=str(args.repo))
    plot(r, args.out / "soak.png")
    (args.out / "report.json").write_text(json.dumps(r, indent=2))
    (args.out / "report.md").write_text(render_markdown(r))
    print(render_markdown(r))
    print(f"\n{'soak passed' if r['passed'] else 'SOAK FAILED'}; report: {args.out / 'report.md'}")
    return r


if __name__ == "__main__":
    raise SystemExit(0 if main(get_args_parser().parse_args())["passed"] else 1)
