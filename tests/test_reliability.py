"""Reliability against the real tritonserver: restricted control APIs, overload (queue policy and the
client's backoff), start-up that leaves nothing behind, graceful shutdown under load."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from build import layouts
from build.model_config import read_configs
from build.render_repo import render
from build.settings import RepoSettings, read_manifest
from clients import admin
from clients.client import ImageClassifierClient, error_message, error_status, image_input
from core import protocol as P
from core.metadata import read_metadata
from serve.server import PROJECT_ROOT, TritonServer

KEY = "test-key-0123456789"


# ---------------------------------------------------------------------------------------------
# restricted control: model-repository, model-config, logging, trace, shared-memory need the key
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def restricted(repo, tmp_path_factory):
    with TritonServer(repo, None, admin_key=KEY, log_file=tmp_path_factory.mktemp("logs") / "restricted.log") as s:
        yield s


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_control_apis_need_the_key(restricted, repo, protocol):
    url = restricted.http_url if protocol == "http" else restricted.grpc_url
    refused = "403" if protocol == "http" else "StatusCode.UNAVAILABLE"
    for key in (None, "wrong-key"):
        with admin.AdminClient(url, protocol, key, timeout_s=30) as c:
            with pytest.raises(Exception) as e:
                c.index()
            assert str(e.value.status()) == refused and "restricted" in e.value.message()
    with admin.AdminClient(url, protocol, KEY, timeout_s=30) as c:
        assert {m["name"] for m in c.index()} == set(read_configs(repo))


def test_other_restricted_apis_and_open_ones_over_http(restricted, val_files):
    c = httpclient.InferenceServerClient(restricted.http_url, network_timeout=30)
    hdr = admin.headers("http", KEY)
    for call in (lambda h: c.get_model_config(P.ENSEMBLE, headers=h), lambda h: c.get_log_settings(headers=h),
                 lambda h: c.get_trace_settings(headers=h), lambda h: c.get_system_shared_memory_status(headers=h)):
        with pytest.raises(Exception, match="restricted"):
            call(None)
        call(hdr)  # accepted with the key
    # inference, health, metadata and statistics stay open
    assert c.is_server_ready() and c.is_model_ready(P.ENSEMBLE)
    assert c.get_model_metadata(P.ENSEMBLE)["name"] == P.ENSEMBLE
    assert c.get_inference_statistics(P.ENSEMBLE)["model_stats"]
    with ImageClassifierClient(restricted.grpc_url, "grpc", timeout_s=30) as cl:
        assert cl.classify_files(val_files[:2])[0].ok


def listening_addresses(port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The local addresses with a socket in LISTEN state on ``port`` (the kernel's /proc/net/tcp{,6})."""
    out = []
    for table, _size in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(addr)  # stored as 32-bit words in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                out.append(ipaddress.ip_address(raw))
    return out


def test_server_listens_on_loopback_only(restricted):
    for port in (restricted.ports.http, restricted.ports.grpc, restricted.ports.metrics):
        addresses = listening_addresses(port)
        assert addresses, f"nothing listens on {port}"
        for a in addresses:
            assert a.is_loopback or (a.version == 6 and a.ipv4_mapped and a.ipv4_mapped.is_loopback), \
                f"port {port} listens on {a}"


def test_admin_key_file_is_generated_private_and_reused(tmp_path, monkeypatch):
    monkeypatch.delenv(admin.KEY_ENV, raising=False)
    path = tmp_path / "sub" / "admin.key"
    assert admin.load_key(path=path) is None  # not created unless asked
    key = admin.load_key(create=True, path=path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(key) >= 32
    assert admin.load_key(create=True, path=path) == key  # the same key every time
    path.chmod(0o644)
    with pytest.raises(admin.AdminKeyError, match="readable by others"):
        admin.load_key(path=path)
    monkeypatch.setenv(admin.KEY_ENV, "from-env")
    assert admin.load_key(path=path) == "from-env"


def test_admin_cli_sends_the_key(restricted, tmp_path):
    keyfile = tmp_path / "admin.key"
    keyfile.write_text(KEY + "\n")
    keyfile.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != admin.KEY_ENV}

    def run(e):
        return subprocess.run([sys.executable, "-m", "clients.admin", "index", "--url", restricted.http_url],
                              capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60, env=e)

    ok = run({**env, admin.KEY_FILE_ENV: str(keyfile)})
    assert ok.returncode == 0 and f'"name": "{P.ENSEMBLE}"' in ok.stdout, ok.stderr
    refused = run({**env, admin.KEY_FILE_ENV: str(tmp_path / "none.key")})
    assert refused.returncode == 1 and "restricted" in refused.stderr


# ---------------------------------------------------------------------------------------------
# overload: a bounded queue answers 503 / UNAVAILABLE at once; the client backs off and retries
# ---------------------------------------------------------------------------------------------

SMALL_QUEUE = 2


@pytest.fixture(scope="module")
def small_queue(onnx_model, tmp_path_factory):
    """A server whose models queue at most SMALL_QUEUE requests: easy to overload on purpose. One instance
    per model, so the queue stays full while a flood lasts (with the default three, a request often finds
    the slot just freed, and the client test below was never refused in one full run)."""
    repo = tmp_path_factory.mktemp("small_queue_repo")
    render(onnx_model, repo, RepoSettings(max_batch_size=8, top_k=3, max_queue_size=SMALL_QUEUE, preprocess_instances=1,
                                          classifier_instances=1))
    with TritonServer(repo, None, log_file=tmp_path_factory.mktemp("logs") / "small_queue.log") as s:
        yield s


async def flood(url: str, blobs: list[bytes], requests: int, in_flight: int) -> dict[str, list[str]]:
    """``requests`` batches, ``in_flight`` at a time, no retries: outcome -> messages."""
    import tritonclient.http.aio as aio

    client = aio.InferenceServerClient(url, conn_timeout=60)
    gate, out = asyncio.Semaphore(in_flight), {"ok": [], "rejected": [], "other": []}

    async def one():
        async with gate:
            try:
                r = await client.infer(P.ENSEMBLE, [image_input(httpclient, blobs)],
                                       outputs=[httpclient.InferRequestedOutput(P.LABELS)])
                out["ok"].append(r.as_numpy(P.LABELS)[0][0].decode())
            except Exception as e:
                msg = error_message(e)
                overload = error_status(e) == "503" and "Exceeds maximum queue size" in msg
                out["rejected" if overload else "other"].append(msg)
    try:
        await asyncio.gather(*(one() for _ in range(requests)))
    finally:
        await client.close()
    return out


def test_overload_is_rejected_with_503_and_the_server_keeps_serving(small_queue, val_files):
    with ImageClassifierClient(small_queue.http_url, timeout_s=30, retries=0) as c:
        before = c.classify_files(val_files[:8])
    out = asyncio.run(flood(small_queue.http_url, [f.read_bytes() for f in val_files[:8]], requests=64, in_flight=32))
    assert out["other"] == []  # every answer is either a result or a clean overload refusal
    assert out["rejected"], "32 batches in flight against queues of 2 were never refused"
    assert out["ok"] and set(out["ok"]) == {before[0].labels[0]}  # the accepted ones are answered correctly
    with ImageClassifierClient(small_queue.grpc_url, "grpc", timeout_s=30, retries=0) as c:
        after = c.classify_files(val_files[:8])
    assert [p.labels for p in after] == [p.labels for p in before]


def test_client_backs_off_and_retries_after_503(small_queue, val_files):
    """Each round: 32 clients keep the queues (2 deep) full for FLOOD_S; our client sends a request half a
    second in, so it is refused (the queue is full whenever it arrives, but for a slot that just freed),
    backs off and gets its answer once the flood is over. Over three rounds it must have retried."""
    from perf.reliability import counts, worker

    FLOOD_S = 3.0
    flood_batches = [[f.read_bytes() for f in val_files[i:i + 8]] for i in range(0, 16, 8)]
    with ImageClassifierClient(small_queue.http_url, timeout_s=30, retries=0) as c:
        expected = [p.labels for p in c.classify_files(val_files[:4], batch_size=4)]
    flood_calls: list = []
    got = []
    with ImageClassifierClient(small_queue.http_url, timeout_s=30, retries=12, backoff_s=0.05, max_backoff_s=1.0) as c:
        for _ in range(3):
            until = time.monotonic() + FLOOD_S

            def flood_round(until=until):
                async def run():
                    await asyncio.gather(*(worker("http", small_queue.http_url, flood_batches, flood_calls,
                                                  lambda: time.monotonic() < until) for _ in range(32)))
                asyncio.run(run())

            t = threading.Thread(target=flood_round)
            t.start()
            try:
                time.sleep(0.5)
                got.append(c.classify_files(val_files[:4], batch_size=4))  # one request of 4 images
            finally:
                t.join(timeout=120)
    assert counts(flood_calls)["overloaded"] > 0 and counts(flood_calls)["error"] == 0
    for preds in got:
        assert all(p.ok for p in preds), [p.error for p in preds if not p.ok]
        assert [p.labels for p in preds] == expected
    assert c.retried >= 1  # it was refused on the way, and still got every answer


@pytest.mark.parametrize("layout", ["fused", "postprocess", "classification"])
def test_queue_policy_is_rendered_for_every_model_that_queues(onnx_model, tmp_path, layout):
    render(onnx_model, tmp_path, RepoSettings(max_queue_size=7, queue_timeout_ms=1500), layout=layout)
    configs = read_configs(tmp_path)
    for name in layouts.get(layout).python_models():
        policy = configs[name].dynamic_batching.default_queue_policy
        assert (policy.max_queue_size, policy.default_timeout_microseconds) == (7, 1_500_000), name
    if layout != "fused":  # an ensemble has no queue of its own
        assert not configs[P.ENSEMBLE].HasField("dynamic_batching")


# ---------------------------------------------------------------------------------------------
# graceful shutdown and fuzzing (perf/reliability.py: the same code `make reliability` runs bigger)
# ---------------------------------------------------------------------------------------------

def test_stop_under_load_drains_and_loses_no_accepted_request(repo, val_files, tmp_path):
    from perf.reliability import shutdown_under_load
    from serve.server import EXIT_TIMEOUT_S

    r = shutdown_under_load(repo, [f.read_bytes() for f in val_files[:16]], workers=6, load_s=1.5,
                            log_file=tmp_path / "server.log")
    assert r["ok"] > 0 and r["answered_of_those"] == r["sent_before_stop"]
    assert r["lost"] == 0, r["examples"]  # nothing cut mid-flight, no errors
    assert r["refused"] >= 1  # requests after the stop began were refused, each client once
    assert r["exit_s"] <= EXIT_TIMEOUT_S and r["returncode"] == 0


def test_fuzzed_requests_are_answered_and_the_server_survives(server, val_files):
    from perf.reliability import fuzz

    r = fuzz(server, [f.read_bytes() for f in val_files[:16]], n=300, seed=1, check_every=50)
    assert r["failures"] == [], r["failures"][:5]
    assert r["stubs_same"] and r["server_alive"]
    statuses = {s for kinds in r["by_kind"].values() for s in kinds}
    assert "400" in statuses and "0" not in statuses
    assert set(r["by_kind"]) == {"random_bytes", "mutated_image", "truncated_image", "huge_dimensions", "wrong_dtype",
                                 "wrong_shape", "wrong_input", "malformed_header", "oversized"}


# ---------------------------------------------------------------------------------------------
# live model updates: publish and roll back under load, refuse broken versions
# ---------------------------------------------------------------------------------------------

def worse_model(onnx_path: Path, out: Path, num_classes: int) -> Path:
    """The same model with its classifier's rows rolled by one: every prediction moves to the next class."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(onnx_path))
    for init in m.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.ndim in (1, 2) and a.shape[0] == num_classes:
            init.CopyFrom(numpy_helper.from_array(np.roll(a, 1, axis=0), init.name))
    onnx.save(m, str(out))
    return out


def version_states(url: str, model: str) -> dict[str, str]:
    with admin.AdminClient(url, "http", KEY, timeout_s=30) as c:
        return {m["version"]: m["state"] for m in c.index() if m["name"] == model}


@pytest.mark.parametrize("layout", ["fused", "postprocess"])
def test_publish_and_rollback_under_load_fail_no_request(repo, ensemble_repo, onnx_model, tiny_data, val_files,
                                                         tmp_path, layout):
    """The new version goes to the model that runs the ONNX: the fused model itself, or the ensemble's classifier."""
    import shutil

    from perf.reliability import background_load, counts, examples
    from serve.publish import PublishError, onnx_model_dir, publish, rollback, versions

    live = tmp_path / "repo"
    shutil.copytree(repo if layout == "fused" else ensemble_repo, live)
    model_dir = onnx_model_dir(live)
    assert model_dir.name == (P.ENSEMBLE if layout == "fused" else P.CLASSIFIER)

    def classifier_states(url):
        return version_states(url, model_dir.name)

    num_classes = len(read_metadata(onnx_model)["classes"])
    with TritonServer(live, None, model_control="explicit", admin_key=KEY, log_file=tmp_path / "server.log") as s:
        batches = [[f.read_bytes() for f in val_files[i:i + 4]] for i in range(0, 16, 4)]
        with background_load(s, batches, workers=4) as calls:
            r = publish(onnx_model, live, tiny_data, s.http_url, key=KEY)
            assert r["version"] == 2 and r["top1_new"] == r["top1_served"]
            assert classifier_states(s.http_url).get("2") == "READY"
            assert classifier_states(s.http_url).get("1") != "READY"  # latest-1 policy: the old one went
            # refused before the server sees them: a worse model, a corrupt file
            with pytest.raises(PublishError, match="accuracy gate"):
                publish(worse_model(onnx_model, tmp_path / "worse.onnx", num_classes), live, tiny_data, s.http_url,
                        key=KEY)
            corrupt = tmp_path / "corrupt.onnx"
            corrupt.write_bytes(onnx_model.read_bytes()[:5000])
            with pytest.raises(PublishError, match="not a loadable"):
                publish(corrupt, live, tiny_data, s.http_url, key=KEY)
            # refused by the server itself: the version is moved aside, the served one stays
            with pytest.raises(PublishError, match="did not load version 3"):
                publish(corrupt, live, None, s.http_url, key=KEY, check=False)
            assert versions(model_dir) == [1, 2] and classifier_states(s.http_url).get("2") == "READY"
            r = rollback(live, s.http_url, key=KEY)
            assert r["version"] == 1 and classifier_states(s.http_url).get("1") == "READY"
            assert versions(model_dir) == [1]
    c = counts(calls)
    assert c["ok"] > 0 and c["ok"] == len(calls), (c, examples(calls, ("refused", "cut", "error", "overloaded")))



# ---------------------------------------------------------------------------------------------
# faults: a killed Python stub is brought back (serve/watchdog.py)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["fused", "postprocess"])
def test_killed_python_stub_is_detected_and_its_model_reloaded(repo, ensemble_repo, val_files, tmp_path, layout):
    """Triton 2.51 alone answers 500 "Stub process ... is not healthy" for good once a stub died (watch_stubs=False:
    the same test then fails with reloaded_s None); the watchdog reloads the model."""
    from perf.reliability import stub_faults

    repo = repo if layout == "fused" else ensemble_repo
    with TritonServer(repo, None, model_control="explicit", admin_key=KEY, log_file=tmp_path / "server.log") as s:
        r = stub_faults(s, [f.read_bytes() for f in val_files[:16]], workers=2, settle_s=0.5, answers_after=10)
        assert {x["model"] for x in r} == set(layouts.get(read_manifest(repo)["layout"]).python_models())
        for x in r:
            assert x["how"] == "killed by signal 9" and x["error"] == "", x
            assert x["reloaded_s"] is not None and x["reloaded_s"] < 30, x
            assert x["failed_after"] == 0 and x["answered_after"] > 0, json.dumps(r)
        with ImageClassifierClient(s.http_url, timeout_s=30, retries=0) as c:
            assert all(p.ok for p in c.classify_files(val_files[:4]))
        assert any("reloading the model" in line for line in s.log)
