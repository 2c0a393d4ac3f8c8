"""`make monitor-check`: the monitoring of a served model, checked end to end on the real server.

    python -m perf.checks.monitor_check --repo model_repository --data data/synthetic

From the repository's served model, rendered into a throw-away fused repository with payload sampling on
(bounded), a drift window the size of the val split and the figures handed to Triton after every batch,
served by the real tritonserver with explicit model control:

1. the served metrics are in /metrics after the val split;
2. the drift score stays under the alert threshold on the val split, and for each shifted set (one class
   only, darkened, rotated, blurred, another real data set: photographs from scikit-image) the number of
   images it took to cross it, starting from a window of val answers each time (one model instance: the
   window is per instance). A set whose answers do not change is reported as not detected: the score
   compares answers, so it cannot see such a shift; the check fails only if no set is detected;
3. the payload samples were written and stayed within their bound;
4. a shadow promotion (the same model) and a shadow refusal (its classifier rows rolled by one) under
   continuous client load, with the client requests that failed (none allowed);
5. the response cache's hit rate and speed-up (perf/ab/cache.py, short rounds);
6. every metric the Grafana dashboard, the alert rules and the autoscaler's adapter query is exported
   (GPU metrics aside).

Writes perf/reports/monitor_check/report.{json,md}; exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageFilter

from build.render_repo import render
from build.settings import RepoSettings, read_manifest, rendered_onnx
from clients.client import ImageClassifierClient
from core.atomic_io import atomic_write_bytes
from core.metadata import read_metadata
from perf.checks.reliability import background_load, counts
from perf.load.stats import scrape_metrics
from perf.paths import PROJECT_ROOT, REPORTS
from serve.server import TritonServer
from served.stages import DRIFT_ALERT_PSI
from training.data import list_images

DOCKER = PROJECT_ROOT / "docker"
SERVED_SERIES = ("image_classifier_top1_confidence_bucket", "image_classifier_entropy_bucket",
                 "image_classifier_predictions_total", "image_classifier_inputs_total",
                 "image_classifier_input_bytes_bucket", "image_classifier_input_pixels_bucket",
                 "image_classifier_drift_psi")
BATCH = 4  # images per request while a shift is sent: the drift score is read after each
KEY = "monitor-check-admin-key"  # the throw-away server's own admin key (shadow rollout loads models)


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def shifted_sets(val: list[Path], classes: list[str], n: int) -> dict[str, list[bytes]]:
    """``n`` images of each shift, made from the val split, and crops of real photographs."""
    from training.real_datasets import DATASETS

    def each(f: Callable[[Image.Image], Image.Image]) -> list[bytes]:
        return [jpeg(f(Image.open(p))) for p in (val * (n // len(val) + 1))[:n]]

    one = [p for p, y in val_labels(val, classes) if y == 0]
    photos = DATASETS["photos"]()[0]
    return {"one class only": [p.read_bytes() for p in (one * (n // len(one) + 1))[:n]],
            "darkened (x0.25)": each(lambda im: Image.fromarray((np.asarray(im.convert("RGB")) * 0.25)
                                                                .astype(np.uint8))),
            "rotated 90°": each(lambda im: im.transpose(Image.Transpose.ROTATE_90)),
            "blurred (radius 3)": each(lambda im: im.filter(ImageFilter.GaussianBlur(3))),
            "another data set (photographs)": [jpeg(Image.fromarray(photos[i % len(photos)])) for i in range(n)]}


def val_labels(val: list[Path], classes: list[str]) -> list[tuple[Path, int]]:
    return [(p, classes.index(p.parent.name)) for p in val]


def drift_psi(metrics_url: str) -> dict[str, float]:
    """The drift score per signal, the highest over the served models and versions, as the alert rule takes it
    (a version's instances share one window and report the same score)."""
    out: dict[str, float] = {}
    for k, v in scrape_metrics(metrics_url).items():
        if k.startswith("image_classifier_drift_psi{"):
            signal = k.split('signal="', 1)[1].split('"', 1)[0]
            out[signal] = max(v, out.get(signal, v))
    return out


def drift(server: TritonServer, val: list[Path], sets: dict[str, list[bytes]]) -> dict:
    """The score on the val split, then per shifted set the images it took to cross DRIFT_ALERT_PSI, each
    starting from a window of val answers."""
    out: dict = {"threshold": DRIFT_ALERT_PSI, "window": len(val), "sets": {}}
    with ImageClassifierClient(server.http_url, timeout_s=60) as c:
        c.classify_files(val)
        out["val_split"] = drift_psi(server.metrics_url)
        for name, blobs in sets.items():
            c.classify_files(val)  # a window of in-distribution answers again
            before = drift_psi(server.metrics_url)
            took = None
            for i in range(0, len(blobs), BATCH):
                c.classify(blobs[i:i + BATCH], [f"{name}/{j}" for j in range(i, i + BATCH)], batch_size=BATCH)
                if max(drift_psi(server.metrics_url).values(), default=0.0) > DRIFT_ALERT_PSI:
                    took = i + len(blobs[i:i + BATCH])
                    break
            out["sets"][name] = {"silent_before": max(before.values(), default=0.0) <= DRIFT_ALERT_PSI,
                                 "images_to_alert": took, "psi": drift_psi(server.metrics_url)}
    return out


def payloads(folder: Path, max_bytes: int) -> dict:
    files = [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]
    size = sum(p.stat().st_size for p in files)
    return {"records": sum(p.suffix == ".json" for p in files), "bytes": size, "bound_bytes": max_bytes,
            "bounded": size <= max_bytes}


def rolled_classifier(onnx_path: Path, out: Path, num_classes: int) -> Path:
    """The same model with its classifier's rows rolled by one: every answer moves to the next class."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(onnx_path))
    for init in m.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.ndim in (1, 2) and a.shape[0] == num_classes:
            init.CopyFrom(numpy_helper.from_array(np.roll(a, 1, axis=0), init.name))
    onnx.save(m, str(out))
    return out


def shadows(server: TritonServer, repo: Path, onnx_path: Path, val: list[Path], tmp: Path,
            min_requests: int, p99_margin: float) -> dict:
    """A promotion and a refusal under continuous load: their decisions and figures, and the client calls."""
    from serve.rollout import shadow

    batches = [[p.read_bytes() for p in val[i:i + 4]] for i in range(0, min(16, len(val)), 4)]
    worse = rolled_classifier(onnx_path, tmp / "rolled.onnx", len(read_metadata(onnx_path).classes))
    out = {}
    for name, candidate in (("same model", onnx_path), ("classifier rows rolled", worse)):
        with background_load(server, batches, workers=4) as calls:
            r = shadow(candidate, repo, server.http_url, server.metrics_url, key=KEY, min_requests=min_requests,
                       p99_margin=p99_margin, timeout_s=300)
        c = counts(calls)
        out[name] = {"decision": r["decision"], "why": r["why"], "agreement_percent": r["agreement_percent"],
                     "compared": r["mirrored"], "disagreements": r["disagreements"][:5],
                     "client_requests": len(calls), "client_failed": len(calls) - c["ok"]}
    return out


def queried_metrics() -> set[str]:
    """The metrics the Grafana dashboard, the alert rules and the autoscaler's adapter rules query."""
    dashboard = json.loads((DOCKER / "observability" / "grafana" / "dashboards" / "triton.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    alerts = yaml.safe_load((DOCKER / "k8s" / "prometheus-alerts.yml").read_text())
    exprs += [r["expr"] for g in alerts["groups"] for r in g["rules"]]
    for doc in yaml.safe_load_all((DOCKER / "k8s" / "prometheus-adapter.yaml").read_text()):
        if doc and doc.get("kind") == "ConfigMap":
            exprs += [r[k] for r in yaml.safe_load(doc["data"]["config.yaml"])["rules"]
                      for k in ("seriesQuery", "metricsQuery")]
    return set().union(*(re.findall(r"\b((?:nv|image_classifier)_[a-z0-9_]+)\b", e) for e in exprs))


def exported_names(metrics_url: str) -> set[str]:
    return {k.split("{", 1)[0] for k in scrape_metrics(metrics_url)}


def check(repo: Path, data: Path, out: Path, window: int = 500, min_requests: int = 300,
          cache_seconds: int = 3, payload_kb: int = 256, p99_margin: float | None = None) -> dict:
    """``p99_margin``: the shadow promotion's (serve.rollout's default when None)."""
    from serve.rollout import DEFAULT_P99_MARGIN

    onnx_path = rendered_onnx(repo)
    meta = read_metadata(onnx_path)
    val = [p for p, _ in list_images(Path(data) / "val", meta.classes)][:window]
    if not val:
        raise FileNotFoundError(f"no val images under {data}/val")
    if meta.export.reference is None:
        raise ValueError(f"{onnx_path} carries no drift reference (its answers on the val split): it was exported "
                         "before drift monitoring; export it again with `make onnx` and render with `make repo`")
    started = time.time()
    report: dict = {"repo": str(repo), "data": str(data), "when": time.strftime("%Y-%m-%d %H:%M")}
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="monitor-check-") as t:
        tmp = Path(t)
        live, samples = tmp / "repo", tmp / "payloads"
        # one instance: each instance scores the answers it gave against its own window, and they share the
        # gauge (the last one to score sets it), so with several the window holds a share of the traffic
        settings = RepoSettings(drift_window=len(val), served_metrics_interval_ms=0, payload_percent=100,
                                payload_dir=str(samples), payload_max_kb=payload_kb, classifier_instances=1,
                                preprocess_instances=1)
        render(onnx_path, live, settings, layout="fused")
        with TritonServer(live, None, model_control="explicit", admin_key=KEY, log_file=out / "tritonserver.log") as s:
            report["drift"] = drift(s, val, shifted_sets(val, list(meta.classes), 2 * len(val)))
            names = exported_names(s.metrics_url)
            report["metrics"] = {m: m in names for m in SERVED_SERIES}
            used = {m for m in queried_metrics() if not m.startswith("nv_gpu_")}
            report["dashboards_and_alerts"] = {"queried": sorted(used), "missing": sorted(used - names)}
            report["payloads"] = payloads(samples, 1024 * payload_kb)
            report["shadow"] = shadows(s, live, onnx_path, val, tmp, min_requests,
                                       DEFAULT_P99_MARGIN if p99_margin is None else p99_margin)
    from perf.ab import cache

    c = cache.measure(repo, Path(data) / "val", out / "cache", rounds=1, seconds=cache_seconds)
    off, hit = list(c["summary"])[:2]
    report["cache"] = {"hit_rate": c["cache"][hit]["hit_rate"],
                       "speed_up": c["summary"][hit]["images_per_s"]["median"] / c["summary"][off]["images_per_s"]
                       ["median"]}
    report["seconds"] = round(time.time() - started)
    report["problems"] = problems(report)
    return report


def problems(r: dict) -> list[str]:
    out = [f"{m} is not in /metrics" for m, ok in r["metrics"].items() if not ok]
    d = r["drift"]
    if max(d["val_split"].values(), default=0.0) > d["threshold"]:
        out.append(f"the drift score fires on the val split: {d['val_split']}")
    # a shift the model's answers do not show (its confidence and class mix unchanged) is reported, not failed:
    # the score compares answers, so it cannot see it
    if all(x["images_to_alert"] is None for x in d["sets"].values()):
        out.append(f"drift: no shifted set crossed {d['threshold']} in {2 * d['window']} images")
    out += [f"drift: the score was not silent before {name}" for name, x in d["sets"].items() if not x["silent_before"]]
    p = r["payloads"]
    if not p["records"] or not p["bounded"]:
        out.append(f"payload samples: {p['records']} records, {p['bytes']} bytes for a bound of {p['bound_bytes']}")
    sh = r["shadow"]
    if sh["same model"]["decision"] != "promoted":
        out.append(f"shadow: the same model was not promoted: {sh['same model']['why']}")
    if sh["classifier rows rolled"]["decision"] != "withdrawn":
        out.append("shadow: a candidate that disagrees was promoted")
    out += [f"shadow ({k}): {v['client_failed']} client request(s) failed" for k, v in sh.items() if v["client_failed"]]
    if not r["cache"]["hit_rate"]:
        out.append("the response cache never hit")
    out += [f"the dashboards or alert rules query {m}, which the server does not export"
            for m in r["dashboards_and_alerts"]["missing"] if m != "image_classifier_drift_psi"]
    return out


def markdown(r: dict) -> str:
    d = r["drift"]
    lines = ["# Monitoring check", "", f"{r['repo']}, data {r['data']}, {r['when']} ({r['seconds']} s).", "",
             "## Served metrics in /metrics", "", *[f"- {m}: {'present' if ok else 'MISSING'}"
                                                    for m, ok in r["metrics"].items()],
             "", f"## Drift (window {d['window']} answers, alert above PSI {d['threshold']})", "",
             "Val split: " + ", ".join(f"{k} {v:.3f}" for k, v in d["val_split"].items()), "",
             "| shifted set | images until the alert | PSI then (confidence, class mix) |", "| --- | ---: | --- |"]
    for name, x in d["sets"].items():
        took = "never" if x["images_to_alert"] is None else str(x["images_to_alert"])
        psi = x["psi"]
        lines.append(f"| {name} | {took} | {psi.get('confidence', 0):.2f}, {psi.get('class_mix', 0):.2f} |")
    p = r["payloads"]
    lines += ["", "## Payload samples", "", f"{p['records']} records, {p['bytes']} bytes (bound {p['bound_bytes']}): "
              + ("within it" if p["bounded"] else "OVER it"), "", "## Shadow rollout under load", "",
              "| candidate | decision | agreement % | images compared | client requests | failed |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name, x in r["shadow"].items():
        lines.append(f"| {name} | {x['decision']} | {x['agreement_percent']} | {x['compared']} | "
                     f"{x['client_requests']} | {x['client_failed']} |")
    c, q = r["cache"], r["dashboards_and_alerts"]
    lines += ["", "## Response cache", "", f"hit rate {100 * (c['hit_rate'] or 0):.1f}%, speed-up {c['speed_up']:.1f}x "
              "(perf/ab/cache.py, one short round)", "", "## Dashboards, alert rules, autoscaler", "",
              f"{len(q['queried'])} metrics queried (GPU metrics aside); not exported: "
              f"{', '.join(q['missing']) or 'none'}", "", "## Verdict", ""]
    unseen = [name for name, x in d["sets"].items() if x["images_to_alert"] is None]
    if unseen:
        lines += [f"- not detected (the model's answers did not change enough): {', '.join(unseen)}"]
    lines += [f"- FAIL: {x}" for x in r["problems"]] or ["- every check passed"]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--data", type=Path, required=True, help="the ImageFolder root whose val split is in-distribution")
    p.add_argument("--window", type=int, default=500, help="val images used, and so the drift window")
    p.add_argument("--shadow-requests", type=int, default=300)
    p.add_argument("--out", type=Path, default=REPORTS / "monitor_check")
    a = p.parse_args()
    if read_manifest(a.repo).get("target") != "embedded":
        raise SystemExit("error: the monitoring check serves the embedded target's fused layout")
    try:
        r = check(a.repo, a.data, a.out, a.window, a.shadow_requests)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    atomic_write_bytes(a.out / "report.json", lambda tmp: tmp.write_text(json.dumps(r, indent=2)))
    atomic_write_bytes(a.out / "report.md", lambda tmp: tmp.write_text(markdown(r)))
    print(markdown(r))
    return 1 if r["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
