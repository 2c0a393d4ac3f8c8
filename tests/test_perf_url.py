"""Load-testing a running server by its URL (`make perf / loadtest / report URL=...`): a deployment started here
on its own, as `make serve` starts one beyond loopback (the inference key, the admin key, gRPC over TLS), measured
over HTTP and over gRPC with TLS, the key sent as the client sends it. The measuring run starts and stops nothing,
reports what the server says it is, and fails with the reason and the fix when the key, TLS or the URL is wrong."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import tritonclient.http as httpclient
from test_reliability import make_ca  # the CA and the server certificate it signs, as the TLS tests make them

from clients.client import Tls
from clients.keys import ADMIN, INFERENCE
from core import protocol as P
from perf import report
from perf.load.deployment import Deployment, DeploymentError
from serve.server import PROJECT_ROOT, GrpcTls, TritonServer

KEY = "perf-url-inference-key-0123456789"
ADMIN_KEY = "perf-url-admin-key-9876543210"
# seconds, not minutes: one concurrency, one rate point of a fixed request count, locust for 2 s
PROFILE = replace(report.QUICK, parts=("perf", "loadtest"), concurrency=(2,), request_count=40, locust_users=2,
                  locust_seconds=2)
# what a measuring run may start: the load generators, and uname (platform.platform() asks it for the machine's name)
MAY_START = ("perf_analyzer", "locust", "uname")


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory) -> Path:
    _, folder = make_ca(tmp_path_factory.mktemp("tls"), "deployment")
    return folder


@pytest.fixture(scope="module")
def deployed(repo, tls_dir, tmp_path_factory):
    """The deployment: started apart from what measures it, with both keys and gRPC over TLS."""
    with TritonServer(repo, None, admin_key=ADMIN_KEY, inference_key=KEY,
                      grpc_tls=GrpcTls(tls_dir / "server.pem", tls_dir / "server.key"),
                      log_file=tmp_path_factory.mktemp("logs") / "deployed.log") as s:
        yield s


def served(server: TritonServer) -> tuple[str, int]:
    """The server's version and the requests its model has answered, asked over HTTP with the key."""
    c = httpclient.InferenceServerClient(server.http_url, network_timeout=30)
    headers = INFERENCE.headers("http", KEY)
    stats = c.get_inference_statistics(P.ENSEMBLE, headers=dict(headers))["model_stats"][0]
    return c.get_server_metadata(headers=dict(headers))["version"], stats["inference_stats"]["success"]["count"]


def record_children(monkeypatch) -> list[list[str]]:
    """Every command this process starts from now on (subprocess.run and TritonServer both go through Popen)."""
    started: list[list[str]] = []
    popen = subprocess.Popen

    class Recorded(popen):  # type: ignore[misc,valid-type]
        def __init__(self, args, *a, **kw):
            started.append([str(x) for x in args])
            super().__init__(args, *a, **kw)

    monkeypatch.setattr(subprocess, "Popen", Recorded)
    return started


def descendants(pid: int) -> list[str]:
    """The command lines of the processes under ``pid`` now (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                children.setdefault(int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        try:
            out.append(Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
        todo += children.get(p, [])
    return out


def run_watched(cmd: list[str], env: dict[str, str], timeout: float = 240) -> tuple[int, str, str, set[str]]:
    """``cmd`` run to its end: its exit status, stdout, stderr and every process seen under it (polled)."""
    proc = subprocess.Popen(cmd, env=env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.update(descendants(proc.pid))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        done.set()
        watcher.join()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err, seen


def make_env(**extra: str) -> dict[str, str]:
    """The environment of a machine that holds neither key unless given here."""
    keys = (INFERENCE.env, INFERENCE.file_env, ADMIN.env, ADMIN.file_env)
    return {**{k: v for k, v in os.environ.items() if k not in keys}, **extra}


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_report_measures_the_deployment_over_its_url_with_the_key(deployed, tls_dir, tiny_data, tmp_path, monkeypatch,
                                                                  capsys, protocol):
    monkeypatch.setenv(INFERENCE.env, KEY)
    monkeypatch.setenv(ADMIN.env, ADMIN_KEY)  # perf_analyzer reads the model's configuration, kept behind it
    url = deployed.http_url if protocol == "http" else deployed.grpc_url
    tls = Tls(tls_dir / "ca.pem") if protocol == "grpc" else None
    version, answered = served(deployed)
    started = record_children(monkeypatch)
    out = report.run(tmp_path / "no-repository", tiny_data / "val", tmp_path, PROFILE, browser=False,
                     deployment=Deployment.from_environment(url, protocol, tls))
    r = json.loads((out / "results.json").read_text())
    d = r["deployment"]
    # what was measured, as the server says it
    assert (d["url"], d["protocol"], d["tls"], d["inference_key"], d["key_from"]) == \
        (url, protocol, protocol == "grpc", True, f"${INFERENCE.env}")
    assert (d["server"], d["model"], d["version"], d["versions"]) == \
        ({"name": "triton", "version": version}, P.ENSEMBLE, "1", ["1"])
    assert d["config"]["name"] == P.ENSEMBLE
    assert d["admin_key"]
    # the load went to this server: its own count grew by what perf_analyzer's points and locust sent
    points = [p for pts in r["perf_analyzer"].values() for p in pts]
    assert [(p["protocol"], p["mode"]) for p in points] == [(protocol, "concurrency"), (protocol, "request_rate")]
    per_point = [p["server"][P.ENSEMBLE]["requests"] for p in points]  # read from its statistics, with the key
    assert all(n >= PROFILE.request_count for n in per_point), per_point
    (user, loc), = r["locust"].items()
    assert user == ("TritonHttpUser" if protocol == "http" else "TritonGrpcUser")
    assert loc["requests"] > 0
    assert loc["failures"] == 0, loc["failure_kinds"]
    assert served(deployed)[1] - answered >= sum(per_point) + loc["requests"]
    # nothing started but the load generators, and the parts that need a local server said why they were left out
    assert started
    assert all(any(Path(c).name in MAY_START for c in cmd) for cmd in started), started
    assert any(Path(c).name == "perf_analyzer" for cmd in started for c in cmd), started
    printed = capsys.readouterr().out
    assert "left out: baseline:" in printed
    assert set(r["left_out"]) == {"baseline"}
    md = (out / "report.md").read_text()
    assert f"- **Measured**: triton {version} at `{url}`" in md
    assert "## What was measured" in md
    assert f"| TLS | {'yes' if tls else 'no'}" in md
    # the keys are in no file of the report (perf_analyzer's logs show its command line)
    assert "-H" in (next((out / "perf_analyzer").glob("*.log")).read_text().splitlines()[0])
    for f in out.rglob("*"):
        assert not f.is_file() or (KEY.encode() not in f.read_bytes() and ADMIN_KEY.encode() not in f.read_bytes()), f


@pytest.mark.server
def test_make_loadtest_url_over_grpc_tls_with_the_key_file_starts_nothing(deployed, tls_dir, tiny_data, tmp_path):
    key_file = tmp_path / "inference.key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    version, answered = served(deployed)
    rc, out, err, seen = run_watched(
        ["make", "--no-print-directory", "loadtest", f"URL={deployed.grpc_url}", "PROTOCOL=grpc",
         f"TLS_ROOT_CERT={tls_dir / 'ca.pem'}", f"INFERENCE_KEY_FILE={key_file}",
         f"ADMIN_KEY_FILE={tmp_path / 'none.key'}", "USERS=2", "DURATION=2", f"IMAGES={tiny_data / 'val'}"],
        make_env())
    assert rc == 0, out[-3000:] + err[-3000:]
    report_dir = Path(re.search(r"wrote (\S+)/report\.html", out).group(1))
    try:
        r = json.loads((report_dir / "results.json").read_text())
        d = r["deployment"]
        assert (d["url"], d["protocol"], d["tls"], d["inference_key"], d["key_from"]) == \
            (deployed.grpc_url, "grpc", True, True, str(key_file))
        assert d["server"]["version"] == version
        assert d["config"] is None  # no admin key here: said so, and locust needs none
        assert "admin key" in d["config_note"]
        loc = r["locust"]["TritonGrpcUser"]
        assert loc["requests"] > 0
        assert loc["failures"] == 0, loc["failure_kinds"]
        assert served(deployed)[1] - answered >= loc["requests"]
        assert "left out: baseline:" in out
    finally:
        import shutil

        shutil.rmtree(report_dir, ignore_errors=True)
    # the watcher saw the load generator, and no server: neither Triton nor the baseline was started
    assert any("locust" in c for c in seen), seen
    assert not any("tritonserver" in c or "perf.reference.baseline" in c for c in seen), seen


@pytest.mark.server
def test_a_wrong_or_missing_key_fails_with_the_reason_and_the_fix(deployed, tmp_path):
    rc, out, err, seen = run_watched(
        ["make", "--no-print-directory", "perf", f"URL={deployed.http_url}", f"IMAGES={tmp_path}"],
        make_env(**{INFERENCE.env: "not-the-key"}), timeout=120)
    assert rc != 0
    assert "refused its server metadata (403" in err, err
    assert f"the inference key from ${INFERENCE.env} was refused" in err, err
    assert "not-the-key" not in out + err
    assert not any("perf_analyzer" in c for c in seen), seen  # refused before any load
    with pytest.raises(DeploymentError, match=rf"no inference key was sent.*Set \${INFERENCE.env}"):
        Deployment(deployed.http_url, "http").describe()


@pytest.mark.server
def test_tls_problems_and_an_unreachable_url_are_told_apart(deployed, tls_dir, tmp_path):
    other_ca, _ = make_ca(tmp_path / "other", "other")
    cases = [(Deployment(deployed.grpc_url, "grpc", KEY), "serves gRPC over TLS, give its CA: TLS_ROOT_CERT"),
             (Deployment(deployed.grpc_url, "grpc", KEY, Tls(other_ca)), "the TLS handshake failed"),
             (Deployment(deployed.http_url, "grpc", KEY, Tls(tls_dir / "ca.pem")), "the TLS handshake failed"),
             (Deployment("127.0.0.1:9", "http", KEY, timeout_s=5), "cannot reach Triton at 127.0.0.1:9 over HTTP")]
    for deployment, reason in cases:
        with pytest.raises(DeploymentError, match=re.escape(reason)):
            deployment.describe()
    # the right CA and the key: described
    _, measured = Deployment(deployed.grpc_url, "grpc", KEY, Tls(tls_dir / "ca.pem")).describe()
    assert measured["server"]["version"]
    with pytest.raises(DeploymentError, match="gRPC only"):
        Deployment(deployed.http_url, "http", KEY, Tls(tls_dir / "ca.pem"))


@pytest.mark.server
def test_perf_without_the_admin_key_says_why_before_any_load(deployed, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv(INFERENCE.env, KEY)
    monkeypatch.delenv(ADMIN.env, raising=False)
    monkeypatch.setenv(ADMIN.file_env, str(tmp_path / "none.key"))
    started = record_children(monkeypatch)
    with pytest.raises(DeploymentError, match=rf"perf_analyzer reads the configuration.*\${ADMIN.env}"):
        report.run(tmp_path, tiny_data / "val", tmp_path / "reports", replace(PROFILE, parts=("perf",)), browser=False,
                   deployment=Deployment.from_environment(deployed.http_url, "http"))
    assert started == []
    assert not (tmp_path / "reports").exists() or not any((tmp_path / "reports").iterdir())  # no empty report


def test_make_passes_the_url_the_protocol_and_tls_and_builds_nothing_local():
    def dry_run(*args: str) -> str:
        r = subprocess.run(["make", "-n", "--no-print-directory", *args], capture_output=True, text=True, timeout=60,
                           cwd=PROJECT_ROOT)
        assert r.returncode == 0, r.stderr
        return r.stdout

    for target in ("perf", "loadtest", "report"):
        out = dry_run(target, "URL=triton.example.com:8001", "PROTOCOL=grpc", "TLS_ROOT_CERT=ca.pem", "IMAGES=photos")
        assert "--url triton.example.com:8001 --protocol grpc --tls-root-cert ca.pem" in out, out
        assert "build.json" not in out, out  # no make demo artifacts for a server elsewhere
        assert "--url" not in dry_run(target, "IMAGES=photos")
