"""What the load harnesses share, below all of them: the request body each server takes, issue 12's
targets and their verdicts, and the naive baseline server.

perf/fair.py (every server under one generator), perf/report (the whole report), perf/peers/launch.py
(the peers' readiness probe) and perf/reliability.py (the fuzzer) import from here; this module imports
none of them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from core import protocol as P

# ------------------------------------------------------------------------------------------------
# request bodies: one encoded image as each server takes it
# ------------------------------------------------------------------------------------------------

MULTIPART_BOUNDARY = "fair-harness-boundary-7d1c"


def kserve_request(inputs: list[tuple[str, str, list[int], bytes]]) -> tuple[bytes, dict[str, str]]:
    """A KServe v2 binary-tensor request body: JSON header, then each input's raw bytes."""
    header = json.dumps({"inputs": [{"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": len(b)}}
                                    for n, d, s, b in inputs]}).encode()
    return header + b"".join(b for *_, b in inputs), {"Inference-Header-Content-Length": str(len(header)),
                                                      "Content-Type": "application/octet-stream"}


def image_request(blob: bytes) -> tuple[bytes, dict[str, str]]:
    return kserve_request([(P.IMAGE, "UINT8", [1, len(blob)], blob)])


def request_body(blob: bytes, kind: str) -> tuple[bytes, dict[str, str]]:
    """The body and headers that send one encoded image as ``kind``."""
    if kind == "kserve":
        body, headers = kserve_request([(P.IMAGE, "UINT8", [1, len(blob)], blob)])
        return body, {"Content-Type": "application/octet-stream", **headers}
    if kind == "raw":
        return blob, {"Content-Type": "application/octet-stream"}
    if kind == "multipart":
        head = (f"--{MULTIPART_BOUNDARY}\r\n"
                "Content-Disposition: form-data; name=\"images\"; filename=\"image.jpg\"\r\n"
                "Content-Type: image/jpeg\r\n\r\n").encode()
        return head + blob + f"\r\n--{MULTIPART_BOUNDARY}--\r\n".encode(), \
            {"Content-Type": f"multipart/form-data; boundary={MULTIPART_BOUNDARY}"}
    raise ValueError(f"kind must be 'kserve', 'raw' or 'multipart', got {kind!r}")


# ------------------------------------------------------------------------------------------------
# issue 12's targets, checked by `make compare` and `make report`
# ------------------------------------------------------------------------------------------------

TARGETS = {"baseline": 6.0, "peer": 1.5, "ceiling": 0.8}  # Triton's throughput over each, at least
PEER_NAMES = ("ray serve", "bentoml")


def verdicts(r: dict) -> list[str]:
    """Each target met or missed, by how much, from the medians of the per-round ratios and the p99s."""
    first, s, ratios = r["targets"][0]["name"], r["summary"], r["throughput_ratios"]
    out = []

    def check(what: str, other: str, target: float, p99: bool) -> None:
        ratio = ratios[f"{first} / {other}"]["median"]
        line = f"{first} / {what}: {ratio:.2f}× (target ≥ {target:g}×: " + \
            ("met" if ratio >= target else f"missed by {100 * (1 - ratio / target):.0f}%") + ")"
        if p99:
            mine, theirs = s[first]["p99_ms"]["median"], s[other]["p99_ms"]["median"]
            line += f"; p99 {mine:g} ms vs {theirs:g} ms ({'lower' if mine < theirs else 'NOT lower'})"
        out.append(line)

    if "baseline" in s:
        check("baseline", "baseline", TARGETS["baseline"], True)
    peers = [n for n in PEER_NAMES if n in s]
    if peers:
        best = max(peers, key=lambda n: s[n]["images_per_s"]["median"])
        check(f"best peer ({best})", best, TARGETS["peer"], True)
    if "in-process ceiling" in s:
        check("in-process ceiling", "in-process ceiling", TARGETS["ceiling"], False)
    return out


# ------------------------------------------------------------------------------------------------
# the naive baseline server
# ------------------------------------------------------------------------------------------------

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
