"""The work users bring, side by side: 224-px models on real photos, next to the demo model.

    python -m perf.report.workloads --work .cache/workloads
    make workloads

Each workload is a model and a set of JPEGs:

    demo-synthetic     the demo model (resnet_tiny, 64 px; CKPT) on the synthetic val JPEGs (~5 KB)
    demo-photos        the same model on real photographs of ImageNet-like size (500x375, ~90 KB:
                       training.real_datasets "photos")
    resnet50-photos    ResNet-50 at 224 px on those photographs
    mobilenet-photos   torchvision's MobileNetV3-Large at 224 px (a depthwise CNN) on them
    convnext-photos    timm's ConvNeXt-Nano at 224 px (a modern CNN) on them
    vit-photos         timm's ViT-Small/16 at 224 px (a vision transformer) on them

A 224-px model is trained here for ``--epochs`` (1) from scratch: this measures speed, not accuracy (no
weights can be downloaded on these machines). The architecture table beside it gives each model's
parameters, top-1 on the photos' val split in FP32 and as served, the drop of every INT8 candidate (with
the layers INT8 recovery kept in FP32), the engine served and its throughput. Each one is exported,
quantized with every engine x precision scored and gated (``make quantize``), and served at
``--precision`` (auto: the fastest candidate that passed). Then, per workload, side by side under one
load generator (wrk, alternating rounds: perf/load/rounds.py): Triton, the naive baseline on the same
checkpoint, the peers if asked, and the in-process ceiling on the served engine, measured at each
round's start. The table gives throughput, p99, Triton / ceiling and Triton / baseline with their
spreads, and the engine each workload served.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from build import quantize
from build.artifacts import REPORT, candidate_name, served_for
from build.export_onnx import export
from build.gate import DEFAULT_MIN_AGREEMENT, DEFAULT_MIN_TOP5_OVERLAP
from build.render_repo import fit_to_cost, render
from build.settings import RepoSettings
from perf.load.bodies import sample_images
from perf.load.wrk import Target, latency_sweep, saturation, within_budget
from perf.paths import REPORTS
from perf.reference.compare import side_by_side
from training import train
from training.real_datasets import write_imagefolder

# the targets of the performance issue for the served path against the in-process ceiling
TARGET_CEILING = {"demo": 0.85, "224": 0.9}
PEER_TARGET = 1.5  # Triton against the best peer on each workload, at lower p99
SWEEP = (1, 2, 4, 8, 16, 32)  # connections of the p99-against-concurrency sweep (Triton alone)


@dataclass(frozen=True)
class Workload:
    name: str
    arch: str | None     # None: the demo checkpoint (CKPT), as `make demo` trained it
    img_size: int
    images: str          # "synthetic" (the demo's val split) or "photos"


WORKLOADS = {w.name: w for w in (
    Workload("demo-synthetic", None, 64, "synthetic"),
    Workload("demo-photos", None, 64, "photos"),
    Workload("resnet50-photos", "resnet50", 224, "photos"),
    Workload("mobilenet-photos", "torchvision:mobilenet_v3_large", 224, "photos"),
    Workload("convnext-photos", "timm:convnext_nano", 224, "photos"),
    Workload("vit-photos", "timm:vit_small_patch16_224", 224, "photos"),
)}
INT8_CANDIDATES = ("int8_ort", "openvino_int8_ort", "int8", "openvino_int8")


def prepare(w: Workload, work: Path, demo_ckpt: Path, demo_data: Path, epochs: int, precision: str,
            max_top1_drop: float = 100.0) -> tuple[Path, Path, Path, str]:
    """(served repository, checkpoint, image folder, the candidate served) for ``w``: trained, exported,
    quantized and rendered in ``work/<name>`` unless that was done before."""
    photos = write_imagefolder("photos", work / "data" / "photos")
    images = demo_data / "val" if w.images == "synthetic" else photos / "val"
    out = work / w.name
    repo = out / "repo"
    if w.arch is None:
        ckpt, data = demo_ckpt, demo_data
    else:
        ckpt, data = out / "best.pt", photos
        if not ckpt.is_file():
            train.main(train.parse_args(["--data", str(data), "--out", str(out), "--arch", w.arch, "--img-size",
                                         str(w.img_size), "--epochs", str(epochs), "--batch-size", "16",
                                         "--quiet"]))
    onnx = out / "model.onnx"
    if not (out / "build_report.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        export(ckpt, data, onnx)
        # by default the gate is wide open: a model trained for one epoch has no accuracy to keep (the report
        # states each drop); with a gate, what fails it (after INT8 recovery) is not served, the rest is. The
        # agreement bounds open and close with it: 35 val images make one changed answer 2.9% of agreement
        wide_open = max_top1_drop >= 100.0
        try:
            quantize.build(onnx, data, out, calib_size=64, max_top1_drop=max_top1_drop,
                           min_agreement=0.0 if wide_open else DEFAULT_MIN_AGREEMENT,
                           min_top5_overlap=0.0 if wide_open else DEFAULT_MIN_TOP5_OVERLAP)
        except quantize.AccuracyGateError as e:
            print(f"{w.name}: {e}")
    path, served = served_for(precision, out)
    render(path, repo, fit_to_cost(RepoSettings(), out, served), served=served)  # as `make repo` renders it
    name = candidate_name(served)
    assert name is not None  # served_for returns one of CANDIDATES
    return repo, ckpt, images, name


def sweep(repo: Path, image_dir: Path, out: Path, concurrencies: tuple[int, ...], seconds: int,
          p99_budget_ms: float) -> dict:
    """Triton alone on the workload's repository: p99 against concurrency, and the highest within the budget."""
    from core import protocol as P
    from serve.server import TritonServer

    images = [b for _, b in sample_images(image_dir, 64)]
    with TritonServer(repo, None, log_file=out / "tritonserver-sweep.log") as s:
        rows = latency_sweep(Target("triton", f"http://{s.http_url}", f"/v2/models/{P.ENSEMBLE}/infer", "kserve"),
                             images, concurrencies, seconds)
    best = within_budget(rows, p99_budget_ms)
    return {"rows": rows, "p99_budget_ms": p99_budget_ms, "highest_within_budget": best and best["concurrency"],
            "saturation": saturation(rows)}


def measure(names: list[str], work: Path, demo_ckpt: Path, demo_data: Path, out: Path, epochs: int = 1,
            precision: str = "auto", rounds: int = 3, seconds: int = 10, connections: int = 16,
            peers: tuple[str, ...] = (), max_top1_drop: float = 100.0, concurrencies: tuple[int, ...] = SWEEP,
            p99_budget_ms: float = 50.0) -> dict:
    results, failed = {}, {}
    for name in names:
        w = WORKLOADS[name]
        try:
            repo, ckpt, images, candidate = prepare(w, work, demo_ckpt, demo_data, epochs, precision, max_top1_drop)
        except (FileNotFoundError, ValueError, RuntimeError) as e:  # one model's failure costs only its row
            print(f"{name}: not measured: {type(e).__name__}: {e}")
            failed[name] = f"{type(e).__name__}: {e}"
            continue
        print(f"{name}: side by side ...")
        t0 = time.perf_counter()
        r = side_by_side(repo, ckpt, images, out / name, rounds, seconds, connections, peers=peers)
        latency = sweep(repo, images, out / name, concurrencies, max(1, seconds // 2), p99_budget_ms)
        manifest = json.loads((repo / "build.json").read_text())
        report = json.loads((work / name / REPORT).read_text()) if w.arch is not None else None
        results[name] = {"workload": w.__dict__, "engine": manifest["engine"], "precision": manifest["precision"],
                         "compare": r, "latency": latency, "seconds": round(time.perf_counter() - t0),
                         "build": report,
                         "served_candidate": candidate}
    return {"when": time.strftime("%Y-%m-%d %H:%M"), "workloads": results, "not_measured": failed}


def _cell(d: dict, digits: int = 2) -> str:
    return f"{d['median']:.{digits}f} [{d['min']:.{digits}f}–{d['max']:.{digits}f}]"


def _missed(value: float, target: float) -> str:
    return "met" if value >= target else f"missed by {100 * (1 - value / target):.0f}%"


def _peers(summary: dict) -> list[str]:
    """The peer servers of a side-by-side summary: neither Triton (any layout), the baseline nor the ceiling."""
    return [k for k in summary if not k.startswith("triton") and k not in ("baseline", "in-process ceiling")]


def targets(x: dict, cores: int) -> dict:
    """One workload's targets, each met or missed by how much, and for a miss where the time goes (computed
    from the same run's figures)."""
    s, ratios = x["compare"]["summary"], x["compare"]["throughput_ratios"]
    triton = next(k for k in s if k.startswith("triton"))
    target = TARGET_CEILING["demo" if x["workload"]["arch"] is None else "224"]
    ceiling, ceiling_rate = ratios[f"{triton} / in-process ceiling"], s["in-process ceiling"]["images_per_s"]
    out: dict = {"triton": triton, "ceiling": (ceiling, target, _missed(ceiling["median"], target))}
    why = []
    if ceiling["median"] < target:
        # ms of one core per image: what the server spends beyond the engine's own work in the ceiling
        served_ms = 1000 * cores / s[triton]["images_per_s"]["median"]
        engine_ms = 1000 * cores / ceiling_rate["median"]
        why.append(f"the served path spends {served_ms:.2f} ms of a core per image against the ceiling's "
                   f"{engine_ms:.2f} ms: {served_ms - engine_ms:.2f} ms per request in HTTP parsing, the Python "
                   f"stub's request handling and the batcher, which the in-process loop does not pay")
    peers = _peers(s)
    if peers:
        best = max(peers, key=lambda k: s[k]["images_per_s"]["median"])
        vs = ratios[f"{triton} / {best}"]
        out["peer"] = (best, vs, PEER_TARGET, _missed(vs["median"], PEER_TARGET))
        if vs["median"] < PEER_TARGET:
            share = s[best]["images_per_s"]["median"] / ceiling_rate["median"]
            why.append(f"{best} runs the same engine and reaches {share:.2f} of the ceiling; where it reaches "
                       f"more than 1 / {PEER_TARGET} of it, no server can be {PEER_TARGET}x faster"
                       if share > 1 / PEER_TARGET else
                       f"{best} reaches {share:.2f} of the ceiling and Triton {ceiling['median']:.2f}")
    p99, base_p99 = s[triton]["p99_ms"]["median"], s["baseline"]["p99_ms"]["median"]
    out["p99"] = (p99, base_p99, "met" if p99 < base_p99 else f"missed: {p99:.0f} ms against {base_p99:.0f}")
    out["why"] = why
    return out


def markdown(r: dict, cores: int | None = None) -> str:
    """Each workload with its engine, Triton, the peers, the baseline and the ceiling (medians [range] over the
    rounds), the targets met or missed by how much, and below the table where the time goes for each miss."""
    cores = cores or os.cpu_count() or 1
    peers = sorted({k for x in r["workloads"].values() for k in _peers(x["compare"]["summary"])})
    lines = ["| workload | model | served | Triton img/s | p99 ms | " + "".join(f"{p} img/s | " for p in peers)
             + "baseline img/s (p99 ms) | ceiling img/s | Triton / ceiling (target) | Triton / best peer (target) | "
               "Triton / baseline | p99 under the baseline's |",
             "| --- | --- | --- | --- | --- | " + "--- | " * len(peers) + "--- | --- | --- | --- | --- | --- |"]
    notes = []
    for name, x in r["workloads"].items():
        s, ratios = x["compare"]["summary"], x["compare"]["throughput_ratios"]
        g = targets(x, cores)
        triton = g["triton"]
        ceiling, target, met = g["ceiling"]
        peer = "–"
        if "peer" in g:
            best, vs, peer_target, peer_met = g["peer"]
            peer = f"{_cell(vs)} ({best}; ≥ {peer_target}: {peer_met})"
        peer_cells = "".join(f"{_cell(s[p]['images_per_s'], 1)} | " if p in s else "– | " for p in peers)
        lines.append(f"| {name} | {x['workload']['arch'] or 'resnet_tiny (demo)'} @ {x['workload']['img_size']} | "
                     f"{x['engine']} {x['precision']} | {_cell(s[triton]['images_per_s'], 1)} | "
                     f"{_cell(s[triton]['p99_ms'], 1)} | {peer_cells}{_cell(s['baseline']['images_per_s'], 1)} "
                     f"({s['baseline']['p99_ms']['median']:.0f}) | "
                     f"{_cell(s['in-process ceiling']['images_per_s'], 1)} | "
                     f"{_cell(ceiling)} (≥ {target}: {met}) | {peer} | {_cell(ratios[f'{triton} / baseline'])} | "
                     f"{g['p99'][2]} |")
        notes += [f"- {name}: {why}." for why in g["why"]]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def latency_markdown(r: dict) -> str:
    """p99 against concurrency per workload (Triton alone), and the highest concurrency within the budget."""
    rows = [x for x in r["workloads"].values() if "latency" in x]
    if not rows:
        return ""
    cs = [p["concurrency"] for p in rows[0]["latency"]["rows"]]
    budget = rows[0]["latency"]["p99_budget_ms"]
    lines = ["| workload | " + " | ".join(f"p99 ms at {c}" for c in cs) + f" | highest within {budget:g} ms |",
             "| --- | " + " | ".join("---:" for _ in cs) + " | ---: |"]
    for name, x in r["workloads"].items():
        if "latency" not in x:
            continue
        best = x["latency"]["highest_within_budget"]
        lines.append(f"| {name} | " + " | ".join(f"{p['p99_ms']:.1f} ({p['images_per_s']:.0f}/s)"
                                                  for p in x["latency"]["rows"])
                     + f" | {best if best is not None else 'none'} |")
    return "\n".join(lines) + "\n"


def saturation_markdown(r: dict) -> str:
    """Per workload, in one run: Triton's highest throughput over the sweep's concurrencies and its p99 at the
    lowest concurrency reaching 90% of it, beside the in-process limit of the same engine (the side-by-side
    ceiling, median [range] over its rounds) and of the fastest engine make quantize measured in-process."""
    lines = ["| workload | Triton peak img/s (at concurrency) | p99 ms at 90% of it (concurrency) | same engine "
             "in-process img/s | Triton peak / same engine | fastest engine in-process img/s | Triton peak / fastest |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, x in r["workloads"].items():
        sat = x.get("latency", {}).get("saturation")
        if not sat:
            continue
        ceiling = x["compare"]["summary"]["in-process ceiling"]["images_per_s"]
        fastest, best_cell, best_ratio = None, "–", "–"
        if x.get("build"):
            arts = x["build"]["artifacts"]
            fastest = max((n for n in arts if n not in x["build"]["gate_failures"]),
                          key=lambda n: arts[n]["latency"]["best_images_per_s"])
            rate = arts[fastest]["latency"]["best_images_per_s"]
            best_cell, best_ratio = f"{rate:.0f} ({fastest})", f"{sat['peak_images_per_s'] / rate:.2f}"
        lines.append(f"| {name} | {sat['peak_images_per_s']:.0f} ({sat['peak_concurrency']}) | "
                     f"{sat['p99_ms']:.1f} ({sat['concurrency']}) | {_cell(ceiling, 0)} | "
                     f"{sat['peak_images_per_s'] / ceiling['median']:.2f} | {best_cell} | {best_ratio} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def architectures_markdown(r: dict) -> str:
    """The 224-px models' table: parameters, top-1, every INT8 candidate's drop, the engine served and speed."""
    lines = ["| model | parameters | val top-1 FP32 | served (top-1) | INT8 drop, points: ORT / OpenVINO on ORT's "
             "file / ModelOpt's / OpenVINO on ModelOpt's | kept in FP32 | Triton img/s | p99 ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for x in r["workloads"].values():
        b = x.get("build")
        if not b:
            continue
        arts, fp32 = b["artifacts"], b["artifacts"]["fp32"]["top1"]
        drops = " / ".join(f"{fp32 - arts[c]['top1']:.1f}" if c in arts else "–" for c in INT8_CANDIDATES)
        kept = "; ".join(f"{n}: {len(t['tries'][-1]['kept_fp32'])} layers" if t["recovered"] else f"{n}: not recovered"
                         for n, t in b.get("int8_recovery", {}).items()) or "none"
        served = x["served_candidate"]
        top1 = arts.get(served, {}).get("top1")
        s = x["compare"]["summary"]
        triton = next(k for k in s if k.startswith("triton"))
        lines.append(f"| {x['workload']['arch']} @ {x['workload']['img_size']} | "
                     f"{b['model']['parameters'] / 1e6:.1f}M | "
                     f"{fp32:.1f}% | {served} ({'–' if top1 is None else f'{top1:.1f}%'}) | {drops} | {kept} | "
                     f"{s[triton]['images_per_s']['median']:.1f} | {s[triton]['p99_ms']['median']:.0f} |")
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="The demo and 224-px workloads on real photos, side by side")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--work", type=Path, default=Path(".cache/workloads"))
    p.add_argument("--ckpt", type=Path, default=Path("artifacts/best.pt"), help="the demo model's checkpoint")
    p.add_argument("--data", type=Path, default=Path("data/synthetic"), help="the demo model's data set")
    p.add_argument("--epochs", type=int, default=1, help="training epochs of the 224-px models (speed, not accuracy)")
    p.add_argument("--precision", default="auto", help="what each workload serves (make repo's PRECISION)")
    p.add_argument("--max-top1-drop", type=float, default=100.0,
                   help="the 224-px models' accuracy gate, in points (default: open, for speed only)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--peers", default="", help="comma-separated peers to measure too (ray, bentoml)")
    p.add_argument("--concurrency", type=int, nargs="+", default=list(SWEEP),
                   help="connections of the p99-against-concurrency sweep")
    p.add_argument("--p99-budget-ms", type=float, default=50.0)
    p.add_argument("--out", type=Path, default=REPORTS / "workloads")
    return p


if __name__ == "__main__":
    a = get_args_parser().parse_args()
    peers = tuple(x for x in a.peers.split(",") if x)
    result = measure(a.workloads, a.work, a.ckpt, a.data, a.out, a.epochs, a.precision, a.rounds, a.seconds,
                     a.connections, peers, a.max_top1_drop, tuple(a.concurrency), a.p99_budget_ms)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "workloads.json").write_text(json.dumps(result, indent=2))
    text = markdown(result) + "\n" + latency_markdown(result) + "\n" + saturation_markdown(result) + "\n" + \
        architectures_markdown(result) + "".join(
        f"\nNot measured: {name}: {why}\n" for name, why in result["not_measured"].items())
    (a.out / "workloads.md").write_text(text)
    print(text)
