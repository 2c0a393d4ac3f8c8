"""Batching auto-tuning: the project's own light Model Analyzer.

Sweeps max_queue_delay, preferred batch sizes and instance counts; for each configuration renders a
repository, starts the real server and measures it with perf_analyzer at a fixed concurrency, in
``rounds`` rounds with the order rotated each round, so that one noisy 2-second point cannot pick the
winner: configurations are ranked by their median throughput, with their p99 medians held to the
budget, and each one's spread is kept. The winner is written back to the model repository
(re-rendered with those settings) and the sweep to JSON.

    python -m perf.tuning.tune --onnx artifacts/model.onnx --repo model_repository --p99-budget-ms 50
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from dataclasses import asdict, replace
from pathlib import Path

from build import layouts
from build.render_repo import render
from build.settings import RepoSettings, read_manifest, rendered_onnx, settings_from_manifest
from perf.load.bodies import sample_images
from perf.load.perf_analyzer import measure_rendered, write_input_data

DEFAULT_GRID = {
    "queue_delay_us": [0, 200, 2000],
    "preferred_batch_sizes": [(), (8, 16)],
    "instances": [(1, 1), (2, 1), (1, 2), (2, 2)],  # (preprocess, classifier)
}


def default_grid(layout: str | None) -> dict:
    """A single-model layout (fused): only its instance count (``classifier_instances``) varies."""
    if layout is not None and layouts.get(layout).single_model:
        return {**DEFAULT_GRID, "instances": [(RepoSettings().preprocess_instances, n) for n in (1, 2, 3)]}
    return DEFAULT_GRID


def configurations(base: RepoSettings, grid: dict) -> list[RepoSettings]:
    return [replace(base, queue_delay_us=q, preferred_batch_sizes=tuple(pb), preprocess_instances=i[0],
                    classifier_instances=i[1])
            for q, pb, i in itertools.product(grid["queue_delay_us"], grid["preferred_batch_sizes"], grid["instances"])]


def choose(results: list[dict], p99_budget_ms: float, eligible=lambda r: True) -> tuple[dict, bool]:
    """Best (median) throughput within the budget among the ``eligible`` results; if none meets it, the
    lowest p99 of all (and False). Model Analyzer's winner is chosen by the same rule (perf/tuning/analyze.py)."""
    within = [r for r in results if eligible(r) and r["p99_ms"] <= p99_budget_ms]
    if within:
        return max(within, key=lambda r: r["throughput"]), True
    return min(results, key=lambda r: r["p99_ms"]), False


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def summarize(settings: RepoSettings, rounds: list[dict]) -> dict:
    """One configuration's rounds: medians and the throughput's range."""
    return {"settings": asdict(settings), "throughput": median([p["throughput"] for p in rounds]),
            "throughput_range": [min(p["throughput"] for p in rounds), max(p["throughput"] for p in rounds)],
            "p50_ms": median([p["p50_ms"] for p in rounds]), "p99_ms": median([p["p99_ms"] for p in rounds]),
            "rounds": rounds}


def tune(onnx: Path, images: Path, out_dir: Path, base: RepoSettings | None = None, grid: dict = DEFAULT_GRID,
         concurrency: int = 16, p99_budget_ms: float = 50.0, protocol: str = "grpc", interval_ms: int = 2000,
         apply_to: Path | None = None, request_count: int = 0, layout: str | None = None, rounds: int = 3) -> dict:
    """``request_count`` > 0: each configuration measured on exactly that many requests (no stabilization).
    ``layout``: the embedded repository's layout, measured and written back as it is (None: the default).
    ``rounds``: every configuration measured that many times, the order rotated each round."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    base = base or RepoSettings()
    out_dir.mkdir(parents=True, exist_ok=True)
    input_json = write_input_data([b for _, b in sample_images(images)], out_dir / "perf_analyzer_input.json")
    configs = configurations(base, grid)
    points: list[list[dict]] = [[] for _ in configs]
    for r in range(rounds):
        order = [(i + r) % len(configs) for i in range(len(configs))]
        for i in order:
            settings = configs[i]
            point, _ = measure_rendered(onnx, settings, protocol, concurrency, input_json,
                                        out_dir / f"config_{i:02d}" / f"round_{r + 1}", interval_ms, request_count,
                                        layout)
            points[i].append({"throughput": point.throughput, "p50_ms": point.latency_ms(50),
                              "p99_ms": point.latency_ms(99), "server": point.server, "usage": point.usage})
            print(f"[round {r + 1}, config {i + 1}] delay {settings.queue_delay_us}us preferred "
                  f"{list(settings.preferred_batch_sizes)} instances pre/cls {settings.preprocess_instances}/"
                  f"{settings.classifier_instances}: {point.throughput:.0f} img/s, p99 {point.latency_ms(99):.1f} ms")
    results = [summarize(settings, ps) for settings, ps in zip(configs, points, strict=True)]
    best, met = choose(results, p99_budget_ms)
    summary = {"concurrency": concurrency, "protocol": protocol, "p99_budget_ms": p99_budget_ms, "rounds": rounds,
               "budget_met": met, "best": best, "results": results}
    (out_dir / "tuning.json").write_text(json.dumps(summary, indent=2))
    print(f"best within p99 {p99_budget_ms} ms: {best['throughput']:.0f} img/s, p99 {best['p99_ms']:.1f} ms, "
          f"settings {best['settings']}" if met else f"no configuration met p99 <= {p99_budget_ms} ms; lowest p99 kept")
    if apply_to:
        s = dict(best["settings"], preferred_batch_sizes=tuple(best["settings"]["preferred_batch_sizes"]))
        render(onnx, apply_to, RepoSettings(**s), layout=layout)
        print(f"wrote the chosen configuration back to {apply_to}")
    return summary


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Sweep batching settings and write the best back to the repository")
    p.add_argument("--repo", type=Path, default=Path("model_repository"),
                   help="repository to tune (its build.json names the ONNX)")
    p.add_argument("--images", type=Path, default=Path("data/synthetic/val"))
    p.add_argument("--out", type=Path, default=Path("perf/reports/tuning"))
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--p99-budget-ms", type=float, default=50.0)
    p.add_argument("--protocol", choices=("http", "grpc"), default="grpc")
    p.add_argument("--interval-ms", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3, help="measurements per configuration, in rotated order")
    p.add_argument("--no-apply", action="store_true", help="only report, do not write back")
    return p


class TuneError(ValueError):
    pass


def main(args: argparse.Namespace) -> dict:
    manifest = read_manifest(args.repo)
    if manifest.get("target", "embedded") != "embedded":
        # the sweep serves the embedded (CPU) pipeline: its winner says nothing about a TensorRT plan behind
        # the DALI GPU backend, and writing it back would replace the GPU repository with the embedded one
        raise TuneError(f"{args.repo} is rendered for the {manifest['target']!r} target; this tuner measures the "
                        "embedded (CPU) repository only. Tune a GPU repository on a GPU (Triton Model Analyzer), "
                        "or give its settings to `make repo TARGET=gpu MAX_BATCH=... PREFERRED=...`")
    layout = layouts.of_manifest(manifest).name
    return tune(rendered_onnx(args.repo), args.images, args.out, settings_from_manifest(manifest),
                default_grid(layout), args.concurrency, args.p99_budget_ms, args.protocol, args.interval_ms,
                None if args.no_apply else args.repo, layout=layout, rounds=args.rounds)


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except TuneError as e:
        raise SystemExit(f"error: {e}") from e
