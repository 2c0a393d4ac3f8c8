"""The report's headline figures and verdicts, computed from the measured results."""

from __future__ import annotations

from build import layouts
from perf.reference.targets import TARGETS

# issue 12's targets, the same ones `make compare` checks
TARGET_BASELINE_RATIO = TARGETS["baseline"]
TARGET_CEILING_RATIO = TARGETS["ceiling"]


def headline(r: dict) -> dict:
    h: dict = {}
    if "locust" in r:
        loc = r["locust"]
        triton = loc[triton_user(loc)]
        h.update({"users": triton["users"], "triton_rps": triton["rps"], "triton_p99_ms": triton["p99_ms"],
                  "failures": {u: x["failures"] for u, x in loc.items()}})
        if "BaselineUser" in loc:  # not for an imported model (no checkpoint to serve naively)
            base = loc["BaselineUser"]
            h.update({"baseline_rps": base["rps"], "baseline_p99_ms": base["p99_ms"],
                      "baseline_ratio": triton["rps"] / base["rps"] if base["rps"] else float("inf")})
    if "perf_analyzer" in r and "ceiling" in r:
        h.update(ceiling_headline(r))
    return h


def triton_user(locust: dict) -> str:
    """Triton's locust user of the results: HTTP's where there is one (a deployment has its protocol's only)."""
    return next(u for u in ("TritonHttpUser", "TritonGrpcUser") if u in locust)


def computing_models(r: dict) -> tuple[str, ...]:
    """The models of the measured repository that run code (an ensemble's statistics only add theirs up); of a
    deployment, whose repository is not read, every model its statistics counted requests of."""
    if "manifest" in r:
        return layouts.of_manifest(r["manifest"]).python_models()
    return tuple(sorted({m for pts in r.get("perf_analyzer", {}).values() for p in pts for m in p["server"]}))


def ceiling_headline(r: dict) -> dict:
    best = max((p for pts in r["perf_analyzer"].values() for p in pts if p["mode"] == "concurrency"),
               key=lambda p: float(p["client"]["Inferences/Second"]))
    best_tp = float(best["client"]["Inferences/Second"])
    ceil = r["ceiling"]["ceiling_images_per_s"]
    h = {"best_perf_analyzer": {"protocol": best["protocol"], "concurrency": best["value"], "throughput": best_tp},
         "ceiling": ceil, "ceiling_ratio": best_tp / ceil, "ceiling_batch": r["ceiling"]["best_batch"]}
    # why: server CPU per image against the ceiling's, and how busy the cores were
    per_image_ms = 1000.0 / ceil
    server = best["server"]
    composing = {m: s for m, s in server.items() if m in computing_models(r)}
    h["server_ms_per_image"] = sum(s["compute_infer_us"] / 1000.0 / (s["avg_batch"] or 1) for s in composing.values())
    h["ceiling_ms_per_image"] = per_image_ms
    h["server_cores_busy"] = best["usage"].get("cpu_cores_busy")
    h["avg_batch"] = {m: s["avg_batch"] for m, s in composing.items()}
    return h


def verdict(value: float, target: float, what: str) -> str:
    if value >= target:
        return f"target ≥ {target:g}× met"
    return f"target ≥ {target:g}× missed by {100 * (1 - value / target):.0f}% ({what})"

