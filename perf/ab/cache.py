"""Triton's response cache on a workload with repeats: hit rate and throughput against the cache off.

    python -m perf.ab cache --repo model_repository --images data/synthetic/val
    make cache-check

The repository's model and settings rendered with the response cache on, served three ways side by side
under the same load generator (wrk, perf/load/wrk.py), alternating rounds: the cache off; on and large enough
for the workload (the same 64 images again and again: after the first pass every request hits); and on
but holding fewer entries than the workload cycles through, so that every lookup misses (what the cache
costs when images never repeat). Each server's hit rate is read from Triton's own cache metrics.
"""

from __future__ import annotations

from pathlib import Path

from core import protocol as P
from perf.ab.variants import Variant, command, variants
from perf.load.stats import scrape_metrics
from perf.paths import REPORTS
from perf.reference.compare_report import render_markdown

# (name, settings changed, server options): off; on with room for every answer; on with room for a few (LRU
# over a cycle longer than the cache: every lookup misses). An answer is a few hundred bytes.
SERVERS: tuple[Variant, ...] = (("cache off", {"response_cache_mb": 0}, {}),
           ("cache on, repeats hit", {"response_cache_mb": 64}, {}),
           ("cache on, every lookup misses", {"response_cache_mb": 1}, {"cache_bytes": 4096}))


def hit_rate(metrics_url: str) -> dict:
    """Hits and misses of the served model, from Triton's own cache metrics."""
    m = scrape_metrics(metrics_url)

    def total(name: str) -> float:
        return sum(v for k, v in m.items() if k.startswith(name + "{") and f'model="{P.ENSEMBLE}"' in k)

    hits, misses = total("nv_cache_num_hits_per_model"), total("nv_cache_num_misses_per_model")
    return {"hits": hits, "misses": misses, "hit_rate": hits / (hits + misses) if hits + misses else None}


def measure(repo: Path, image_dir: Path, out: Path, rounds: int = 3, seconds: int = 10,
            connections: int = 16) -> dict:
    def counted(running: dict) -> dict:
        return {"cache": {name: {"bytes": server.cache_bytes, **hit_rate(server.metrics_url)}
                          for name, server in running.items()}}

    return variants(repo, image_dir, out, SERVERS, rounds, seconds, connections, after=counted)


def markdown(r: dict) -> str:
    lines = [render_markdown(r), "", "| server | cache bytes | hits | misses | hit rate |",
             "| --- | --- | --- | --- | --- |"]
    for name, c in r["cache"].items():
        rate = "–" if c["hit_rate"] is None else f"{100 * c['hit_rate']:.1f}%"
        lines.append(f"| {name} | {c['bytes']} | {c['hits']:.0f} | {c['misses']:.0f} | {rate} |")
    return "\n".join(lines) + "\n"


get_args_parser, main = command("Triton's response cache: hit rate and throughput against it off", REPORTS / "cache",
                                 measure, markdown)
