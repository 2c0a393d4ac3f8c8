"""The report's documents: Markdown (report.md) and a standalone HTML page (report.html) made from it with
the Markdown library inside a Jinja2 template (templates/report.html.j2)."""

from __future__ import annotations

import json
from datetime import UTC
from pathlib import Path

from perf.load.deployment import PROTOCOL_NAMES
from perf.load.perf_analyzer import rate_limits
from perf.reference.compare_report import render_markdown as render_compare
from perf.reference.targets import verdicts
from perf.report.analysis import TARGET_BASELINE_RATIO, TARGET_CEILING_RATIO, computing_models, verdict


def markdown(r: dict, h: dict, made: list[tuple[str, str]], tuning: dict | None) -> str:
    """The whole report as Markdown: the headline first, then the machine, the figures and every section."""
    lines = [f"# Load-testing report ({r['timestamp']})", ""]
    lines += headline_section(r, h)
    deployed = "deployment" in r  # a running server at a URL: no local repository, ceiling or tuning sweep
    lines += deployment_section(r) if deployed else machine_section(r)
    lines += figures_section(r, made)
    if "perf_analyzer" in r:
        lines += perf_analyzer_section(r)
    if "locust" in r:
        lines += locust_section(r)
    if "ceiling" in r:
        lines += ceiling_section(r)
    if not deployed:
        lines += precisions_section(r)
    lines += workloads_section(r)
    if not deployed:
        lines += tuning_section(tuning)
    lines += deployment_config_section(r["deployment"]) if deployed else configs_section(r)
    return "\n".join(lines)


def headline_section(r: dict, h: dict) -> list[str]:
    """The headline bullets: each target met or missed, failed requests, what was measured."""
    lines = []
    if "deployment" in r:
        lines.append(measured_bullet(r["deployment"]))
    if r.get("left_out"):
        lines.append("- **Left out** (they need a server started here): "
                     + "; ".join(f"{part}: {why}" for part, why in r["left_out"].items()) + ".")
    if "baseline_ratio" in h:
        lines.append(baseline_bullet(r, h))
    elif "baseline_left_out" in r:
        lines.append(f"- **No naive baseline**: {r['baseline_left_out']}.")
    if "ceiling_ratio" in h:
        lines.append(ceiling_bullet(r, h))
    if "compare" in r:  # issue 12's targets, from every server under one generator
        lines += [f"- **Side by side (wrk, {r['compare']['connections']} connections)**: {v}"
                  for v in verdicts(r["compare"])]
    if "failures" in h:
        lines.append("- Failed requests: " + ", ".join(f"{u} {n}" for u, n in h["failures"].items()) + ".")
    measured = [p for p in r["profile"]["parts"] if p not in r.get("left_out", {})]
    where = "against the server above, the load sent from this machine" if "deployment" in r else \
        "on this machine, side by side"
    return lines + [
        f"- Parts measured: {', '.join(measured) or 'none'}.",
        "",
        f"All figures were measured in this run, {where}.",
        "",
    ]


def measured_bullet(d: dict) -> str:
    """What a deployment's figures are of, as the server itself reported it."""
    return (f"- **Measured**: {d['server']['name']} {d['server']['version']} at `{d['url']}` over "
            f"{PROTOCOL_NAMES[d['protocol']]}{', TLS' if d['tls'] else ''}, "
            f"{'with the inference key' if d['inference_key'] else 'no inference key sent'}: model `{d['model']}` "
            f"version {d['version']} (the server's metadata); nothing was started or stopped by this run.")


def deployment_section(r: dict) -> list[str]:
    """What a deployment's figures were measured on, as the server reported it, and the machine the load came from."""
    d, mach = r["deployment"], r["machine"]
    tls = (f"yes, the server's certificate checked against `{d['tls_root_cert'] or 'the system CAs'}`" if d["tls"]
           else "no")
    return [
        "## What was measured", "",
        "A running server this run did not start or stop. Its name, version and model are its own answers (Triton's "
        "server and model metadata APIs), read before the load.", "",
        "| what | measured |", "| --- | --- |",
        f"| URL | `{d['url']}` |",
        f"| protocol | {PROTOCOL_NAMES[d['protocol']]} |",
        f"| TLS | {tls} |",
        f"| inference key | {'sent, from ' + d['key_from'] if d['inference_key'] else 'none sent'} |",
        f"| server | {d['server']['name']} {d['server']['version']} |",
        f"| model | `{d['model']}` version {d['version']} (versions ready: {', '.join(d['versions']) or 'none'}; "
        f"platform {d['platform']}) |",
        f"| configuration | {d['config_note']} |",
        "",
        f"Load generator: {mach['cpu']}, {mach['cores']} cores, {mach['memory']}; {mach['platform']}; Python "
        f"{mach['python']}; " + ", ".join(f"{k} {v}" for k, v in mach["versions"].items()
                                          if k in ("tritonclient", "locust")) + ". "
        f"Payload: {r['payload_images']} JPEGs from `{r['images']}`, {r['payload_mean_bytes']:.0f} bytes on average, "
        "one image per request; locust checks each answer's number of labels (the deployment's class names are "
        "not read here).",
        "",
    ]


def deployment_config_section(d: dict) -> list[str]:
    lines = ["## Configuration measured", ""]
    if d["config"] is None:
        return lines + [f"Model `{d['model']}`'s configuration: {d['config_note']}.", ""]
    return lines + [f"Model `{d['model']}`'s configuration as the server loaded it ({d['config_note']}):", "",
                    f"<details><summary>{d['model']} (JSON)</summary>", "", "```",
                    json.dumps(d["config"], indent=2, sort_keys=True), "```", "", "</details>", ""]


def baseline_bullet(r: dict, h: dict) -> str:
    base_usage = r["locust"]["BaselineUser"]["usage"].get("cpu_cores_busy") or 0
    triton_usage = r["locust"]["TritonHttpUser"]["usage"].get("cpu_cores_busy") or 0
    why_base = (f"both servers share {r['machine']['cores']} cores with the locust load generator: Triton's server "
                f"tree kept {triton_usage:.2f} cores busy, the baseline {base_usage:.2f}")
    return (f"- **Triton vs naive baseline** (locust, {h['users']} users, HTTP, same JPEGs): "
            f"**{h['baseline_ratio']:.2f}×** throughput ({h['triton_rps']:.0f} vs {h['baseline_rps']:.0f} img/s), "
            f"p99 {h['triton_p99_ms']:.0f} ms vs {h['baseline_p99_ms']:.0f} ms — "
            f"{verdict(h['baseline_ratio'], TARGET_BASELINE_RATIO, why_base)}"
            f"{'' if h['triton_p99_ms'] < h['baseline_p99_ms'] else '; p99 is NOT lower than the baseline'}.")


def ceiling_bullet(r: dict, h: dict) -> str:
    best = h["best_perf_analyzer"]
    why_ceiling = (f"the server spends {h['server_ms_per_image']:.2f} ms of compute per image in its "
                   f"models ({', '.join(h['avg_batch'])}) at their average batches against "
                   f"{h['ceiling_ms_per_image']:.2f} ms in-process at batch "
                   f"{h['ceiling_batch']}; the server tree kept {h['server_cores_busy'] or 0:.2f} of "
                   f"{r['machine']['cores']} cores busy while the load generator ran on the same cores")
    return (f"- **Triton vs in-process ceiling**: **{h['ceiling_ratio']:.2f}×** (best perf_analyzer point "
            f"{best['throughput']:.0f} img/s over {best['protocol']} at concurrency "
            f"{best['concurrency']:g}, ceiling {h['ceiling']:.0f} img/s) — "
            f"{verdict(h['ceiling_ratio'], TARGET_CEILING_RATIO, why_ceiling)}.")


def machine_section(r: dict) -> list[str]:
    """The machine, the versions measured, the model and the payload."""
    mach, man = r["machine"], r["manifest"]
    return [
        "## Machine and versions",
        "",
        f"{mach['cpu']}, {mach['cores']} cores, {mach['memory']}; {mach['platform']}; "
        f"Python {mach['python']}; tritonserver {mach['tritonserver']}.",
        "",
        "| package | version |", "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in mach["versions"].items()],
        "",
        f"Model: {r.get('model', {}).get('arch', '?')} "
        f"({r.get('model', {}).get('parameters', 0) / 1e6:.2f}M parameters"
        f"{', fine-tuned from ' + str(r['model']['weights']) if r.get('model', {}).get('weights') else ''}), "
        f"`{man['onnx']}` "
        f"(sha256 {man['onnx_sha256'][:12]}…, {man['precision']}, "
        f"input {man['input_shape']}, {man['classes']} classes), checkpoint `{r['checkpoint'] or 'none (imported)'}`. "
        f"Payload: {r['payload_images']} JPEGs from `{r['images']}`, {r['payload_mean_bytes']:.0f} bytes on average, "
        "one image per request.",
        "",
    ]


def figures_section(r: dict, made: list[tuple[str, str]]) -> list[str]:
    """Every figure with its title, then the side-by-side comparison's own tables."""
    lines = ["## Figures", ""]
    for name, title in made:
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    if "compare" in r:
        lines += [*render_compare(r["compare"], heading="##", image=None).splitlines(), ""]
    return lines


def locust_section(r: dict) -> list[str]:
    lines = ["## locust", "",
             "| user | users | s | requests | failures | req/s | p50 ms | p90 ms | p99 ms | server cores busy "
             "| server MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for u, x in r["locust"].items():
        lines.append(f"| {u} | {x['users']} | {x['duration_s']} | {x['requests']} | {x['failures']} | "
                     f"{x['rps']:.0f} | "
                     f"{x['p50_ms']:.0f} | {x['p90_ms']:.0f} | {x['p99_ms']:.0f} | "
                     f"{_usage(x['usage'], 'cpu_cores_busy', '.2f')} | {_usage(x['usage'], 'rss_mib', '.0f')} |")
        for f in x["failure_kinds"]:
            lines.append(f"|  | failure: {f['error']} ({f['count']}) | | | | | | | | | |")
    return lines + ["", "locust's own HTML reports: " + ", ".join(
        f"[{u}]({Path(x['html']).relative_to(r['out'])})" for u, x in r["locust"].items()), ""]


def ceiling_section(r: dict) -> list[str]:
    c = r["ceiling"]
    pre = c["preprocess_images_per_s"]
    engine = f"{c.get('engine', 'onnxruntime')}" + (f" {c['inference_precision']}" if c.get("engine") == "openvino"
                                                     else "")
    by_schedule = c.get("images_per_s_by_schedule", {"sequential": c["images_per_s_by_batch"]})
    lines = ["## In-process ceiling", "",
             f"DALI + {engine} (what the repository serves), no server, every core. Sequential: decode a batch, "
             "then infer it; overlapped: a decoding thread keeps batches ready while inference runs. The ceiling "
             f"is the best of them: {c.get('best_schedule', 'sequential')} at batch {c['best_batch']}, "
             f"{c['ceiling_images_per_s']:.0f} img/s.", "",
             "| batch | " + " | ".join(f"{s} img/s" for s in by_schedule) + " |",
             "| --- | " + " | ".join("---" for _ in by_schedule) + " |"]
    lines += [f"| {b} | " + " | ".join(f"{by_schedule[s][b]:.0f}" for s in by_schedule) + " |"
              for b in c["images_per_s_by_batch"]]
    return lines + [
        "", f"Preprocessing alone: DALI on the CPU {pre['dali_cpu_batched']:.0f} img/s (batched) vs Pillow + "
        f"NumPy {pre['pillow_numpy_one_by_one']:.0f} img/s (one by one, as the baseline does); the model alone "
        f"{c['model_only_images_per_s_at_best_batch']:.0f} img/s at batch {c['best_batch']}.", ""]


def precisions_section(r: dict) -> list[str]:
    m = r["manifest"]
    lines = ["## Engines and precisions", "",
             f"Served in this run: {m['precision']} on {m.get('engine', 'onnxruntime')}. Every candidate `make "
             "quantize` scored and passed next to it (engine x precision; without its report, each artifact on "
             "ONNX Runtime), measured in-process in this run with the same DALI preprocessing on this CPU "
             "(TensorRT engines are measured by `make gpu-check` on a GPU):", ""]
    if not r.get("precisions"):
        return lines + ["(none measured: the ceiling part was not run)", ""]
    lines += ["| candidate | engine | precision | file | pipeline img/s (best batch) | model-only img/s |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {n} | {x.get('engine', 'onnxruntime')} | {x.get('precision', n)} | {x['file']} | "
              f"{x['images_per_s']:.0f} ({x['best_batch']}) | {x['model_only_images_per_s']:.0f} |"
              for n, x in r["precisions"].items()]
    return lines + [""]


def configs_section(r: dict) -> list[str]:
    lines = ["## Repository configuration measured", ""]
    for name, text in sorted(r["configs"].items()):
        lines += [f"<details><summary>{name}/config.pbtxt</summary>", "", "```", text.strip(), "```", "",
                  "</details>", ""]
    return lines


def _usage(usage: dict, field: str, fmt: str) -> str:
    """The server's CPU or memory over a run; n/a where it was not measured (a deployment's process is not here)."""
    return format(usage[field], fmt) if field in usage else "n/a"


def rate_section(r: dict) -> list[str]:
    """The open-loop request-rate sweep: achieved against offered, and what limited each point."""
    points = [p for pts in r["perf_analyzer"].values() for p in pts if p["mode"] == "request_rate"]
    if not points:
        return []
    lines = ["", f"### Request rate: achieved against offered ({PROTOCOL_NAMES[points[0]['protocol']]}, open loop)", "",
             "Requests leave on schedule, however many are in flight (perf_analyzer `--async`). A point short of "
             "its rate while latency stays at the unloaded level (or perf_analyzer fell behind) was limited by "
             "the load generator, not the server, and is in no headline.", "",
             "| offered req/s | achieved req/s | achieved / offered | p99 ms | limited by |",
             "| --- | --- | --- | --- | --- |"]
    for p, limit in zip(points, rate_limits(points), strict=True):
        achieved = float(p["client"]["Inferences/Second"])
        lines.append(f"| {p['value']:g} | {achieved:.0f} | {achieved / p['value']:.2f} | "
                     f"{float(p['client']['p99 latency']) / 1000:.1f} | {limit} |")
    if r.get("rate_shed_at"):
        lines.append(f"| {r['rate_shed_at']:g} | – | – | – | server: it shed load (its queue was full) |")
    return lines


def perf_analyzer_section(r: dict) -> list[str]:
    composing = computing_models(r)
    lines = ["## perf_analyzer", "",
             "| protocol | mode | value | img/s | p50 ms | p90 ms | p99 ms | server cores busy | "
             f"avg batch ({'/'.join(composing)}) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for pts in r["perf_analyzer"].values():
        for p in pts:
            c, s = p["client"], p["server"]
            batches = "/".join(f"{(s.get(m) or {}).get('avg_batch') or 0:.1f}" for m in composing)
            lines.append(f"| {p['protocol']} | {p['mode']} | {p['value']:g} | {float(c['Inferences/Second']):.0f} | "
                         f"{float(c['p50 latency']) / 1000:.1f} | {float(c['p90 latency']) / 1000:.1f} | "
                         f"{float(c['p99 latency']) / 1000:.1f} | {_usage(p['usage'], 'cpu_cores_busy', '.2f')} | "
                         f"{batches} |")
    lines += rate_section(r)
    lines += ["", "### Server-side breakdown per model (µs per request; Triton statistics API)", "",
              "| protocol | concurrency | model | queue | compute input | compute infer | compute output | avg batch |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for proto in ("http", "grpc"):
        for p in r["perf_analyzer"].get(proto, []):
            for m, s in sorted(p["server"].items()):
                lines.append(f"| {proto} | {p['value']:g} | {m} | {s['queue_us']:.0f} | "
                             f"{s['compute_input_us']:.0f} | "
                             f"{s['compute_infer_us']:.0f} | {s['compute_output_us']:.0f} | "
                             f"{s['avg_batch'] or 0:.2f} |")
    if not any(p.get("metrics") for pts in r["perf_analyzer"].values() for p in pts):
        return lines + ["", "Prometheus metrics: not scraped (a deployment's endpoint: `--metrics-url`).", ""]
    lines += ["", "### Prometheus metrics scraped during each run", "",
              "| protocol | mode | value | Triton CPU utilisation | Triton memory (MiB) | "
              f"avg batch from metrics ({'/'.join(composing)}) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for pts in r["perf_analyzer"].values():
        for p in pts:
            m = p.get("metrics") or {}
            models = m.get("models", {})
            batches = "/".join(f"{(models.get(x) or {}).get('avg_batch') or 0:.1f}" for x in composing)
            util = m.get("cpu_utilization")
            lines.append(f"| {p['protocol']} | {p['mode']} | {p['value']:g} | "
                         f"{'n/a' if util is None else f'{100 * util:.0f}%'} | "
                         f"{m.get('cpu_memory_used_mib', 0):.0f} | {batches} |")
    return lines + [""]


def workloads_section(r: dict) -> list[str]:
    """The workloads measured in this run (perf/report/workloads.py): side by side, p99 against concurrency, and the
    architecture table."""
    if "workloads" not in r:
        return []
    from perf.report import workloads

    w = r["workloads"]
    lines = ["## Workloads", "", f"Measured in this run ({w['when']}) by perf/report/workloads.py: each on its fastest "
             "engine, Triton side by side with the baseline and the ceiling (wrk, alternating rounds), then Triton "
             "alone against concurrency.", "", *workloads.markdown(w).splitlines(), "",
             *workloads.latency_markdown(w).splitlines(), "", *workloads.architectures_markdown(w).splitlines(), ""]
    lines += [f"Not measured: {name}: {why}" for name, why in w["not_measured"].items()]
    return lines + [""]


def tuning_section(tuning: dict | None) -> list[str]:
    if not tuning:
        return ["## Batching auto-tuning", "", "Not run for this report (`make tune` runs the sweep and writes the "
                "winner back to the repository; the next report includes it).", ""]
    b = tuning["best"]
    lines = ["## Batching auto-tuning", "",
             f"Sweep at concurrency {tuning['concurrency']} over {tuning['protocol']}, p99 budget "
             f"{tuning['p99_budget_ms']:g} ms ({'met' if tuning['budget_met'] else 'NOT met by any configuration'}); "
             f"chosen: {b['settings']} → {b['throughput']:.0f} img/s, p99 {b['p99_ms']:.1f} ms "
             f"(medians over {tuning.get('rounds', 1)} round(s), the order rotated each round).", "",
             "| queue delay µs | preferred | instances pre/cls | img/s (median [range]) | p99 ms (median) |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {x['settings']['queue_delay_us']} | {x['settings']['preferred_batch_sizes']} | "
              f"{x['settings']['preprocess_instances']}/{x['settings']['classifier_instances']} | "
              f"{x['throughput']:.0f}{_throughput_range(x)} | {x['p99_ms']:.1f} |" for x in tuning["results"]]
    return lines + [""]


def _throughput_range(x: dict) -> str:
    """A tuning result's throughput range over its rounds, when it has one."""
    return " [{:.0f}–{:.0f}]".format(*x["throughput_range"]) if "throughput_range" in x else ""



TEMPLATES = Path(__file__).resolve().parent / "templates"


def to_html(md_text: str, title: str) -> str:
    """report.md as a standalone page: Python-Markdown (tables, fenced code, the <details> blocks) inside
    the Jinja2 page template, with a table of contents of the second-level headings."""
    import re
    from datetime import datetime

    import jinja2
    import markdown as md

    body = md.markdown(md_text, extensions=["tables", "fenced_code", "md_in_html", "toc"])
    sections = [{"id": m.group(1), "title": re.sub(r"<[^>]+>", "", m.group(2))}
                for m in re.finditer(r'<h2 id="([^"]+)">(.*?)</h2>', body)]
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=jinja2.select_autoescape(["j2"]))
    return env.get_template("report.html.j2").render(
        title=title, body=jinja2.utils.markupsafe.Markup(body), sections=sections, images=body.count("<img "),
        generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))
