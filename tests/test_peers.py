"""The peers `make compare` measures beside Triton: real Ray Serve and real BentoML, each from its own
virtualenv (`make peers`), serving the session's model with the same preprocessing and batching
settings, answering as Triton does, measured by the same generator, and leaving no process behind."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from contextlib import ExitStack

import numpy as np
import psutil
import pytest

from clients.client import ImageClassifierClient
from core import protocol as P
from perf.load.bodies import request_body
from perf.load.rounds import compare
from perf.load.wrk import Target
from perf.reference.compare_report import render_markdown
from perf.reference.peers import launch
from serve.server import free_ports


@pytest.fixture(scope="module")
def peers(repo, val_files, tmp_path_factory):
    """name -> base URL of each peer, both running for the module."""
    out = tmp_path_factory.mktemp("peers")
    spec = launch.write_spec(repo, out / "spec.json")
    with ExitStack() as stack:
        running = {}
        for name, peer in launch.PEERS.items():
            running[name] = stack.enter_context(launch.running(peer, spec, free_ports(1)[0], out / f"{name}.log",
                                                               val_files[0].read_bytes()))
        yield running


def ask(peer: launch.Peer, url: str, image: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url + peer.path, *request_body(image, peer.kind))
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, answer = r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        status, answer = e.code, json.loads(e.read())
    return status, answer[0] if isinstance(answer, list) else answer  # BentoML answers a batch of one


def test_peers_answer_as_triton_does(peers, server, val_files):
    """The same ONNX, preprocessing and top-k: every peer's labels and scores are Triton's."""
    with ImageClassifierClient(server.http_url, timeout_s=30) as c:
        expected = c.classify_files(val_files[:8])
    for name, url in peers.items():
        answers = [ask(launch.PEERS[name], url, f.read_bytes()) for f in val_files[:8]]
        assert all(status == 200 for status, _ in answers), (name, answers)
        assert [a["labels"] for _, a in answers] == [p.labels for p in expected], name
        np.testing.assert_allclose([a["scores"] for _, a in answers], [p.scores for p in expected], atol=1e-5)
        status, bad = ask(launch.PEERS[name], url, b"not an image")
        # the peers run Triton's own stages (served/stages.py): the same refusal, with the same words
        assert "not a JPEG or PNG image" in bad["error"], (name, status, bad)


def test_peers_measured_side_by_side_with_triton(peers, server, val_files, tmp_path):
    targets = [Target("triton (fused)", f"http://{server.http_url}", f"/v2/models/{P.ENSEMBLE}/infer", "kserve")]
    targets += [Target(launch.PEERS[n].name, url, launch.PEERS[n].path, launch.PEERS[n].kind)
                for n, url in peers.items()]
    r = compare(targets, [f.read_bytes() for f in val_files[:8]], rounds=2, seconds=2, connections=4, threads=1,
                warmup_s=1)
    for t in targets:
        s = r["summary"][t.name]
        assert s["errors"] == 0, (t.name, s)
        assert s["requests"] > 0, (t.name, s)
    md = render_markdown(r)
    assert "| ray serve |" in md
    assert "| bentoml |" in md
    assert "best peer (" in md


def test_a_stopped_peer_leaves_no_process(repo, val_files, tmp_path):
    """Ray's actors leave the peer's process group (and outlive a raylet stopped first): all must go."""
    spec = launch.write_spec(repo, tmp_path / "spec.json")
    with launch.running(launch.PEERS["ray"], spec, free_ports(1)[0], tmp_path / "ray.log", val_files[0].read_bytes()):
        (main,) = [c for c in psutil.Process().children() if str(spec) in c.cmdline()]
        tree = [main, *main.children(recursive=True)]
        actors = [p for p in tree if p.name().startswith("ray::") or "ServeReplica" in " ".join(p.cmdline())]
        assert actors, [p.cmdline()[:2] for p in tree]
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, [(p.pid, p.cmdline()[:2]) for p in alive]
