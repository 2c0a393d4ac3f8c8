"""What the client library's served metrics cost (clients/metrics.py): the same clients with them on and off.

    python -m perf.ab client-metrics-cost --repo model_repository --images data/synthetic/val
    make client-metrics-cost

The GPU target's default layout has no Python model, so its served metrics come from the client library
(clients/metrics.py). They cost the server nothing; they cost the client a header parse per image, a
summary per answer, and the answer's size: every class's probability, which on the classification layout
is ``class_count`` = the number of classes. So the repository's model is served here in that layout, with
the server's own metrics off (as on the GPU target), and measured by its own load generator, the client
library: ``--clients`` threads, each with its own ImageClassifierClient sending one image per request for
``--seconds``, in alternating rounds with the metrics on (one ClientMetrics shared by the threads, with the
drift window) and off. Per round: images/s and p99 of each, and the ratio on/off, with its spread. Also the
observation alone, timed in-process (microseconds per answered image).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from build.artifacts import rendered_candidate
from build.render_repo import render
from build.settings import read_manifest, rendered_onnx, settings_from_manifest
from clients.client import ImageClassifierClient
from clients.metrics import ClientMetrics, load_reference
from perf.load.bodies import sample_images
from perf.load.stats import spread
from perf.paths import REPORTS
from serve.server import TritonServer
from served import stages


def load(url: str, images: list[bytes], seconds: float, clients: int, metrics: ClientMetrics | None) -> dict:
    """``clients`` threads sending one image per request for ``seconds``: images/s, p50 and p99 in ms."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    stop = time.monotonic() + seconds

    def run(i: int) -> None:
        try:
            with ImageClassifierClient(url, metrics=metrics, timeout_s=30) as c:
                n = i
                while time.monotonic() < stop:
                    t = time.perf_counter()
                    (p,) = c.classify([images[n % len(images)]], ["image"], batch_size=1)
                    if not p.ok:
                        raise RuntimeError(p.error)
                    latencies[i].append(1000 * (time.perf_counter() - t))
                    n += clients
        except BaseException as e:  # reported after the join, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    if errors:
        raise errors[0]
    ms = np.concatenate([np.array(x) for x in latencies])
    return {"images": len(ms), "images_per_s": len(ms) / (time.monotonic() - start),
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99))}


def scrape_registry(metrics: ClientMetrics) -> dict[str, float]:
    """The client's series as {'name{labels}': value}, read back through prometheus_client's own parser."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    return {f"{s.name}{s.labels}": s.value for fam in text_string_to_metric_families(
        generate_latest(metrics.registry).decode()) for s in fam.samples}


def observe_us(metrics: ClientMetrics, url: str, images: list[bytes], n: int = 2000) -> float:
    """Microseconds per answered image of ClientMetrics.observe alone, on real answers of the server."""
    with ImageClassifierClient(url, with_probabilities=True) as c:
        preds = c.classify(images, [f"image{i}" for i in range(len(images))])
    start = time.perf_counter()
    done = 0
    while done < n:
        metrics.observe("model", "1", images, preds)
        done += len(images)
    return 1e6 * (time.perf_counter() - start) / done


def measure(repo: Path, image_dir: Path, out: Path, rounds: int = 3, seconds: int = 10, clients: int = 8) -> dict:
    manifest = read_manifest(repo)
    onnx = rendered_onnx(repo)
    settings = settings_from_manifest(manifest)
    images = [b for _, b in sample_images(image_dir, 64)]
    reference = load_reference(onnx)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {"metrics on": [], "metrics off": []}
    with tempfile.TemporaryDirectory(prefix="client-metrics-") as tmp:
        render(onnx, Path(tmp), replace(settings, served_metrics=0), layout="classification",
               served=rendered_candidate(manifest, onnx))  # the repository's own engine and precision
        with TritonServer(Path(tmp), None, log_file=out / "tritonserver.log") as s:
            metrics = ClientMetrics(reference)
            load(s.http_url, images, 2, clients, None)  # warm-up, not counted
            for r in range(rounds):
                order = ("metrics on", "metrics off") if r % 2 == 0 else ("metrics off", "metrics on")
                for name in order:
                    rows[name].append(load(s.http_url, images, seconds, clients,
                                           metrics if name == "metrics on" else None))
            per_image_us = observe_us(ClientMetrics(reference), s.http_url, images[:16])
    counted = sum(v for k, v in scrape_registry(metrics).items() if k.startswith(stages.METRICS["predictions"][0]))
    ratios = [on["images_per_s"] / off["images_per_s"]
              for on, off in zip(rows["metrics on"], rows["metrics off"], strict=True)]
    return {"repo": str(repo), "layout": "classification", "clients": clients, "rounds": rounds, "seconds": seconds,
            "rows": {k: {m: spread([x[m] for x in v]) for m in ("images_per_s", "p50_ms", "p99_ms")}
                     for k, v in rows.items()},
            "throughput_on_over_off": spread(ratios), "observe_us_per_image": per_image_us,
            # every answer of the rounds with metrics on is counted, once
            "answered_with_metrics": sum(x["images"] for x in rows["metrics on"]), "counted": counted}


def markdown(r: dict) -> str:
    def fmt(s: dict, digits: int = 0) -> str:
        return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}–{s['max']:.{digits}f}]"

    lines = [f"# The client library's served metrics, on and off ({r['clients']} client threads, one image per "
             f"request, {r['rounds']} alternating rounds of {r['seconds']} s, the {r['layout']} layout)", "",
             "| | images/s | p50 ms | p99 ms |", "| --- | ---: | ---: | ---: |"]
    for name, row in r["rows"].items():
        lines.append(f"| {name} | {fmt(row['images_per_s'])} | {fmt(row['p50_ms'], 1)} | {fmt(row['p99_ms'], 1)} |")
    lines += ["", f"Throughput on / off per round: {fmt(r['throughput_on_over_off'], 2)}; the observation alone: "
              f"{r['observe_us_per_image']:.0f} µs per answered image."]
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="The client library's served metrics: their cost to the client")
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--out", type=Path, default=REPORTS / "client_metrics_cost")
    return p


def main(a: argparse.Namespace) -> dict:
    result = measure(a.repo, a.images, a.out, a.rounds, a.seconds, a.clients)
    (a.out / "client_metrics_cost.json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    (a.out / "client_metrics_cost.md").write_text(text)
    print(text)
    return result
