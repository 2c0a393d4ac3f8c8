"""Goodput under a flood: the answers that do work when far more clients send than the server can serve.

    python -m perf.ab flood --repo model_repository --images data/synthetic/val      # make flood-check

A flood here is wrk with many connections (256 by default), each sending its next request the moment an
answer arrives, a 503 included: the clients of the field that retry at once. Each server is measured at
its capacity (16 connections) and under the flood, in alternating rounds, with the same bodies; goodput is
the flood's 200 answers per second over that round's capacity of the same server. Target: at least 0.8.

Compared: the queue as it was (64 requests per model, then 503 at once) and the queue held by time (the
current default: up to MAX_QUEUE 1024 requests, each rejected once it has waited QUEUE_TIMEOUT_MS). With 64,
the connections beyond the queue are refused at once and resend at once, and refusing tens of thousands of
requests a second takes the cores the work needs. Held by time, a flood of N connections costs at most
N / QUEUE_TIMEOUT_MS refusals a second, and the batches grow with the queue.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from build.settings import RepoSettings, read_manifest
from perf.ab.variants import Variant, command, variant_servers
from perf.load.bodies import sample_images
from perf.load.stats import spread
from perf.load.wrk import check_bodies, run_wrk, write_bodies
from perf.paths import REPORTS

OLD_QUEUE = 64  # the default max_queue_size before the queue was held by time
TARGET_GOODPUT = 0.8


def servers(old_queue: int = OLD_QUEUE) -> tuple[Variant, ...]:
    now = RepoSettings()
    return ((f"queue {old_queue} (refuse at once)", {"max_queue_size": old_queue}, {}),
            (f"queue {now.max_queue_size}, {now.queue_timeout_ms} ms (held by time)",
             {"max_queue_size": now.max_queue_size, "queue_timeout_ms": now.queue_timeout_ms}, {}))


def good_per_s(run: dict) -> float:
    """200 answers per second of a wrk run (wrk counts every other status as a status error)."""
    return (run["requests"] - run["status_errors"]) / run["seconds"]


def measure(repo: Path, image_dir: Path, out: Path, rounds: int = 3, seconds: int = 10, connections: int = 16,
            flood_connections: int = 256, threads: int = 2) -> dict:
    images = [b for _, b in sample_images(image_dir, 64)]
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="flood-bodies-") as tmp, \
            variant_servers(repo, out, servers()) as (targets, _):
        bodies = Path(tmp)
        count = write_bodies(images, "kserve", bodies)
        for t in targets:  # untimed: first requests pay for lazy initialisation
            check_bodies(t, bodies, count)
            run_wrk(t, bodies, count, 2, connections, threads)
            runs[t.name] = []
        for r in range(rounds):
            order = targets[r % len(targets):] + targets[:r % len(targets)]
            for t in order:
                capacity = run_wrk(t, bodies, count, seconds, connections, threads)
                flood = run_wrk(t, bodies, count, seconds, flood_connections, threads)
                if good_per_s(capacity) == 0:
                    raise RuntimeError(f"{t.name} answered nothing at {connections} connections")
                runs[t.name].append({"capacity": capacity, "flood": flood,
                                     "goodput": good_per_s(flood) / good_per_s(capacity)})
    summary = {}
    for name, rs in runs.items():
        summary[name] = {
            "capacity_per_s": spread([good_per_s(x["capacity"]) for x in rs]),
            "capacity_p99_ms": spread([x["capacity"]["p99_us"] / 1e3 for x in rs]),
            "flood_good_per_s": spread([good_per_s(x["flood"]) for x in rs]),
            "flood_refused_per_s": spread([x["flood"]["status_errors"] / x["flood"]["seconds"] for x in rs]),
            "flood_p99_ms": spread([x["flood"]["p99_us"] / 1e3 for x in rs]),
            "flood_generator_cores": spread([x["flood"]["generator_cores"] for x in rs]),
            "goodput": spread([x["goodput"] for x in rs]),
            "other_errors": sum(x["flood"]["errors"] - x["flood"]["status_errors"] for x in rs)}
    return {"when": time.strftime("%Y-%m-%d %H:%M"), "repo": str(repo), "layout": read_manifest(repo)["layout"],
            "images": len(images), "rounds": rounds, "seconds": seconds, "connections": connections,
            "flood_connections": flood_connections, "threads": threads, "summary": summary, "runs": runs,
            "target_goodput": TARGET_GOODPUT}


def verdict(name: str, s: dict, target: float = TARGET_GOODPUT) -> str:
    g = s["goodput"]["median"]
    return (f"{name}: goodput {g:.2f} of capacity, target {target}: " +
            ("met" if g >= target else f"missed by {100 * (target - g) / target:.0f}%"))


def markdown(r: dict) -> str:
    lines = ["# Goodput under a flood", "",
             f"Measured {r['when']} on {r['repo']} ({r['layout']} layout) with wrk ({r['threads']} threads), "
             f"the same {r['images']} JPEGs: capacity at {r['connections']} connections, the flood at "
             f"{r['flood_connections']} connections resending the moment any answer (a 503 too) arrives. "
             f"{r['rounds']} rounds of {r['seconds']} s, the servers in a rotated order; median [range]. "
             "Goodput: the flood's 200 answers per second over the same round's capacity.", "",
             "| queue | capacity img/s | capacity p99 ms | flood: answered img/s | refused /s | flood p99 ms "
             "| generator cores | goodput |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def f(x: dict, digits: int = 0) -> str:
        return f"{x['median']:.{digits}f} [{x['min']:.{digits}f}–{x['max']:.{digits}f}]"

    for name, s in r["summary"].items():
        lines.append(f"| {name} | {f(s['capacity_per_s'])} | {f(s['capacity_p99_ms'])} | {f(s['flood_good_per_s'])} "
                     f"| {f(s['flood_refused_per_s'])} | {f(s['flood_p99_ms'])} | "
                     f"{f(s['flood_generator_cores'], 2)} | {f(s['goodput'], 2)} |")
    lines += ["", *[f"- {verdict(n, s, r['target_goodput'])}" for n, s in r["summary"].items()], ""]
    return "\n".join(lines)


get_args_parser, main = command(__doc__.splitlines()[0], REPORTS / "flood", measure, markdown,
                                 {"--flood-connections": {"type": int, "default": 256}})
