"""The statistics of a measurement: a figure's spread over rounds, the server's own (its statistics API and
Prometheus metrics), the CPU and memory of its process tree, and the machine it ran on."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def spread(xs: list[float]) -> dict:
    """A figure over rounds: its median and range."""
    return {"median": round(float(np.median(xs)), 2), "min": round(min(xs), 2), "max": round(max(xs), 2)}


# ------------------------------------------------------------------------------------------------
# server-side statistics
# ------------------------------------------------------------------------------------------------

def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def model_stats(http_url: str) -> dict[str, dict]:
    """Cumulative per-model statistics from Triton's statistics extension, keyed by model name."""
    stats = get_json(f"http://{http_url}/v2/models/stats")["model_stats"]
    return {s["name"]: s for s in stats}


STAGES = ("queue", "compute_input", "compute_infer", "compute_output")


def stats_delta(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    """Per model over an interval: requests, executions, average batch and average µs per stage."""
    out = {}
    for name, a in after.items():
        b = before.get(name, {})
        inf = a["inference_stats"]
        binf = b.get("inference_stats", {})
        n = inf["success"]["count"] - binf.get("success", {}).get("count", 0)
        if n <= 0:
            continue
        row = {"requests": n,
               "inferences": a["inference_count"] - b.get("inference_count", 0),
               "executions": a["execution_count"] - b.get("execution_count", 0)}
        row["avg_batch"] = row["inferences"] / row["executions"] if row["executions"] else None
        for stage in STAGES:
            ns = inf[stage]["ns"] - binf.get(stage, {}).get("ns", 0)
            row[f"{stage}_us"] = ns / n / 1000.0
        out[name] = row
    return out


METRIC_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eE]+|NaN)$')


def scrape_metrics(metrics_url: str) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value}."""
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = METRIC_LINE.match(line.strip())
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def metrics_summary(before: dict[str, float], after: dict[str, float]) -> dict:
    """Per model from Prometheus counter deltas (queue and compute time per request, average batch =
    inference count / execution count), plus Triton's own CPU utilisation and memory gauges."""
    def delta(name: str, model: str) -> float:
        key = next((k for k in after if k.startswith(name + "{") and f'model="{model}"' in k), None)
        return after.get(key, 0.0) - before.get(key, 0.0) if key else 0.0

    models = sorted({m.group(1) for k in after if (m := re.search(r'model="([^"]+)"', k))})
    per_model = {}
    for model in models:
        req = delta("nv_inference_request_success", model)
        if req <= 0:
            continue
        execs = delta("nv_inference_exec_count", model)
        per_model[model] = {"requests": req,
                            "avg_batch": delta("nv_inference_count", model) / execs if execs else None,
                            "queue_us": delta("nv_inference_queue_duration_us", model) / req,
                            "compute_infer_us": delta("nv_inference_compute_infer_duration_us", model) / req}
    return {"models": per_model, "cpu_utilization": after.get("nv_cpu_utilization"),
            "cpu_memory_used_mib": (after.get("nv_cpu_memory_used_bytes") or 0) / 2 ** 20}


def process_usage(pid: int) -> dict[str, float]:
    """CPU seconds (user+system, children included) and resident memory of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    cpu = sum(int(x) for x in fields[11:15]) / tick  # utime, stime, cutime, cstime
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return {"cpu_s": cpu, "rss_bytes": rss}


def tree_usage(pid: int) -> dict[str, float]:
    """process_usage summed over a process and its live descendants (Triton + its Python stubs)."""
    pids, total = [pid], {"cpu_s": 0.0, "rss_bytes": 0.0}
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    i = 0
    while i < len(pids):
        pids += children.get(pids[i], [])
        i += 1
    for p in pids:
        try:
            u = process_usage(p)
        except OSError:
            continue
        total["cpu_s"] += u["cpu_s"]
        total["rss_bytes"] += u["rss_bytes"]
    return total


@dataclass
class UsageMeter:
    """CPU utilisation (cores busy) and peak memory of a process tree between start() and stop()."""
    pid: int

    def start(self) -> UsageMeter:
        import time

        self._t0, self._u0 = time.monotonic(), tree_usage(self.pid)
        return self

    def stop(self) -> dict[str, float]:
        import time

        u1, t1 = tree_usage(self.pid), time.monotonic()
        return {"cpu_cores_busy": (u1["cpu_s"] - self._u0["cpu_s"]) / max(1e-9, t1 - self._t0),
                "rss_mib": u1["rss_bytes"] / 2 ** 20}


def machine_info() -> dict:
    import importlib.metadata as md

    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    mem = ""
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        mem = f"{int(f.readline().split()[1]) / 2 ** 20:.1f} GiB"
    versions = {}
    for pkg in ("nvidia-pytriton", "tritonclient", "onnxruntime", "nvidia-dali-cuda120", "torch", "locust", "flask"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions, "tritonserver": "2.51.0 (nvidia-pytriton 0.7.0)"}
