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

import pytest
import tritonclient.http as httpclient
from conftest import worse_model

from build import layouts
from build.model_config import read_configs
from build.render_repo import render
from build.settings import RepoSettings, read_manifest
from clients import admin
from clients.client import ImageClassifierClient, ServerUnreachable, Tls, error_message, error_status, image_input
from clients.keys import ADMIN, INFERENCE, UnusableKeyError
from core import protocol as P
from core.metadata import read_metadata
from serve.server import PROJECT_ROOT, GrpcTls, ServerError, TritonServer, access, describe_access, is_loopback
from serve.server import get_args_parser as server_args_parser

KEY = "test-key-0123456789"
INFERENCE_KEY = "test-inference-key-9876543210"


# ---------------------------------------------------------------------------------------------
# restricted access: model-repository, model-config, logging, trace, shared-memory need the admin key;
# inference, metadata and statistics the inference key; health nothing. gRPC over TLS only.
# ---------------------------------------------------------------------------------------------

def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA and a server certificate it signs for localhost and 127.0.0.1: (ca.pem, server_dir)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def pem_key(k):
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    alt = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(alt, critical=False).sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "server.key").write_bytes(pem_key(key))
    (folder / "server.key").chmod(0o600)
    return folder / "ca.pem", folder


@pytest.fixture(scope="module")
def tls_ca(tmp_path_factory) -> Path:
    ca, _ = make_ca(tmp_path_factory.mktemp("tls"), "served")
    return ca


@pytest.fixture(scope="module")
def restricted(repo, tls_ca, tmp_path_factory):
    tls = GrpcTls(tls_ca.parent / "server.pem", tls_ca.parent / "server.key")
    with TritonServer(repo, None, admin_key=KEY, inference_key=INFERENCE_KEY, grpc_tls=tls,
                      log_file=tmp_path_factory.mktemp("logs") / "restricted.log") as s:
        yield s


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_control_apis_need_the_key(restricted, repo, tls_ca, protocol):
    url = restricted.http_url if protocol == "http" else restricted.grpc_url
    tls = Tls(tls_ca) if protocol == "grpc" else None
    refused = "403" if protocol == "http" else "StatusCode.UNAVAILABLE"
    for key in (None, "wrong-key", INFERENCE_KEY):  # the inference key does not open the control APIs
        with admin.AdminClient(url, protocol, key, timeout_s=30, tls=tls) as c:
            with pytest.raises(Exception) as e:
                c.index()
            assert str(e.value.status()) == refused
            assert "restricted" in e.value.message()
    with admin.AdminClient(url, protocol, KEY, timeout_s=30, tls=tls) as c:
        assert {m["name"] for m in c.index()} == set(read_configs(repo))


def test_other_restricted_apis_and_the_open_ones_over_http(restricted):
    c = httpclient.InferenceServerClient(restricted.http_url, network_timeout=30)
    for key, calls in ((ADMIN, (lambda h: c.get_model_config(P.ENSEMBLE, headers=h),
                                lambda h: c.get_log_settings(headers=h), lambda h: c.get_trace_settings(headers=h),
                                lambda h: c.get_system_shared_memory_status(headers=h))),
                       (INFERENCE, (lambda h: c.get_model_metadata(P.ENSEMBLE, headers=h),
                                    lambda h: c.get_inference_statistics(P.ENSEMBLE, headers=h)))):
        value, other = (KEY, INFERENCE_KEY) if key is ADMIN else (INFERENCE_KEY, KEY)
        other_key = INFERENCE if key is ADMIN else ADMIN
        for call in calls:
            for refused in (None, other_key.headers("http", other)):  # no key, or the other API group's key
                with pytest.raises(Exception, match=f"restricted, expecting header '{key.header}'"):
                    call(refused)
            call(key.headers("http", value))  # accepted with its own key
    # health stays open, for load balancers' and Kubernetes' probes
    assert c.is_server_live()
    assert c.is_server_ready()
    assert c.is_model_ready(P.ENSEMBLE)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_inference_needs_the_inference_key(restricted, tls_ca, val_files, protocol, monkeypatch):
    url = restricted.http_url if protocol == "http" else restricted.grpc_url
    tls = Tls(tls_ca) if protocol == "grpc" else None
    for key in (None, "wrong-key", KEY):  # the admin key does not open inference either
        with ImageClassifierClient(url, protocol, timeout_s=30, key=key, tls=tls, retries=0) as c:
            c.check_ready()  # health is open
            preds = c.classify_files(val_files[:2])
            assert all(not p.ok and not p.bad_input and INFERENCE.env in p.error for p in preds), preds
    # by default the client takes the key from the environment
    monkeypatch.setenv(INFERENCE.env, INFERENCE_KEY)
    with ImageClassifierClient(url, protocol, timeout_s=30, tls=tls) as c:
        preds = c.classify_files(val_files[:4])
    assert all(p.ok for p in preds)
    assert [p.source for p in preds] == [str(f) for f in val_files[:4]]


def test_grpc_speaks_tls_only_and_checks_the_certificate(restricted, tls_ca, tmp_path):
    other_ca, _ = make_ca(tmp_path / "other", "other")
    # plain text, and a certificate from a CA the client does not trust, do not connect
    for tls in (None, Tls(other_ca)):
        with (ImageClassifierClient(restricted.grpc_url, "grpc", timeout_s=10, key=INFERENCE_KEY, tls=tls) as c,
              pytest.raises(ServerUnreachable)):
            c.check_ready()
    with ImageClassifierClient(restricted.grpc_url, "grpc", timeout_s=30, key=INFERENCE_KEY, tls=Tls(tls_ca)) as c:
        c.check_ready()
    with pytest.raises(ValueError, match="gRPC only"):
        ImageClassifierClient(restricted.http_url, "http", tls=Tls(tls_ca))


def test_client_cli_sends_the_inference_key_over_tls(restricted, tls_ca, val_files, tmp_path):
    keyfile = tmp_path / "inference.key"
    keyfile.write_text(INFERENCE_KEY + "\n")
    keyfile.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in (INFERENCE.env, INFERENCE.file_env)}

    def run(e, *extra):
        return subprocess.run([sys.executable, "-m", "clients", *map(str, val_files[:3]), "--protocol", "grpc",
                               "--url", restricted.grpc_url, "--json", *extra],
                              capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120, env=e)

    ok = run({**env, INFERENCE.file_env: str(keyfile)}, "--tls-root-cert", tls_ca)
    assert ok.returncode == 0, ok.stderr
    assert len(ok.stdout.splitlines()) == 3, ok.stderr
    no_key = run({**env, INFERENCE.file_env: str(tmp_path / "none.key")}, "--tls-root-cert", tls_ca)
    assert no_key.returncode == 1, no_key.stdout + no_key.stderr
    assert INFERENCE.env in no_key.stdout, no_key.stdout + no_key.stderr
    plain = run({**env, INFERENCE.file_env: str(keyfile)})
    assert plain.returncode == 1
    assert "cannot reach" in plain.stderr


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


@pytest.mark.parametrize("key", [ADMIN, INFERENCE], ids=lambda k: k.name)
def test_key_file_is_generated_private_and_reused(tmp_path, monkeypatch, key):
    monkeypatch.delenv(key.env, raising=False)
    path = tmp_path / "sub" / f"{key.name}.key"
    assert key.load(path=path) is None  # not created unless asked
    value = key.load(create=True, path=path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(value) >= 32
    assert key.load(create=True, path=path) == value  # the same key every time
    path.chmod(0o644)
    with pytest.raises(UnusableKeyError, match="readable by others"):
        key.load(path=path)
    monkeypatch.setenv(key.env, "from-env")
    assert key.load(path=path) == "from-env"
    monkeypatch.setenv(key.env, "a:b")  # would break the flag's <apis>:<header>=<value> syntax
    with pytest.raises(UnusableKeyError, match="usable key"):
        key.load(path=path)


@pytest.mark.parametrize("host, mode, required", [("127.0.0.1", "auto", False), ("localhost", "auto", False),
                                                  ("::1", "auto", False), ("0.0.0.0", "auto", True),
                                                  ("10.1.2.3", "auto", True), ("triton.example", "auto", True),
                                                  ("0.0.0.0", "off", False), ("127.0.0.1", "on", True)])
def test_serve_requires_the_inference_key_beyond_loopback(tmp_path, monkeypatch, host, mode, required):
    for k in (ADMIN, INFERENCE):
        monkeypatch.delenv(k.env, raising=False)
        monkeypatch.setenv(k.file_env, str(tmp_path / f"{k.name}.key"))
    args = server_args_parser().parse_args(["--host", host, "--inference-key", mode])
    kw = access(args)
    assert kw["admin_key"]
    assert kw["grpc_tls"] is None
    assert (kw["inference_key"] is not None) == required
    assert (tmp_path / "inference.key").exists() == required  # generated on first use, only when needed
    if required:
        flags = TritonServer(PROJECT_ROOT, **kw).command()
        assert INFERENCE.server_args(kw["inference_key"])[0] in flags
    line = describe_access(kw, host)
    assert ("WARNING" in line) == (not required and not is_loopback(host)), line


def test_serve_refuses_half_a_tls_setup(tls_ca):
    p = server_args_parser()
    for argv in (["--grpc-tls-cert", str(tls_ca)], ["--grpc-tls-client-ca", str(tls_ca)]):
        with pytest.raises(ValueError, match="--grpc-tls"):
            access(p.parse_args(["--no-admin-key", *argv]))
    with pytest.raises(ServerError, match="does not exist"):
        GrpcTls(tls_ca.parent / "missing.pem", tls_ca.parent / "server.key").server_args()
    mutual = GrpcTls(tls_ca.parent / "server.pem", tls_ca.parent / "server.key", tls_ca).server_args()
    assert "--grpc-use-ssl-mutual=true" in mutual
    assert f"--grpc-root-cert={tls_ca.resolve()}" in mutual


def test_keys_cli_prints_the_server_flags_or_refuses(monkeypatch):
    env = {k: v for k, v in os.environ.items() if k not in (ADMIN.env, INFERENCE.env)}

    def run(e, *extra):
        return subprocess.run([sys.executable, "-m", "clients.keys", "flags", *extra], capture_output=True,
                              text=True, cwd=PROJECT_ROOT, timeout=60, env=e)

    ok = run({**env, ADMIN.env: KEY, INFERENCE.env: INFERENCE_KEY})
    assert ok.returncode == 0
    assert ok.stdout.split() == [*ADMIN.server_args(KEY), *INFERENCE.server_args(INFERENCE_KEY)]
    missing = run({**env, ADMIN.env: KEY})
    assert missing.returncode == 2
    assert INFERENCE.env in missing.stderr
    assert not missing.stdout
    assert run({**env, ADMIN.env: KEY}, "--require", "admin").stdout.split() == ADMIN.server_args(KEY)


def test_admin_cli_sends_the_key(restricted, tmp_path):
    keyfile = tmp_path / "admin.key"
    keyfile.write_text(KEY + "\n")
    keyfile.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != ADMIN.env}

    def run(e):
        return subprocess.run([sys.executable, "-m", "clients.admin", "index", "--url", restricted.http_url],
                              capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60, env=e)

    ok = run({**env, ADMIN.file_env: str(keyfile)})
    assert ok.returncode == 0, ok.stderr
    assert f'"name": "{P.ENSEMBLE}"' in ok.stdout, ok.stderr
    refused = run({**env, ADMIN.file_env: str(tmp_path / "none.key")})
    assert refused.returncode == 1
    assert "restricted" in refused.stderr


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

    client = aio.InferenceServerClient(url, conn_timeout=60, conn_limit=in_flight)
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
    assert out["ok"]
    assert set(out["ok"]) == {before[0].labels[0]}
    with ImageClassifierClient(small_queue.grpc_url, "grpc", timeout_s=30, retries=0) as c:
        after = c.classify_files(val_files[:8])
    assert [p.labels for p in after] == [p.labels for p in before]


def test_a_burst_beyond_the_old_queue_is_queued_not_refused(server, val_files):
    """The default queue is held by time (QUEUE_TIMEOUT_MS), not by a small count: 400 requests sent at once,
    more than the models execute and the old 64-request queue held together, are all answered. (Refused at
    once, such clients resend at once, and the refusals take the cores the work needs: perf/ab/flood.py.)"""
    settings = read_manifest(server.repo)["settings"]
    in_execution = settings["classifier_instances"] * settings["max_batch_size"]
    burst = 400
    assert burst > in_execution + 64
    assert settings["max_queue_size"] >= burst
    out = asyncio.run(flood(server.http_url, [val_files[0].read_bytes()], requests=burst, in_flight=burst))
    assert out["rejected"] == []
    assert out["other"] == []
    assert len(out["ok"]) == burst


def test_client_backs_off_and_retries_after_503(small_queue, val_files):
    """Each round: 32 clients keep the queues (2 deep) full for FLOOD_S; our client sends a request half a
    second in, so it is refused (the queue is full whenever it arrives, but for a slot that just freed),
    backs off and gets its answer once the flood is over. Over three rounds it must have retried."""
    from perf.checks.reliability import counts, worker

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
    assert counts(flood_calls)["overloaded"] > 0
    assert counts(flood_calls)["error"] == 0
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
# graceful shutdown and fuzzing (perf/checks/reliability.py: the same code `make reliability` runs bigger)
# ---------------------------------------------------------------------------------------------

def test_stop_under_load_drains_and_loses_no_accepted_request(repo, val_files, tmp_path):
    from perf.checks.reliability import shutdown_under_load
    from serve.server import EXIT_TIMEOUT_S

    r = shutdown_under_load(repo, [f.read_bytes() for f in val_files[:16]], workers=6, load_s=1.5,
                            log_file=tmp_path / "server.log")
    assert r["ok"] > 0
    assert r["answered_of_those"] == r["sent_before_stop"]
    assert r["lost"] == 0, r["examples"]  # nothing cut mid-flight, no errors
    assert r["refused"] >= 1  # requests after the stop began were refused, each client once
    assert r["exit_s"] <= EXIT_TIMEOUT_S
    assert r["returncode"] == 0


def test_fuzzed_requests_are_answered_and_the_server_survives(server, val_files):
    from perf.checks.reliability import fuzz

    r = fuzz(server, [f.read_bytes() for f in val_files[:16]], n=300, seed=1, check_every=50)
    assert r["failures"] == [], r["failures"][:5]
    assert r["stubs_same"]
    assert r["server_alive"]
    statuses = {s for kinds in r["by_kind"].values() for s in kinds}
    assert "400" in statuses
    assert "0" not in statuses
    assert set(r["by_kind"]) == {"random_bytes", "mutated_image", "truncated_image", "huge_dimensions", "wrong_dtype",
                                 "wrong_shape", "wrong_input", "malformed_header", "oversized"}


# ---------------------------------------------------------------------------------------------
# live model updates: publish and roll back under load, refuse broken versions
# ---------------------------------------------------------------------------------------------

def version_states(url: str, model: str) -> dict[str, str]:
    with admin.AdminClient(url, "http", KEY, timeout_s=30) as c:
        return {m["version"]: m["state"] for m in c.index() if m["name"] == model}


@pytest.mark.parametrize("layout", ["fused", "postprocess"])
def test_publish_and_rollback_under_load_fail_no_request(repo, ensemble_repo, onnx_model, tiny_data, val_files,
                                                         tmp_path, layout):
    """The new version goes to the model that runs the ONNX: the fused model itself, or the ensemble's classifier."""
    import shutil

    from perf.checks.reliability import background_load, counts, examples
    from serve.publish import PublishError, onnx_model_dir, publish, rollback, versions

    live = tmp_path / "repo"
    shutil.copytree(repo if layout == "fused" else ensemble_repo, live)
    model_dir = onnx_model_dir(live)
    assert model_dir.name == (P.ENSEMBLE if layout == "fused" else P.CLASSIFIER)

    def classifier_states(url):
        return version_states(url, model_dir.name)

    num_classes = len(read_metadata(onnx_model).classes)
    with TritonServer(live, None, model_control="explicit", admin_key=KEY, log_file=tmp_path / "server.log") as s:
        batches = [[f.read_bytes() for f in val_files[i:i + 4]] for i in range(0, 16, 4)]
        with background_load(s, batches, workers=4) as calls:
            r = publish(onnx_model, live, tiny_data, s.http_url, key=KEY)
            assert r["version"] == 2
            assert r["top1_new"] == r["top1_served"]
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
            assert versions(model_dir) == [1, 2]
            assert classifier_states(s.http_url).get("2") == "READY"
            r = rollback(live, s.http_url, key=KEY)
            assert r["version"] == 1
            assert classifier_states(s.http_url).get("1") == "READY"
            assert versions(model_dir) == [1]
    c = counts(calls)
    assert c["ok"] > 0, (c, examples(calls, ("refused", "cut", "error", "overloaded")))
    assert c["ok"] == len(calls), (c, examples(calls, ("refused", "cut", "error", "overloaded")))



# ---------------------------------------------------------------------------------------------
# faults: a killed Python stub is brought back (serve/watchdog.py)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["fused", "postprocess"])
def test_killed_python_stub_is_detected_and_its_model_reloaded(repo, ensemble_repo, val_files, tmp_path, layout):
    """Triton 2.51 alone answers 500 "Stub process ... is not healthy" for good once a stub died (watch_stubs=False:
    the same test then fails with reloaded_s None); the watchdog reloads the model."""
    from perf.checks.reliability import stub_faults

    repo = repo if layout == "fused" else ensemble_repo
    with TritonServer(repo, None, model_control="explicit", admin_key=KEY, log_file=tmp_path / "server.log") as s:
        r = stub_faults(s, [f.read_bytes() for f in val_files[:16]], workers=2, settle_s=0.5, answers_after=10)
        assert {x["model"] for x in r} == set(layouts.get(read_manifest(repo)["layout"]).python_models())
        for x in r:
            assert x["how"] == "killed by signal 9", x
            assert x["error"] == "", x
            assert x["reloaded_s"] is not None, x
            assert x["reloaded_s"] < 30, x
            assert x["failed_after"] == 0, json.dumps(r)
            assert x["answered_after"] > 0, json.dumps(r)
        with ImageClassifierClient(s.http_url, timeout_s=30, retries=0) as c:
            assert all(p.ok for p in c.classify_files(val_files[:4]))
        assert any("reloading the model" in line for line in s.log)
