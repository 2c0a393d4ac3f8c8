"""Instances and threads of the served model, side by side: how the cores are split among batches.

    python -m perf.ab instances --repo .cache/workloads/resnet50-photos/repo --images .cache/workloads/data/photos/val

The repository's model and settings served three ways at once under one load generator (wrk, perf/load/wrk.py,
alternating rounds): the classifier's instances x engine threads each, on this machine's cores (one more
instance than cores, one per core, one with every core; and the repository's own split if it is none of them). Several
single-threaded instances overlap one batch's decoding with another's inference; one instance with a
thread per core finishes each batch sooner. Throughput and p99 of each, with their spread.
"""

from __future__ import annotations

import os
from pathlib import Path

from build.settings import read_manifest
from perf.ab.variants import Variant, command, variants
from perf.paths import REPORTS


def splits(cores: int | None = None, rendered: tuple[int, int] | None = None) -> tuple[Variant, ...]:
    """(instances, threads) splits of the cores: one instance more than the cores (what a light model gets:
    build.artifacts fitted_instances), one per core (a costly model's), one with every core; ``rendered``:
    the repository's own split, marked (and added when it is none of these)."""
    cores = cores or os.cpu_count() or 1
    out = [(cores + 1, 1), (cores, 1), (1, cores)]
    if rendered is not None and rendered not in out:
        out.insert(0, rendered)
    result: list[Variant] = []
    for n, t in dict.fromkeys(out):
        name = f"{n} instance{'s' if n > 1 else ''} x {t} thread{'s' if t > 1 else ''}"
        name += " (the repository's)" if (n, t) == rendered else ""
        result.append((name, {"classifier_instances": n, "intra_op_threads": t}, {}))
    return tuple(result)


def measure(repo: Path, image_dir: Path, out: Path, rounds: int = 3, seconds: int = 10,
            connections: int = 16) -> dict:
    s = read_manifest(repo)["settings"]
    return variants(repo, image_dir, out, splits(rendered=(s["classifier_instances"], s["intra_op_threads"])),
                    rounds, seconds, connections)


get_args_parser, main = command("The served model's instances x threads, side by side", REPORTS / "instances", measure)
