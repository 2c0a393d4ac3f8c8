"""A pruned model against its unpruned original: size, FLOPs, accuracy and served throughput side by side.

    python -m perf.ab pruned --unpruned artifacts/model.onnx --pruned artifacts/pruned --repo model_repository

Reads what `make prune` made in --pruned (best.pt and prune_report.json from training.prune, model.onnx
exported from that best.pt) and checks that both ONNX files come from the checkpoints the pruning
report names. Each model is then served by the real server with the batching settings of --repo and
measured with perf_analyzer from JPEG bytes (the whole ensemble) and from pre-decoded tensors (the
classifier alone, where pruning acts), in rounds whose order alternates (A B, B A, ...) so the drift of a
shared machine hits both alike. Every ratio is pruned / unpruned within one round; the table gives the
median and the range over rounds.

Writes <pruned>/prune_report.{json,md} and, when `make quantize` has written one, the "pruned" rows of
the build report (build_report.json/md beside the unpruned ONNX).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from build.artifacts import REPORT as BUILD_REPORT
from build.quantize import markdown as build_markdown
from build.settings import read_manifest, settings_from_manifest
from core import protocol as P
from core.atomic_io import atomic_write_bytes
from core.metadata import CheckpointSource, file_sha256, read_metadata, source_checkpoint
from core.preprocess import DaliPreprocessor
from perf.load.bodies import sample_images
from perf.load.perf_analyzer import jpeg_and_tensor_inputs, jpegs_and_tensors, rendered_server
from perf.load.stats import machine_info
from training.prune import REPORT

SOURCES = ("jpeg", "tensors")


def check_lineage(unpruned_onnx: Path, pruned_dir: Path, prune_report: dict) -> Path:
    """The pruned ONNX must be exported from the gated <pruned>/best.pt, and the unpruned ONNX from the
    checkpoint that was pruned: otherwise the comparison would be between unrelated models."""
    pruned_onnx = pruned_dir / "model.onnx"
    if not pruned_onnx.is_file():
        raise FileNotFoundError(f"{pruned_onnx} not found: export the pruned checkpoint first "
                                f"(make onnx CKPT={pruned_dir}/best.pt ONNX={pruned_onnx})")
    if source_checkpoint(pruned_onnx).resolve() != (pruned_dir / "best.pt").resolve():
        raise ValueError(f"{pruned_onnx} was not exported from {pruned_dir / 'best.pt'}")
    source = read_metadata(unpruned_onnx).source
    if not isinstance(source, CheckpointSource) or source.checkpoint_sha256 != prune_report["source_sha256"]:
        raise ValueError(f"{unpruned_onnx} was not exported from the checkpoint that was pruned "
                         f"({prune_report['source']}): export it again or prune again")
    return pruned_onnx


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def compare(unpruned_onnx: Path, pruned_dir: Path, repo: Path, images: Path, rounds: int = 3, concurrency: int = 16,
            protocol: str = "grpc", interval_ms: int = 2000, request_count: int = 0) -> dict:
    if rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {rounds}")
    report_path = pruned_dir / REPORT
    if not report_path.is_file():
        raise FileNotFoundError(f"{report_path} not found: run `make prune` (training.prune) first")
    prune_report = json.loads(report_path.read_text())
    if prune_report.get("gate") != "pass":
        raise ValueError(f"{pruned_dir}: the pruned model failed its accuracy gate (see {report_path})")
    onnx = {"unpruned": Path(unpruned_onnx), "pruned": check_lineage(Path(unpruned_onnx), pruned_dir, prune_report)}
    manifest = read_manifest(repo)
    settings = settings_from_manifest(manifest)
    meta = read_metadata(onnx["unpruned"])
    blobs = [b for _, b in sample_images(images)]
    pixels = DaliPreprocessor(meta.preprocess)(blobs)
    inputs = jpeg_and_tensor_inputs(P.PIXELS, blobs, pixels, pruned_dir / "served")

    rows = []
    for r in range(rounds):
        for name in (("unpruned", "pruned") if r % 2 == 0 else ("pruned", "unpruned")):
            # the ensemble layout: the classifier alone takes the pre-decoded tensors (the fused model has none)
            with rendered_server(onnx[name], settings, layout="postprocess") as (server, _):
                assert server.proc is not None  # serving
                url = server.grpc_url if protocol == "grpc" else server.http_url
                for row in jpegs_and_tensors(url, server.http_url, protocol, inputs, [concurrency],
                                             pruned_dir / "served" / f"round{r + 1}_{name}",
                                             server.proc.pid, interval_ms, request_count):
                    rows.append({**row, "round": r + 1, "variant": name})
    served = {"concurrency": concurrency, "protocol": protocol, "rounds": rounds, "machine": machine_info(),
              "settings": manifest["settings"], "results": rows}
    for source in SOURCES:
        per_round = {(x["round"], x["variant"]): x["images_per_s"] for x in rows if x["source"] == source}
        served[source] = {name: spread([v for (_, m), v in per_round.items() if m == name]) for name in onnx}
        served[source]["ratio"] = spread([per_round[(r + 1, "pruned")] / per_round[(r + 1, "unpruned")]
                                          for r in range(rounds)])
    sizes = {name: path.stat().st_size for name, path in onnx.items()}
    artifacts = {
        "unpruned": {"file": str(onnx["unpruned"]), "params": prune_report["unpruned"]["params"],
                     "flops": prune_report["unpruned"]["flops"], "size_bytes": sizes["unpruned"],
                     "top1": prune_report["top1"]["unpruned"], "agreement_with_unpruned": 100.0},
        pruned_dir.name: {"file": str(onnx["pruned"]), "params": prune_report["pruned"]["params"],
                          "flops": prune_report["pruned"]["flops"], "size_bytes": sizes["pruned"],
                          "top1": prune_report["top1"]["pruned"],
                          "agreement_with_unpruned": prune_report["agreement_with_unpruned"],
                          "sparsity": prune_report.get("sparsity", "none"),
                          "served_vs_unpruned": {s: served[s]["ratio"] for s in SOURCES}},
    }
    result = {**prune_report, "served": served, "artifacts": artifacts,
              "unpruned_onnx_sha256": file_sha256(onnx["unpruned"])}
    atomic_write_bytes(report_path, lambda t: t.write_text(json.dumps(result, indent=2)))
    atomic_write_bytes(pruned_dir / "prune_report.md", lambda t: t.write_text(markdown(result)))
    print(f"wrote {pruned_dir / 'prune_report.md'}")
    add_to_build_report(onnx["unpruned"].parent / BUILD_REPORT, pruned_dir.name, result)
    return result


def add_to_build_report(path: Path, name: str, result: dict) -> None:
    """The pruned rows go into the build report `make quantize` wrote for the same unpruned ONNX."""
    if not path.is_file():
        return
    report = json.loads(path.read_text())
    report.setdefault("pruned", {})[name] = {**result["artifacts"][name],
                                             "unpruned": result["artifacts"]["unpruned"],
                                             "unpruned_onnx_sha256": result["unpruned_onnx_sha256"],
                                             "concurrency": result["served"]["concurrency"],
                                             "rounds": result["served"]["rounds"]}
    atomic_write_bytes(path, lambda t: t.write_text(json.dumps(report, indent=2)))
    atomic_write_bytes(path.with_suffix(".md"), lambda t: t.write_text(build_markdown(report)))
    print(f"added {name} to {path} and {path.with_suffix('.md').name}")


def _range(s: dict, fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}–{fmt.format(s['max'])})"


def markdown(r: dict) -> str:
    s = r["served"]
    lines = [f"# Pruned model: {r['checkpoint']}", "",
             f"{r['library']}, {r['importance']} importance, channels rounded to {r['round_to']}; target: "
             + " and ".join(f"{what} ≤ {r[key]}"
                            for what, key in (("FLOPs", "target_flops"), ("parameters", "target_params"))
                            if r.get(key)) + f" of the unpruned model's. Recovery: {r['epochs']} "
             f"epoch(s) of distillation from the unpruned model at lr {r['lr']:g}"
             f"{'; 2:4 sparse weights' if r.get('sparsity') == '2:4' else ''}. Gate: val top-1 at most "
             f"{r['max_top1_drop']} points below the unpruned model's ({r['val_images']} images): **{r['gate']}**. "
             f"Before fine-tuning, the pruned network scored {r['top1']['before_finetune']:.2f}%.", "",
             f"Served with the same batching settings, perf_analyzer over {s['protocol']} at concurrency "
             f"{s['concurrency']}, {s['rounds']} rounds in alternating order; median (min–max) over rounds. "
             "JPEG: the whole ensemble from image bytes; tensors: the classifier alone from pre-decoded inputs.", "",
             "| model | parameters | FLOPs | ONNX size | top-1 % | agreement with unpruned % | served img/s, JPEG | "
             "served img/s, tensors | vs unpruned, JPEG | vs unpruned, tensors |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, a in r["artifacts"].items():
        key = "unpruned" if name == "unpruned" else "pruned"
        ratio = a.get("served_vs_unpruned")
        lines.append(f"| {name} | {a['params'] / 1e3:.0f}K | {a['flops'] / 1e6:.1f}M | "
                     f"{a['size_bytes'] / 2 ** 20:.2f} MiB | "
                     f"{a['top1']:.2f} | {a['agreement_with_unpruned']:.2f} | {_range(s['jpeg'][key])} | "
                     f"{_range(s['tensors'][key])} | "
                     + (f"{_range(ratio['jpeg'], '{:.2f}×')} | {_range(ratio['tensors'], '{:.2f}×')} |"
                        if ratio else "1× | 1× |"))
    lines += ["", "| round | model | source | img/s | p50 ms | p99 ms |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {x['round']} | {x['variant']} | {x['source']} | {x['images_per_s']:.0f} | {x['p50_ms']:.1f} | "
              f"{x['p99_ms']:.1f} |" for x in s["results"]]
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Serve the pruned and the unpruned model side by side and report")
    p.add_argument("--unpruned", type=Path, default=Path("artifacts/model.onnx"), help="the unpruned model's ONNX")
    p.add_argument("--pruned", type=Path, default=Path("artifacts/pruned"), help="what `make prune` wrote")
    p.add_argument("--repo", type=Path, default=Path("model_repository"),
                   help="its build.json gives the batching settings")
    p.add_argument("--images", type=Path, default=Path("data/synthetic/val"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--protocol", choices=("http", "grpc"), default="grpc")
    p.add_argument("--interval-ms", type=int, default=2000)
    p.add_argument("--request-count", type=int, default=0,
                   help="exactly this many requests per measurement instead of stabilizing (smoke runs)")
    return p


def main(a: argparse.Namespace) -> dict:
    try:
        return compare(a.unpruned, a.pruned, a.repo, a.images, a.rounds, a.concurrency, a.protocol, a.interval_ms,
                       a.request_count)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e

