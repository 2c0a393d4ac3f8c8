"""Served precisions side by side: the same ensemble, batching settings and load, one artifact each.

For every precision asked for (fp32, fp16, int8: the artifacts `make quantize` wrote and gated) a
repository is rendered with the batching settings of --repo (as rendered or tuned), the real server is
started on it and perf_analyzer measures it at one concurrency. Rounds alternate (fp32, int8, fp32,
int8, ...) so that the drift of a shared machine hits every precision alike; each round's throughput is
divided by FP32's in the same round. Writes precisions.json and precisions.md.

    python -m perf.ab precisions --repo model_repository --artifacts artifacts --precisions fp32 int8
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from build.artifacts import artifact_for
from build.settings import read_manifest, settings_from_manifest
from core.atomic_io import atomic_write_bytes
from perf.load.bodies import sample_images
from perf.load.perf_analyzer import measure_rendered, write_input_data
from perf.load.stats import machine_info
from perf.paths import REPORTS

PRECISIONS = ("fp32", "fp16", "int8")


def compare(artifacts: Path, repo: Path, images: Path, out_dir: Path, precisions=("fp32", "int8"), rounds: int = 2,
            concurrency: int = 16, protocol: str = "grpc", interval_ms: int = 2000, request_count: int = 0) -> dict:
    """``request_count`` > 0: each point is exactly that many requests (no stabilization)."""
    if rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {rounds}")
    if "fp32" not in precisions:
        raise ValueError("the comparison is relative to FP32: include fp32 in --precisions")
    # every artifact is found (and the repository's settings read) before any server starts
    onnx = {p: artifact_for(p, artifacts) for p in precisions}
    manifest = read_manifest(repo)
    settings = settings_from_manifest(manifest)
    out_dir.mkdir(parents=True, exist_ok=True)
    input_json = write_input_data([b for _, b in sample_images(images)], out_dir / "perf_analyzer_input.json")
    rows = []
    for r in range(rounds):
        for precision in precisions:
            point, served = measure_rendered(onnx[precision], settings, protocol, concurrency, input_json,
                                             out_dir / f"round{r + 1}_{precision}", interval_ms, request_count)
            rows.append({"round": r + 1, "precision": precision, "onnx": served["onnx"], "settings": served["settings"],
                         "throughput": point.throughput, "p50_ms": point.latency_ms(50), "p99_ms": point.latency_ms(99),
                         "usage": point.usage})
            print(f"round {r + 1} {precision}: {point.throughput:.0f} img/s, p50 {point.latency_ms(50):.1f} ms, "
                  f"p99 {point.latency_ms(99):.1f} ms")
    fp32 = {row["round"]: row["throughput"] for row in rows if row["precision"] == "fp32"}
    for row in rows:
        row["vs_fp32"] = row["throughput"] / fp32[row["round"]]
    summary = {p: {"median_vs_fp32": statistics.median(row["vs_fp32"] for row in rows if row["precision"] == p),
                   "onnx": str(onnx[p])} for p in precisions}
    result = {"repo": str(repo), "settings": manifest["settings"], "concurrency": concurrency,
              "protocol": protocol, "rounds": rounds, "machine": machine_info(), "results": rows, "summary": summary}
    atomic_write_bytes(out_dir / "precisions.json", lambda t: t.write_text(json.dumps(result, indent=2)))
    atomic_write_bytes(out_dir / "precisions.md", lambda t: t.write_text(markdown(result)))
    print(f"wrote {out_dir / 'precisions.md'}")
    return result


def markdown(r: dict) -> str:
    lines = [f"# Served precisions: {r['repo']}", "",
             f"perf_analyzer over {r['protocol']} at concurrency {r['concurrency']}, {r['rounds']} alternating rounds; "
             f"batching settings of the repository: `{json.dumps(r['settings'])}`.", "",
             "| round | precision | img/s | p50 ms | p99 ms | vs FP32 (same round) |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {x['round']} | {x['precision']} | {x['throughput']:.0f} | {x['p50_ms']:.1f} | {x['p99_ms']:.1f} | "
              f"{x['vs_fp32']:.2f}× |" for x in r["results"]]
    lines += ["", "Median ratio to FP32: " + ", ".join(f"{p} {s['median_vs_fp32']:.2f}×"
                                                    for p, s in r["summary"].items()),
              ""]
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Serve each precision with the same settings and compare throughput")
    p.add_argument("--repo", type=Path, default=Path("model_repository"),
                   help="its build.json gives the batching settings")
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"),
                   help="where `make quantize` wrote the artifacts")
    p.add_argument("--images", type=Path, default=Path("data/synthetic/val"))
    p.add_argument("--out", type=Path, default=REPORTS / "precisions")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["fp32", "int8"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--protocol", choices=("http", "grpc"), default="grpc")
    p.add_argument("--interval-ms", type=int, default=2000)
    return p


def main(a: argparse.Namespace) -> dict:
    try:
        return compare(a.artifacts, a.repo, a.images, a.out, tuple(dict.fromkeys(a.precisions)), a.rounds,
                       a.concurrency, a.protocol, a.interval_ms)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e

