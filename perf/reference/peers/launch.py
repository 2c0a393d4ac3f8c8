"""Start and stop the peer servers from the project's environment, each in its own virtualenv.

A peer is told what to serve by a spec file written here from the served repository: its ONNX (the
very file Triton serves), the preprocessing and classes from the ONNX metadata, and Triton's batching
settings (max batch, queue delay, instances, DALI and ONNX Runtime threads), so both batch alike.
Each peer runs in its own session; stopping it asks its main process to shut down, then kills what is
left of its process tree, so the helpers a peer starts (Ray's raylet and actors, BentoML's workers) go
with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from build.settings import read_manifest
from core.metadata import read_metadata
from perf.load.bodies import request_body
from perf.paths import PROJECT_ROOT
from serve.publish import served_onnx


@dataclass(frozen=True)
class Peer:
    name: str
    venv: str            # its virtualenv, relative to the project (`make peers` makes it)
    command: tuple       # run with that virtualenv's python, plus --spec FILE --port N
    kind: str            # how a request carries the image (perf.load.bodies.request_body): "raw" or "multipart"
    path: str = "/predict"


PEERS = {
    "ray": Peer("ray serve", ".venv-ray", ("-m", "perf.reference.peers.ray_serve"), "raw"),
    "bentoml": Peer("bentoml", ".venv-bentoml", ("-m", "perf.reference.peers.bento_service"), "multipart"),
}


def write_spec(repo: Path, out: Path) -> Path:
    """What the peers serve, and with which batching: the repository's own model and settings."""
    onnx = served_onnx(repo)
    manifest = read_manifest(repo)
    meta, settings = read_metadata(onnx), manifest["settings"]
    spec = {"onnx": str(onnx.resolve()), "engine": manifest.get("engine", "onnxruntime"),
            "inference_precision": manifest.get("inference_precision") or "f32",
            "preprocess": meta.preprocess.to_dict(), "classes": list(meta.classes),
            "top_k": settings["top_k"], "max_batch_size": settings["max_batch_size"],
            "queue_delay_us": settings["queue_delay_us"], "instances": settings["classifier_instances"],
            "dali_threads": settings["dali_threads"], "intra_op_threads": settings["intra_op_threads"],
            "max_image_pixels": settings["max_image_pixels"], "max_image_bytes": settings["max_image_bytes"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(spec, indent=2))
    return out


def python_of(peer: Peer) -> Path:
    python = PROJECT_ROOT / peer.venv / "bin" / "python"
    if not python.exists():
        raise FileNotFoundError(f"{peer.name} is not installed ({python} missing): run `make peers`")
    return python


def _stop(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Ask the peer to stop (SIGTERM to its main process, which shuts its helpers down in order), then
    SIGKILL whatever of its process tree is left. The tree is read first: Ray's actors leave the peer's
    process group (and are orphaned if the raylet goes first), so neither the group nor a later look
    at the tree would find them all."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            tree += [c for c in p.children(recursive=True) if c not in tree]
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(tree, timeout=10)
    if proc.poll() is None:
        proc.wait(10)


@contextmanager
def running(peer: Peer, spec: Path, port: int, log_path: Path, probe: bytes,
            timeout_s: float = 300.0) -> Iterator[str]:
    """The peer serving on 127.0.0.1:``port``, its base URL, once ``probe`` (an encoded image) is answered 200."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([str(python_of(peer)), *peer.command, "--spec", str(spec), "--port", str(port)],
                                cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{peer.name} exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
            try:
                req = urllib.request.Request(url + peer.path, *request_body(probe, peer.kind))
                with urllib.request.urlopen(req, timeout=10) as r:
                    r.read()
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{peer.name} did not answer within {timeout_s:.0f} s "
                                       f"(log: {log_path})") from None
                time.sleep(0.5)
        yield url
    finally:  # Ctrl-C and errors included: never leave a peer (or its helpers) behind
        _stop(proc)
