"""The report's figures (PNG, matplotlib), from the measured results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from perf.load.deployment import PROTOCOL_NAMES
from perf.load.perf_analyzer import rate_limits
from perf.reference.compare_report import plot as compare_plot
from perf.report.analysis import triton_user

# a drawn figure: (the matplotlib figure, its file name, its title); None: nothing to draw
Drawn = tuple[Any, str, str] | None


def plots(r: dict, out: Path, tuning: dict | None) -> list[tuple[str, str]]:
    """Every figure the results allow, written into ``out``: (file name, title) of each, in order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[tuple[str, str]] = []
    for draw in (throughput_vs_concurrency, latency_vs_concurrency, request_rate, triton_vs_baseline,
                 dali_vs_pillow, precisions):
        save(plt, draw(plt, r), out, made)
    save(plt, tuning_sweep(plt, tuning), out, made)
    if "compare" in r:
        compare_plot(r["compare"], out / "compare.png")
        made.append(("compare.png", "Side by side under one generator (wrk): Triton, its other layouts, the peers, "
                                    "the baseline, the in-process ceiling"))
    return made


def save(plt: Any, drawn: Drawn, out: Path, made: list[tuple[str, str]]) -> None:
    """Write a drawn figure into ``out`` and note it in ``made``."""
    if drawn is None:
        return
    fig, name, title = drawn
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    made.append((name, title))


def _protocols(r: dict) -> list[str]:
    pa = r.get("perf_analyzer", {})
    return [p for p in ("http", "grpc") if p in pa]


def throughput_vs_concurrency(plt: Any, r: dict) -> Drawn:
    protos = _protocols(r)
    if not protos:
        return None
    pa = r["perf_analyzer"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for proto in protos:
        ax.plot([p["value"] for p in pa[proto]], [float(p["client"]["Inferences/Second"]) for p in pa[proto]],
                "o-", label=f"Triton {proto}")
    if "ceiling" in r:
        ax.axhline(r["ceiling"]["ceiling_images_per_s"], color="k", ls="--", label="in-process ceiling")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency (requests in flight, 1 image each)")
    ax.set_ylabel("images / s")
    ax.legend()
    return fig, "throughput_vs_concurrency.png", "Throughput against concurrency (perf_analyzer)"


def latency_vs_concurrency(plt: Any, r: dict) -> Drawn:
    protos = _protocols(r)
    if not protos:
        return None
    pa = r["perf_analyzer"]
    fig, axes = plt.subplots(1, len(protos), figsize=(9, 3.4), squeeze=False)
    for ax, proto in zip(axes[0], protos, strict=True):
        xs = [p["value"] for p in pa[proto]]
        for pct in (50, 90, 99):
            ax.plot(xs, [float(p["client"][f"p{pct} latency"]) / 1000 for p in pa[proto]], "o-", label=f"p{pct}")
        ax.set_xscale("log", base=2)
        ax.set_title(proto)
        ax.set_xlabel("concurrency")
        ax.set_ylabel("latency (ms)")
        ax.legend()
    return fig, "latency_vs_concurrency.png", "Latency percentiles against concurrency (perf_analyzer)"


def rate_points(r: dict) -> list[dict]:
    """The request-rate sweep's points ("<protocol>_rate": gRPC's, or a deployment's one protocol's)."""
    return next((pts for k, pts in r.get("perf_analyzer", {}).items() if k.endswith("_rate")), [])


def request_rate(plt: Any, r: dict) -> Drawn:
    pts = rate_points(r)
    if not pts:
        return None
    proto = PROTOCOL_NAMES[pts[0]["protocol"]]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    offered = [p["value"] for p in pts]
    ax.plot(offered, [float(p["client"]["Inferences/Second"]) for p in pts], "o-", label="achieved")
    ax.plot(offered, offered, ":", color="grey", label="offered")
    behind = [(p["value"], float(p["client"]["Inferences/Second"]))
              for p, lim in zip(pts, rate_limits(pts), strict=True) if lim == "generator"]
    if behind:
        ax.plot(*zip(*behind, strict=True), "x", color="C1", ms=10, label="limited by the generator")
    ax.legend(loc="upper left", fontsize=7)
    ax2 = ax.twinx()
    ax2.plot([p["value"] for p in pts], [float(p["client"]["p99 latency"]) / 1000 for p in pts], "s--", color="C3")
    ax.set_xlabel(f"offered request rate (req/s, {proto})")
    ax.set_ylabel("images / s (solid)")
    ax2.set_ylabel("p99 latency, ms (dashed)")
    return fig, "request_rate.png", f"Request-rate sweep (perf_analyzer, {proto}, open loop): achieved against offered"


def triton_vs_baseline(plt: Any, r: dict) -> Drawn:
    if "locust" not in r:
        return None
    loc = r["locust"]
    named = {"TritonHttpUser": "Triton HTTP", "TritonGrpcUser": "Triton gRPC",
             "BaselineUser": "baseline (Flask+PyTorch)"}
    users: list[str | None] = [u for u in named if u in loc]  # no baseline for an imported model
    names = [named[u] for u in named if u in loc]
    vals = [loc[u]["rps"] for u in named if u in loc]
    if "ceiling" in r:
        users, names = users + [None], names + ["ceiling (in-process)"]
        vals.append(r["ceiling"]["ceiling_images_per_s"])
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    bars = ax.bar(names, vals, color=["C0", "C1", "C3", "0.5"][: len(vals)])
    for bar, u in zip(bars, users, strict=True):
        label = f"{bar.get_height():.0f}" + (f"\np99 {loc[u]['p99_ms']:.0f} ms" if u else "")
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8)
    ax.set_ylabel("images / s")
    ax.set_title(f"locust, {loc[triton_user(loc)]['users']} users, same JPEGs", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    return fig, "triton_vs_baseline_vs_ceiling.png", "Triton vs naive baseline vs in-process ceiling"


def dali_vs_pillow(plt: Any, r: dict) -> Drawn:
    if "ceiling" not in r:
        return None
    pre = r["ceiling"]["preprocess_images_per_s"]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(["DALI (CPU, batched)", "Pillow + NumPy (1 by 1)"],
           [pre["dali_cpu_batched"], pre["pillow_numpy_one_by_one"]], color=["C2", "C4"])
    ax.set_ylabel("images / s")
    return fig, "dali_vs_pillow.png", "Preprocessing: DALI vs Pillow (in-process, same JPEGs)"


def precisions(plt: Any, r: dict) -> Drawn:
    if len(r.get("precisions", {})) <= 1:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = list(r["precisions"])
    ax.bar(names, [r["precisions"][n]["images_per_s"] for n in names], label="pipeline (DALI + model)")
    ax.plot(names, [r["precisions"][n]["model_only_images_per_s"] for n in names], "ko--", label="model only")
    ax.set_ylabel("images / s (in-process, CPU)")
    ax.legend()
    return fig, "precisions.png", "Precisions side by side (ONNX Runtime on this CPU)"


def tuning_sweep(plt: Any, tuning: dict | None) -> Drawn:
    if not tuning:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    res = tuning["results"]
    ax.scatter([x["p99_ms"] for x in res], [x["throughput"] for x in res], c="C0")
    best = tuning["best"]
    ax.scatter([best["p99_ms"]], [best["throughput"]], c="C3", s=80, label="chosen")
    ax.axvline(tuning["p99_budget_ms"], color="k", ls=":", label="p99 budget")
    ax.set_xlabel("p99 latency (ms)")
    ax.set_ylabel("images / s")
    ax.legend()
    return fig, "tuning.png", f"Batching sweep at concurrency {tuning['concurrency']} ({len(res)} configurations)"
