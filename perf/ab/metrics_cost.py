"""What the served metrics cost: the same model served with and without them, side by side.

    python -m perf.ab metrics-cost --repo model_repository --images data/synthetic/val
    make metrics-cost

The repository's model and settings rendered twice (served_metrics 1 and 0), both servers up, measured
by the same load generator (wrk, perf/load/wrk.py) in alternating rounds: throughput, p50 and p99 of each,
and per round the ratio with metrics to without, with its spread.
"""

from __future__ import annotations

from pathlib import Path

from perf.ab.variants import Variant, command, variants
from perf.paths import REPORTS

SERVERS: tuple[Variant, ...] = (("metrics on", {"served_metrics": 1}, {}), ("metrics off", {"served_metrics": 0}, {}))


def measure(repo: Path, image_dir: Path, out: Path, rounds: int = 3, seconds: int = 10,
            connections: int = 16) -> dict:
    return variants(repo, image_dir, out, SERVERS, rounds, seconds, connections)


get_args_parser, main = command("Throughput and latency with the served metrics on and off", REPORTS / "metrics_cost",
                                 measure)
