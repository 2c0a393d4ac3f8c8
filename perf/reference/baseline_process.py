"""The naive baseline server (baseline.py) as a child process: started and waited for, then stopped."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def start_baseline(ckpt: str, port: int, log_path: Path) -> subprocess.Popen:
    """The naive baseline server, its output to ``log_path``: Flask logs every request to stderr, and an
    unread pipe fills after about 950 requests and stalls the server (a stalled baseline reads as slow)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, "-m", "perf.reference.baseline", "--ckpt", ckpt, "--port", str(port)],
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


def stop_baseline(baseline: subprocess.Popen) -> None:
    """Stop the baseline server: SIGTERM, and SIGKILL if it is not gone within 10 s."""
    baseline.terminate()
    try:
        baseline.wait(10)
    except subprocess.TimeoutExpired:
        baseline.kill()
        baseline.wait()
