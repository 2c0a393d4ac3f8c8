"""Headless locust runs: fixed users, spawn rate and duration; CSV and locust's HTML report kept.

    python -m perf.load.loadtest --user TritonHttpUser --host http://localhost:8000 --users 16 --duration 20
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from clients.client import Tls
from clients.keys import INFERENCE
from perf.load.stats import UsageMeter
from perf.paths import PROJECT_ROOT
from serve import die_with_parent

LOCUSTFILE = PROJECT_ROOT / "perf" / "load" / "locustfile.py"
USERS = ("TritonHttpUser", "TritonGrpcUser", "BaselineUser")
TRITON_USERS = {"http": "TritonHttpUser", "grpc": "TritonGrpcUser"}  # Triton's user of each protocol
TLS_ENV = "LOAD_TLS"  # TritonGrpcUser's TLS: clients.client.Tls's fields as JSON (locustfile.py)


def run_locust(user: str, host: str, users: int, duration_s: int, out_dir: Path, images: Path,
               labels: Path | None = None, top_k: int = 5, grpc_url: str | None = None, spawn_rate: float | None = None,
               server_pid: int | None = None, key: str | None = None, tls: Tls | None = None) -> dict:
    """One headless run; returns the aggregated row (requests/s, failures, percentiles in ms). ``key``: the
    inference key Triton's users send (None: none); ``tls``: TritonGrpcUser's gRPC over TLS."""
    if user not in USERS:
        raise ValueError(f"user must be one of {USERS}")
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / f"locust_{user}_{users}u"
    # the users send the key they find in the environment: exactly this one, or none
    env = {k: v for k, v in os.environ.items() if k != INFERENCE.env}
    env |= {"PYTHONPATH": str(PROJECT_ROOT), "LOAD_IMAGES": str(images), "LOAD_TOPK": str(top_k),
            **({INFERENCE.env: key} if key else {})}
    if labels:
        env["LOAD_LABELS"] = str(labels)
    if grpc_url:
        env["LOAD_GRPC"] = grpc_url
    if tls:
        env[TLS_ENV] = json.dumps({k: v and str(v) for k, v in asdict(tls).items()})
    cmd = [str(Path(sys.executable).parent / "locust"), "-f", str(LOCUSTFILE), "--headless", "-u", str(users),
           "-r", str(spawn_rate or users), "-t", f"{duration_s}s", "--host", host, "--csv", str(prefix),
           "--html", f"{prefix}.html", "--only-summary", "--stop-timeout", "5", "--exit-code-on-error", "0", user]
    meter = UsageMeter(server_pid).start() if server_pid else None
    try:  # locust dies with us, however we die (a killed make); a timeout or Ctrl-C kills it (subprocess.run)
        r = subprocess.run([*die_with_parent(), *cmd], env=env, capture_output=True, text=True,
                           timeout=duration_s + 60, cwd=PROJECT_ROOT)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"locust did not stop {duration_s + 60} s after starting a {duration_s} s run; killed it. "
                           f"Output:\n{(e.stdout or b'')[-2000:]!r}") from None
    usage = meter.stop() if meter else {}
    Path(f"{prefix}.log").write_text(r.stdout + r.stderr)
    stats = Path(f"{prefix}_stats.csv")
    if r.returncode != 0 or not stats.exists():
        raise RuntimeError(f"locust failed ({' '.join(cmd)}):\n{(r.stdout + r.stderr)[-2000:]}")
    with open(stats) as f:
        row = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    if int(row["Request Count"]) == 0:  # locust writes N/A for every percentile then
        raise RuntimeError(f"locust completed no request in its {duration_s} s run against {host} ({user}): the "
                           f"server did not answer in time, or the machine was too busy to send; {prefix}.log")
    failures = []
    fail_csv = Path(f"{prefix}_failures.csv")
    if fail_csv.exists():
        with open(fail_csv) as f:
            failures = [{"error": x["Error"], "count": int(x["Occurrences"])} for x in csv.DictReader(f)]
    result = {"user": user, "users": users, "duration_s": duration_s,
              "requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
              "rps": float(row["Requests/s"]), "p50_ms": float(row["50%"]), "p90_ms": float(row["90%"]),
              "p99_ms": float(row["99%"]), "avg_ms": float(row["Average Response Time"]),
              "failure_kinds": failures, "usage": usage, "html": f"{prefix}.html", "csv": str(stats)}
    print(f"locust {user} x{users}: {result['rps']:.0f} req/s, p50 {result['p50_ms']:.0f} ms, "
          f"p99 {result['p99_ms']:.0f} ms, {result['failures']} failures of {result['requests']}")
    return result


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Headless locust run against Triton or the baseline")
    p.add_argument("--user", choices=USERS, default="TritonHttpUser")
    p.add_argument("--host", default="http://localhost:8000")
    p.add_argument("--grpc-url", default="localhost:8001")
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--duration", type=int, default=20)
    p.add_argument("--images", type=Path, default=Path("data/synthetic/val"))
    p.add_argument("--labels", type=Path, help="class names, one per line (default: those of model_repository)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("perf/reports/locust"))
    return p


if __name__ == "__main__":
    a = get_args_parser().parse_args()
    if a.labels is None:
        from build.render_repo import labels_file

        a.labels = labels_file(Path("model_repository"))
    res = run_locust(a.user, a.host, a.users, a.duration, a.out, a.images, a.labels, a.top_k, a.grpc_url)
    print(json.dumps(res, indent=2))
