"""Instances and threads of the served model, side by side: how the cores are split among batches.

    python -m perf.instances --repo .cache/workloads/resnet50-photos/repo --images .cache/workloads/data/photos/val

The repository's model and settings served three ways at once under one load generator (wrk, perf/fair.py,
alternating rounds): the classifier's instances x engine threads each, on this machine's cores. Several
single-threaded instances overlap one batch's decoding with another's inference; one instance with a
thread per core finishes each batch sooner. Throughput and p99 of each, with their spread.
"""

from __future__ import annotations

import os
from pathlib import Path

from perf.common import REPORTS
from perf.fair import Variant, variants, variants_main


def splits(cores: int | None = None) -> tuple[Variant, ...]:
    """(instances, threads) splits of the cores: the default (3 x 1), one instance per core, one with them all."""
    cores = cores or os.cpu_count() or 1
    out = [("3 instances x 1 thread (default)", 3, 1), (f"{cores} instances x 1 thread", cores, 1),
           (f"1 instance x {cores} threads", 1, cores)]
    seen: set[tuple[int, int]] = set()
    result: list[Variant] = []
    for name, n, t in out:
        if (n, t) not in seen:
            seen.add((n, t))
            result.append((name, {"classifier_instances": n, "intra_op_threads": t}, {}))
    return tuple(result)


def measure(repo: Path, image_dir: Path, out: Path, rounds: int = 3, seconds: int = 10,
            connections: int = 16) -> dict:
    return variants(repo, image_dir, out, splits(), rounds, seconds, connections)


if __name__ == "__main__":
    variants_main("The served model's instances x threads, side by side", REPORTS / "instances", measure)
