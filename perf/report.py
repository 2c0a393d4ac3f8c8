"""One command, one load-testing report: `make report` -> perf/reports/<timestamp>/report.{html,md}.

In one run on this machine: the in-process ceiling (and DALI vs Pillow preprocessing), the real
Triton server under perf_analyzer (concurrency sweeps over HTTP and gRPC, a request-rate sweep) and
under locust (HTTP and gRPC users), and the naive Flask + PyTorch baseline under the same locust
load with the same JPEGs. Headline ratios come first; every figure is a measurement of this run.

    python -m perf.report --repo model_repository --images data/synthetic/val [--quick]
"""

from __future__ import annotations

import argparse
import html
import json
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from build.export_onnx import read_metadata, source_checkpoint
from build.render_repo import LAYOUT_MODELS, config_text, labels_file, read_configs, read_manifest, rendered_onnx
from perf import ceiling
from perf.common import REPORTS, machine_info, sample_images
from perf.loadtest import run_locust
from perf.perf_analyzer import PerfPoint, sweep
from serve.server import TritonServer, free_ports

TARGET_BASELINE_RATIO = 4.0
TARGET_CEILING_RATIO = 0.85


@dataclass(frozen=True)
class Profile:
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    protocols: tuple[str, ...] = ("http", "grpc")
    rate_fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # of the best measured throughput
    interval_ms: int = 3000
    locust_users: int = 16
    locust_seconds: int = 20
    ceiling_seconds: float = 3.0
    parts: tuple[str, ...] = ("ceiling", "perf", "loadtest")  # what to measure
    request_count: int = 0  # > 0: every perf_analyzer point is exactly this many requests (no stabilization)


FULL = Profile()
QUICK = Profile(concurrency=(1, 4), rate_fractions=(0.5,), interval_ms=500, locust_users=4, locust_seconds=3,
                ceiling_seconds=0.3)


def start_baseline(ckpt: str, port: int, log_path: Path) -> subprocess.Popen:
    """The naive baseline server, its output to ``log_path``: Flask logs every request to stderr, and an
    unread pipe fills after about 950 requests and stalls the server (a stalled baseline reads as slow)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, "-m", "perf.baseline", "--ckpt", ckpt, "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"baseline server exited: {log_path.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                return proc
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"baseline server did not come up within 120 s (log: {log_path})")
    except BaseException:  # Ctrl-C included: never leave the child behind
        proc.kill()
        proc.wait(10)
        raise


def measure_all(repo: Path, images: Path, out: Path, profile: Profile) -> dict:
    manifest = read_manifest(repo)
    onnx = rendered_onnx(repo)
    meta = read_metadata(onnx)
    ckpt = str(source_checkpoint(onnx, meta))
    labels = labels_file(repo)
    top_k = manifest["settings"]["top_k"] if manifest["settings"]["top_k"] <= manifest["classes"] else manifest["classes"]
    blobs = [b for _, b in sample_images(images)]
    r: dict = {"machine": machine_info(), "manifest": manifest, "profile": asdict(profile),
               "configs": {name: config_text(cfg) for name, cfg in read_configs(repo).items()},
               "checkpoint": ckpt, "images": str(images), "payload_images": len(blobs),
               "payload_mean_bytes": sum(map(len, blobs)) / len(blobs)}

    if "ceiling" in profile.parts:
        print("ceiling (in-process, no server) ...")
        r["ceiling"] = ceiling.measure(onnx, images, min_time=profile.ceiling_seconds)
        # the other precisions built next to the served ONNX (make quantize), same pipeline, same run
        from build.quantize import ARTIFACT_NAMES

        r["precisions"] = {}
        for name, file in ARTIFACT_NAMES.items():
            path = onnx.parent / file
            if path.is_file():
                m = ceiling.measure(path, images, min_time=profile.ceiling_seconds)
                r["precisions"][name] = {"file": file, "images_per_s": m["ceiling_images_per_s"],
                                         "best_batch": m["best_batch"],
                                         "model_only_images_per_s": m["model_only_images_per_s_at_best_batch"]}

    with TritonServer(repo, None, log_file=out / "tritonserver.log") as server:
        metrics_url = server.metrics_url
        pa: dict[str, list[PerfPoint]] = {}
        if "perf" not in profile.parts:
            profile = Profile(**{**asdict(profile), "protocols": (), "rate_fractions": ()})
        for proto in profile.protocols:
            url = server.http_url if proto == "http" else server.grpc_url
            pa[proto] = sweep(url, server.http_url, proto, "concurrency", list(profile.concurrency), blobs,
                              out / "perf_analyzer", server.proc.pid, profile.interval_ms, metrics_url,
                              profile.request_count)
        if pa:
            peak = max(p.throughput for pts in pa.values() for p in pts)
            rates = [max(1.0, round(f * peak)) for f in profile.rate_fractions]
            pa["grpc_rate"] = sweep(server.grpc_url, server.http_url, "grpc", "request_rate", rates, blobs,
                                    out / "perf_analyzer", server.proc.pid, profile.interval_ms, metrics_url,
                              profile.request_count)
            r["perf_analyzer"] = {k: [p.to_dict() for p in v] for k, v in pa.items()}
        if "loadtest" not in profile.parts:
            return r
        r["locust"] = {}
        for user in ("TritonHttpUser", "TritonGrpcUser"):
            r["locust"][user] = run_locust(user, f"http://{server.http_url}", profile.locust_users,
                                           profile.locust_seconds, out / "locust", images, labels, top_k,
                                           server.grpc_url, server_pid=server.proc.pid)

    (port,) = free_ports(1)
    baseline = start_baseline(ckpt, port, out / "locust" / "baseline_server.log")
    try:
        r["locust"]["BaselineUser"] = run_locust("BaselineUser", f"http://127.0.0.1:{port}", profile.locust_users,
                                                 profile.locust_seconds, out / "locust", images, labels, top_k,
                                                 server_pid=baseline.pid)
    finally:
        baseline.terminate()
        baseline.wait(30)
    return r


# ------------------------------------------------------------------------------------------------
# analysis
# ------------------------------------------------------------------------------------------------

def headline(r: dict) -> dict:
    h: dict = {}
    if "locust" in r:
        loc = r["locust"]
        triton, base = loc["TritonHttpUser"], loc["BaselineUser"]
        h.update({"users": triton["users"], "triton_rps": triton["rps"], "baseline_rps": base["rps"],
                  "baseline_ratio": triton["rps"] / base["rps"] if base["rps"] else float("inf"),
                  "triton_p99_ms": triton["p99_ms"], "baseline_p99_ms": base["p99_ms"],
                  "failures": {u: x["failures"] for u, x in loc.items()}})
    if "perf_analyzer" in r and "ceiling" in r:
        h.update(ceiling_headline(r))
    return h


def computing_models(r: dict) -> tuple[str, ...]:
    """The models of the measured repository that run code (an ensemble's statistics only add theirs up)."""
    return LAYOUT_MODELS[r["manifest"].get("layout", "postprocess")]


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


# ------------------------------------------------------------------------------------------------
# plots and documents
# ------------------------------------------------------------------------------------------------

def plots(r: dict, out: Path, tuning: dict | None) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []

    def save(fig, name, title):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append((name, title))

    pa = r.get("perf_analyzer", {})
    protos = [p for p in ("http", "grpc") if p in pa]
    if protos:
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
        save(fig, "throughput_vs_concurrency.png", "Throughput against concurrency (perf_analyzer)")

        fig, axes = plt.subplots(1, len(protos), figsize=(9, 3.4), squeeze=False)
        for ax, proto in zip(axes[0], protos):
            xs = [p["value"] for p in pa[proto]]
            for pct in (50, 90, 99):
                ax.plot(xs, [float(p["client"][f"p{pct} latency"]) / 1000 for p in pa[proto]], "o-", label=f"p{pct}")
            ax.set_xscale("log", base=2)
            ax.set_title(proto)
            ax.set_xlabel("concurrency")
            ax.set_ylabel("latency (ms)")
            ax.legend()
        save(fig, "latency_vs_concurrency.png", "Latency percentiles against concurrency (perf_analyzer)")

    if pa.get("grpc_rate"):
        pts = pa["grpc_rate"]
        fig, ax = plt.subplots(figsize=(6, 3.4))
        ax.plot([p["value"] for p in pts], [float(p["client"]["Inferences/Second"]) for p in pts], "o-", label="achieved")
        ax2 = ax.twinx()
        ax2.plot([p["value"] for p in pts], [float(p["client"]["p99 latency"]) / 1000 for p in pts], "s--", color="C3")
        ax.set_xlabel("offered request rate (req/s, gRPC)")
        ax.set_ylabel("images / s (solid)")
        ax2.set_ylabel("p99 latency, ms (dashed)")
        save(fig, "request_rate.png", "Request-rate sweep (perf_analyzer, gRPC)")

    if "locust" in r:
        loc = r["locust"]
        users = ["TritonHttpUser", "TritonGrpcUser", "BaselineUser"]
        names = ["Triton HTTP", "Triton gRPC", "baseline (Flask+PyTorch)"]
        vals = [loc[u]["rps"] for u in users]
        if "ceiling" in r:
            users, names = users + [None], names + ["ceiling (in-process)"]
            vals.append(r["ceiling"]["ceiling_images_per_s"])
        fig, ax = plt.subplots(figsize=(6.5, 3.4))
        bars = ax.bar(names, vals, color=["C0", "C1", "C3", "0.5"][: len(vals)])
        for bar, u in zip(bars, users):
            label = f"{bar.get_height():.0f}" + (f"\np99 {loc[u]['p99_ms']:.0f} ms" if u else "")
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("images / s")
        ax.set_title(f"locust, {loc['TritonHttpUser']['users']} users, same JPEGs", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        save(fig, "triton_vs_baseline_vs_ceiling.png", "Triton vs naive baseline vs in-process ceiling")

    if "ceiling" in r:
        pre = r["ceiling"]["preprocess_images_per_s"]
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar(["DALI (CPU, batched)", "Pillow + NumPy (1 by 1)"],
               [pre["dali_cpu_batched"], pre["pillow_numpy_one_by_one"]], color=["C2", "C4"])
        ax.set_ylabel("images / s")
        save(fig, "dali_vs_pillow.png", "Preprocessing: DALI vs Pillow (in-process, same JPEGs)")

    if len(r.get("precisions", {})) > 1:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        names = list(r["precisions"])
        ax.bar(names, [r["precisions"][n]["images_per_s"] for n in names], label="pipeline (DALI + model)")
        ax.plot(names, [r["precisions"][n]["model_only_images_per_s"] for n in names], "ko--", label="model only")
        ax.set_ylabel("images / s (in-process, CPU)")
        ax.legend()
        save(fig, "precisions.png", "Precisions side by side (ONNX Runtime on this CPU)")

    if tuning:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        res = tuning["results"]
        ax.scatter([x["p99_ms"] for x in res], [x["throughput"] for x in res], c="C0")
        best = tuning["best"]
        ax.scatter([best["p99_ms"]], [best["throughput"]], c="C3", s=80, label="chosen")
        ax.axvline(tuning["p99_budget_ms"], color="k", ls=":", label="p99 budget")
        ax.set_xlabel("p99 latency (ms)")
        ax.set_ylabel("images / s")
        ax.legend()
        save(fig, "tuning.png", f"Batching sweep at concurrency {tuning['concurrency']} ({len(res)} configurations)")
    return made


def markdown(r: dict, h: dict, made: list[tuple[str, str]], tuning: dict | None) -> str:
    lines = [f"# Load-testing report ({r['timestamp']})", ""]
    if "baseline_ratio" in h:
        base_usage = r["locust"]["BaselineUser"]["usage"].get("cpu_cores_busy") or 0
        triton_usage = r["locust"]["TritonHttpUser"]["usage"].get("cpu_cores_busy") or 0
        why_base = (f"both servers share {r['machine']['cores']} cores with the locust load generator: Triton's server "
                    f"tree kept {triton_usage:.2f} cores busy, the baseline {base_usage:.2f}")
        lines.append(
            f"- **Triton vs naive baseline** (locust, {h['users']} users, HTTP, same JPEGs): "
            f"**{h['baseline_ratio']:.2f}×** throughput ({h['triton_rps']:.0f} vs {h['baseline_rps']:.0f} img/s), "
            f"p99 {h['triton_p99_ms']:.0f} ms vs {h['baseline_p99_ms']:.0f} ms — "
            f"{verdict(h['baseline_ratio'], TARGET_BASELINE_RATIO, why_base)}"
            f"{'' if h['triton_p99_ms'] < h['baseline_p99_ms'] else '; p99 is NOT lower than the baseline'}.")
    if "ceiling_ratio" in h:
        why_ceiling = (f"the server spends {h['server_ms_per_image']:.2f} ms of compute per image in its "
                       f"models ({', '.join(h['avg_batch'])}) at their average batches against {h['ceiling_ms_per_image']:.2f} ms in-process at batch "
                       f"{h['ceiling_batch']}; the server tree kept {h['server_cores_busy'] or 0:.2f} of "
                       f"{r['machine']['cores']} cores busy while the load generator ran on the same cores")
        lines.append(
            f"- **Triton vs in-process ceiling**: **{h['ceiling_ratio']:.2f}×** (best perf_analyzer point "
            f"{h['best_perf_analyzer']['throughput']:.0f} img/s over {h['best_perf_analyzer']['protocol']} at concurrency "
            f"{h['best_perf_analyzer']['concurrency']:g}, ceiling {h['ceiling']:.0f} img/s) — "
            f"{verdict(h['ceiling_ratio'], TARGET_CEILING_RATIO, why_ceiling)}.")
    if "failures" in h:
        lines.append("- Failed requests: " + ", ".join(f"{u} {n}" for u, n in h["failures"].items()) + ".")
    lines += [
        f"- Parts measured: {', '.join(r['profile']['parts'])}.",
        "",
        "All figures were measured in this run, on this machine, side by side.",
        "",
        "## Machine and versions",
        "",
        f"{r['machine']['cpu']}, {r['machine']['cores']} cores, {r['machine']['memory']}; {r['machine']['platform']}; "
        f"Python {r['machine']['python']}; tritonserver {r['machine']['tritonserver']}.",
        "",
        "| package | version |", "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in r["machine"]["versions"].items()],
        "",
        f"Model: `{r['manifest']['onnx']}` (sha256 {r['manifest']['onnx_sha256'][:12]}…, {r['manifest']['precision']}, "
        f"input {r['manifest']['input_shape']}, {r['manifest']['classes']} classes), checkpoint `{r['checkpoint']}`. "
        f"Payload: {r['payload_images']} JPEGs from `{r['images']}`, {r['payload_mean_bytes']:.0f} bytes on average, "
        "one image per request.",
        "",
        "## Figures",
        "",
    ]
    for name, title in made:
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    if "perf_analyzer" in r:
        lines += perf_analyzer_section(r)
    if "locust" in r:
        lines += ["## locust", "",
                  "| user | users | s | requests | failures | req/s | p50 ms | p90 ms | p99 ms | server cores busy | server MiB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for u, x in r["locust"].items():
            lines.append(f"| {u} | {x['users']} | {x['duration_s']} | {x['requests']} | {x['failures']} | {x['rps']:.0f} | "
                         f"{x['p50_ms']:.0f} | {x['p90_ms']:.0f} | {x['p99_ms']:.0f} | "
                         f"{x['usage'].get('cpu_cores_busy', 0):.2f} | {x['usage'].get('rss_mib', 0):.0f} |")
            for f in x["failure_kinds"]:
                lines.append(f"|  | failure: {f['error']} ({f['count']}) | | | | | | | | | |")
        lines += ["", "locust's own HTML reports: " + ", ".join(
            f"[{u}]({Path(x['html']).relative_to(r['out'])})" for u, x in r["locust"].items()), ""]
    if "ceiling" in r:
        c = r["ceiling"]
        pre = c["preprocess_images_per_s"]
        lines += ["## In-process ceiling", "", "| batch | img/s (DALI + ONNX Runtime, no server) |", "| --- | --- |"]
        lines += [f"| {b} | {v:.0f} |" for b, v in c["images_per_s_by_batch"].items()]
        lines += ["", f"Preprocessing alone: DALI on the CPU {pre['dali_cpu_batched']:.0f} img/s (batched) vs Pillow + "
                  f"NumPy {pre['pillow_numpy_one_by_one']:.0f} img/s (one by one, as the baseline does); the model alone "
                  f"{c['model_only_images_per_s_at_best_batch']:.0f} img/s at batch {c['best_batch']}.", ""]
    lines += ["## Precisions", "", f"Served in this run: {r['manifest']['precision']}. Every precision artifact found "
              "next to it (`make quantize`), measured in-process in this run with the same DALI preprocessing "
              "(ONNX Runtime on this CPU; TensorRT engines are measured by `make gpu-check` on a GPU):", ""]
    if r.get("precisions"):
        lines += ["| artifact | file | pipeline img/s (best batch) | model-only img/s |", "| --- | --- | --- | --- |"]
        lines += [f"| {n} | {x['file']} | {x['images_per_s']:.0f} ({x['best_batch']}) | {x['model_only_images_per_s']:.0f} |"
                  for n, x in r["precisions"].items()]
        lines.append("")
    else:
        lines += ["(none measured: the ceiling part was not run)", ""]
    lines += tuning_section(tuning)
    lines += ["## Repository configuration measured", ""]
    for name, text in sorted(r["configs"].items()):
        lines += [f"<details><summary>{name}/config.pbtxt</summary>", "", "```", text.strip(), "```", "", "</details>", ""]
    return "\n".join(lines)


def perf_analyzer_section(r: dict) -> list[str]:
    composing = computing_models(r)
    lines = ["## perf_analyzer", "",
             f"| protocol | mode | value | img/s | p50 ms | p90 ms | p99 ms | server cores busy | avg batch ({'/'.join(composing)}) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for pts in r["perf_analyzer"].values():
        for p in pts:
            c, s = p["client"], p["server"]
            batches = "/".join(f"{(s.get(m) or {}).get('avg_batch') or 0:.1f}" for m in composing)
            lines.append(f"| {p['protocol']} | {p['mode']} | {p['value']:g} | {float(c['Inferences/Second']):.0f} | "
                         f"{float(c['p50 latency']) / 1000:.1f} | {float(c['p90 latency']) / 1000:.1f} | "
                         f"{float(c['p99 latency']) / 1000:.1f} | {p['usage'].get('cpu_cores_busy', 0):.2f} | {batches} |")
    lines += ["", "### Server-side breakdown per model (µs per request; Triton statistics API)", "",
              "| protocol | concurrency | model | queue | compute input | compute infer | compute output | avg batch |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for proto in ("http", "grpc"):
        for p in r["perf_analyzer"].get(proto, []):
            for m, s in sorted(p["server"].items()):
                lines.append(f"| {proto} | {p['value']:g} | {m} | {s['queue_us']:.0f} | {s['compute_input_us']:.0f} | "
                             f"{s['compute_infer_us']:.0f} | {s['compute_output_us']:.0f} | {s['avg_batch'] or 0:.2f} |")
    lines += ["", "### Prometheus metrics scraped during each run", "",
              f"| protocol | mode | value | Triton CPU utilisation | Triton memory (MiB) | avg batch from metrics ({'/'.join(composing)}) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for pts in r["perf_analyzer"].values():
        for p in pts:
            m = p.get("metrics") or {}
            models = m.get("models", {})
            batches = "/".join(f"{(models.get(x) or {}).get('avg_batch') or 0:.1f}" for x in composing)
            util = m.get("cpu_utilization")
            lines.append(f"| {p['protocol']} | {p['mode']} | {p['value']:g} | "
                         f"{'n/a' if util is None else f'{100 * util:.0f}%'} | {m.get('cpu_memory_used_mib', 0):.0f} | {batches} |")
    return lines + [""]


def tuning_section(tuning: dict | None) -> list[str]:
    if not tuning:
        return ["## Batching auto-tuning", "", "Not run for this report (`make tune` runs the sweep and writes the "
                "winner back to the repository; the next report includes it).", ""]
    b = tuning["best"]
    lines = ["## Batching auto-tuning", "",
             f"Sweep at concurrency {tuning['concurrency']} over {tuning['protocol']}, p99 budget "
             f"{tuning['p99_budget_ms']:g} ms ({'met' if tuning['budget_met'] else 'NOT met by any configuration'}); "
             f"chosen: {b['settings']} → {b['throughput']:.0f} img/s, p99 {b['p99_ms']:.1f} ms.", "",
             "| queue delay µs | preferred | instances pre/cls | img/s | p99 ms |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {x['settings']['queue_delay_us']} | {x['settings']['preferred_batch_sizes']} | "
              f"{x['settings']['preprocess_instances']}/{x['settings']['classifier_instances']} | {x['throughput']:.0f} | "
              f"{x['p99_ms']:.1f} |" for x in tuning["results"]]
    return lines + [""]


def to_html(md_text: str, title: str) -> str:
    """A small Markdown subset (headings, lists, tables, images, code, details) to standalone HTML."""
    import re

    def inline(s: str) -> str:
        s = html.escape(s, quote=False)
        s = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r'<img alt="\1" src="\2">', s)
        s = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', s)
        s = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", s)

    out, in_list, in_table, in_code = [], False, False, False
    for line in md_text.splitlines():
        if line.startswith("```"):
            out.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            out.append(html.escape(line))
            continue
        if in_list and not line.startswith("- "):
            out.append("</ul>")
            in_list = False
        if in_table and not line.startswith("|"):
            out.append("</table>")
            in_table = False
        if line.startswith("<details>") or line.startswith("</details>"):
            out.append(line.replace("<details><summary>", "<details><summary>"))
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("- "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{inline(line[2:])}</li>")
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= {"-", " "} for c in cells):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                out.append("<table>")
                in_table = True
            out.append("<tr>" + "".join(f"<{tag}>{inline(c)}</{tag}>" for c in cells) + "</tr>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}pre{background:#f4f4f4;"
             "padding:6px;font-size:12px}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n"


def run(repo: Path, images: Path, out_root: Path = REPORTS, profile: Profile = FULL,
        tuning_json: Path | None = None) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = out_root / stamp
    out.mkdir(parents=True, exist_ok=True)
    r = measure_all(repo, images, out, profile)
    r["timestamp"], r["out"] = stamp, str(out)
    tuning = json.loads(tuning_json.read_text()) if tuning_json and tuning_json.exists() else None
    h = headline(r)
    r["headline"] = h
    (out / "results.json").write_text(json.dumps(r, indent=2, default=str))
    md = markdown(r, h, plots(r, out, tuning), tuning)
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(to_html(md, f"Load-testing report {stamp}"))
    print("\n".join(md.splitlines()[:7]))
    print(f"\nwrote {out / 'report.html'} and {out / 'report.md'}")
    return out


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Measure everything and write perf/reports/<timestamp>/report.{html,md}")
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--images", type=Path, default=Path("data/synthetic/val"))
    p.add_argument("--out", type=Path, default=REPORTS)
    p.add_argument("--tuning", type=Path, default=REPORTS / "tuning" / "tuning.json",
                   help="include this batching sweep (written by `make tune`) if it exists")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke profile instead of the full sweep")
    p.add_argument("--parts", default="ceiling,perf,loadtest",
                   help="comma list of ceiling (in-process), perf (perf_analyzer), loadtest (locust + baseline)")
    p.add_argument("--concurrency", type=int, nargs="*", help="perf_analyzer concurrencies (default 1 2 4 8 16 32)")
    p.add_argument("--users", type=int, help="locust users (default 16)")
    p.add_argument("--duration", type=int, help="locust seconds per run (default 20)")
    return p


def main(a: argparse.Namespace) -> Path:
    profile = QUICK if a.quick else FULL
    parts = tuple(x.strip() for x in a.parts.split(",") if x.strip())
    unknown = set(parts) - {"ceiling", "perf", "loadtest"}
    if unknown:
        raise SystemExit(f"error: unknown --parts {sorted(unknown)}; choose from ceiling, perf, loadtest")
    overrides = {"parts": parts}
    if a.concurrency:
        overrides["concurrency"] = tuple(a.concurrency)
    if a.users:
        overrides["locust_users"] = a.users
    if a.duration:
        overrides["locust_seconds"] = a.duration
    return run(a.repo, a.images, a.out, Profile(**{**asdict(profile), **overrides}), a.tuning)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
