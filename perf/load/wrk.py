"""The wrk driver: any HTTP server measured by one generator, wrk (C, event loop; Debian's package).

perf_analyzer speaks only Triton's protocols and locust is itself CPU-bound on 2 cores, so neither can
compare Triton with other servers fairly. wrk drives any HTTP server: post_bodies.lua (beside this module)
POSTs pre-built bodies in turn, the same JPEGs for every server, one image per request (each server batches
on its own side), as a KServe v2 binary-tensor request for Triton and as raw bytes for the baseline and Ray
Serve, as a multipart file upload for BentoML (how their clients send a file). The generator's own CPU (its
user + system time over the run, from getrusage) is reported, since it shares the cores with the servers.

Every target measured in alternating rounds: perf/load/rounds.py; `make compare`: perf/reference/compare.py.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from perf.load.bodies import request_body

LUA = Path(__file__).resolve().parent / "post_bodies.lua"

@dataclass(frozen=True)
class Target:
    name: str
    url: str      # http://host:port
    path: str     # what to POST to
    kind: str     # "kserve": a KServe v2 binary-tensor request; "raw": the encoded image as the body;
                  # "multipart": the image as the form file field "images"


def wrk_binary() -> str:
    exe = shutil.which("wrk")
    if not exe:
        raise FileNotFoundError("wrk not found: `make venv` installs it (Debian package wrk)")
    return exe


def write_bodies(images: list[bytes], kind: str, out: Path) -> int:
    """One request body per image into ``out``, with its headers beside it; how many."""
    out.mkdir(parents=True, exist_ok=True)
    for i, blob in enumerate(images):
        body, headers = request_body(blob, kind)
        (out / f"{i:05d}.hdr").write_text("".join(f"{k}: {v}\n" for k, v in headers.items()))
        (out / f"{i:05d}.bin").write_bytes(body)
    return len(images)


def read_headers(path: Path) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in path.read_text().splitlines() if ": " in line)


def check_bodies(target: Target, bodies: Path, count: int) -> None:
    """Every body is answered 200 by ``target`` before it is measured: wrk counts statuses, not answers."""
    import urllib.error
    import urllib.request

    for i in range(count):
        req = urllib.request.Request(target.url + target.path, (bodies / f"{i:05d}.bin").read_bytes(),
                                     read_headers(bodies / f"{i:05d}.hdr"))
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                r.read()
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{target.name} answered request body {i} with {e.code}: {e.read()[:300]!r}") from None


def run_wrk(target: Target, bodies: Path, count: int, seconds: int, connections: int, threads: int) -> dict:
    """One wrk run of ``seconds`` (whole: wrk takes no fractions) against ``target``: its figures, and the
    generator's CPU in cores."""
    if int(seconds) != seconds or seconds < 1:
        raise ValueError(f"wrk runs for whole seconds, not {seconds}")
    cmd = [wrk_binary(), "-t", str(threads), "-c", str(connections), "-d", f"{int(seconds)}s", "--timeout", "30s",
           "-s", str(LUA), target.url + target.path, "--", str(bodies), str(count), target.path]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if r.returncode != 0 or line is None:
        raise RuntimeError(f"wrk against {target.name} failed ({r.returncode}): "
                           f"{r.stderr[-1000:] or r.stdout[-1000:]}")
    out = json.loads(line.split(" ", 1)[1])
    wall = out["duration_us"] / 1e6
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    out.update(seconds=round(wall, 2), per_s=round(out["requests"] / wall, 1),
               errors=sum(out[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors",
                                           "timeouts")),
               generator_cores=round(cpu_s / wall, 3))
    return out


def latency_sweep(target: Target, images: list[bytes], concurrencies: Sequence[int], seconds: int = 5,
                  threads: int = 2) -> list[dict]:
    """p50/p99 and throughput of ``target`` at each number of connections, one wrk run each, ascending (a
    closed loop: each connection sends its next request when the answer arrives)."""
    with tempfile.TemporaryDirectory(prefix="sweep-bodies-") as tmp:
        count = write_bodies(images, target.kind, Path(tmp))
        check_bodies(target, Path(tmp), count)
        run_wrk(target, Path(tmp), count, 2, min(concurrencies), min(threads, min(concurrencies)))  # untimed warm-up
        rows = []
        for c in sorted(concurrencies):
            r = run_wrk(target, Path(tmp), count, seconds, c, min(threads, c))
            rows.append({"concurrency": c, "images_per_s": r["per_s"], "p50_ms": r["p50_us"] / 1e3,
                         "p99_ms": r["p99_us"] / 1e3, "errors": r["errors"]})
    return rows


def within_budget(rows: list[dict], p99_budget_ms: float) -> dict | None:
    """The highest concurrency whose p99 is within the budget (and answered every request), or None."""
    ok = [r for r in rows if r["p99_ms"] <= p99_budget_ms and r["errors"] == 0]
    return max(ok, key=lambda r: r["concurrency"]) if ok else None


# Saturation: the sweep's highest throughput, and the latency it costs to get near it (this share of it)
SATURATION_SHARE = 0.9


def saturation(rows: list[dict], share: float = SATURATION_SHARE) -> dict:
    """The sweep's highest throughput (of the points that answered every request, if any did) and the lowest
    concurrency reaching ``share`` of it, with that point's throughput and p99."""
    answered = [r for r in rows if r["errors"] == 0] or rows
    peak = max(answered, key=lambda r: r["images_per_s"])
    near = min((r for r in answered if r["images_per_s"] >= share * peak["images_per_s"]),
               key=lambda r: r["concurrency"])
    return {"peak_images_per_s": peak["images_per_s"], "peak_concurrency": peak["concurrency"], "share": share,
            "concurrency": near["concurrency"], "images_per_s": near["images_per_s"], "p99_ms": near["p99_ms"]}
