"""Every target measured in alternating rounds by one generator (wrk): the side-by-side harness.

Each round measures every target once, in an order rotated from round to round, after one untimed warm-up
each; a target's figure is the median over the rounds with the range beside it, and the ratios are taken
within each round. `make compare` (perf/reference/compare.py) and the A/B measurements (perf/ab/) run on it.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from perf.load.stats import spread
from perf.load.wrk import Target, check_bodies, run_wrk, write_bodies, wrk_binary


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
