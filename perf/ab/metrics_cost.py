"""What the served metrics cost: the same model served with and without them, side by side.

    python -m perf.metrics_cost --repo model_repository --images data/synthetic/val
    make metrics-cost

The repository's model and settings rendered twice (served_metrics 1 and 0), both servers up, measured
by the same load generator (wrk, perf/fair.py) in alternating rounds: throughput, p50 and p99 of each,
and per round the ratio with metrics to without, with its spread.
"""

from __future__ import annotations

from pathlib import Path

from perf.common import REPORTS
from perf.fair import Variant, variants, variants_main

SERVERS: tuple[Variant, ...] = (("metrics on", {"served_metrics": 1}, {}), ("metrics off", {"served_metrics": 0}, {}))


def measure(repo: Path, image_dir: Path, out: Path, rounds: int = 3, seconds: int = 10,
            connections: int = 16) -> dict:
    return variants(repo, image_dir, out, SERVERS, rounds, seconds, connections)


if __name__ == "__main__":
    variants_main("Throughput and latency with the served metrics on and off", REPORTS / "metrics_cost", measure)
