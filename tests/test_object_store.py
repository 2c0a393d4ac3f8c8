"""A model repository in an object store: the rendered repository uploaded to a local S3 server (moto, run
by the project) and served from there by the real tritonserver through `python -m serve --repo s3://...`,
the command `make serve REPO=s3://...` runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from clients.client import ImageClassifierClient
from core import protocol as P
from serve.object_store import LocalS3, S3Url, client, parse, upload
from serve.server import PROJECT_ROOT, free_ports
from serve.watchdog import children, stub_model


def test_s3_urls_parse_as_triton_reads_them():
    assert parse("s3://127.0.0.1:9000/models/a/b") == S3Url("127.0.0.1:9000", "models", "a/b")
    assert parse("s3://bucket/prefix/") == S3Url(None, "bucket", "prefix")
    assert str(parse("s3://127.0.0.1:9000/models/a/b")) == "s3://127.0.0.1:9000/models/a/b"
    with pytest.raises(ValueError, match="names no bucket"):
        parse("s3://127.0.0.1:9000/")


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"serve exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("not ready")


def test_serve_a_repository_from_s3(ensemble_repo, server, val_files, tmp_path):
    """The ensemble layout (its version folder exists in a store only through a placeholder), answering as the
    session server's default layout does."""
    repo = ensemble_repo
    with LocalS3(log_file=tmp_path / "moto.log") as s3:
        url = s3.url("models", "tiny/classify")
        keys = upload(repo, url)
        # the ensemble's version folder exists in the store only through its placeholder
        assert "tiny/classify/classify/1/.placeholder" in keys
        assert "tiny/classify/classifier/1/model.onnx" in keys
        # uploading again replaces what the prefix held: a key the repository no longer has goes
        client(url).put_object(Bucket="models", Key="tiny/classify/stale/config.pbtxt", Body=b"")
        assert upload(repo, url) == keys
        listed = {o["Key"] for o in client(url).list_objects_v2(Bucket="models", Prefix="tiny/")["Contents"]}
        assert listed == set(keys)

        http, grpc, metrics = free_ports(3)
        env = {**os.environ, "TRITON_ADMIN_KEY": "s3-test-key"}
        env.pop("AWS_ACCESS_KEY_ID", None)  # the local store's placeholder credentials are used
        with open(tmp_path / "serve.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "serve", "--repo", url, "--http-port", str(http),
                                     "--grpc-port", str(grpc), "--metrics-port", str(metrics)], cwd=PROJECT_ROOT,
                                    env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_ready(f"127.0.0.1:{http}", proc)
                with ImageClassifierClient(f"127.0.0.1:{http}", timeout_s=30) as c:
                    remote = c.classify_files(val_files[:8])
                    # the models live in a temporary download folder: the stub watchdog still finds a killed
                    # stub's model (by its instance name) and reloads it from the store
                    (triton,) = children(proc.pid)
                    stub = next(p for p in children(triton) if stub_model(p) == P.PREPROCESS)
                    os.kill(stub, signal.SIGKILL)
                    # the other instance keeps answering meanwhile: wait for the reload itself
                    deadline = time.monotonic() + 60

                    def reloaded():
                        return "model 'preprocess' reloaded" in (tmp_path / "serve.log").read_text()

                    while not reloaded() and time.monotonic() < deadline:
                        c.classify_files(val_files[:1])
                        time.sleep(0.2)
                    again = c.classify_files(val_files[:1])
                    assert again[0].labels == remote[0].labels
            finally:
                proc.send_signal(signal.SIGINT)
                returncode = proc.wait(60)
        text = (tmp_path / "serve.log").read_text()
        assert returncode == 0, text[-3000:]
        assert "model 'preprocess' reloaded" in text, text[-3000:]
    with ImageClassifierClient(server.http_url, timeout_s=30) as c:
        local = c.classify_files(val_files[:8])
    assert all(p.ok for p in remote), [p.error for p in remote]
    assert [p.labels for p in remote] == [p.labels for p in local]
    np.testing.assert_allclose([p.scores for p in remote], [p.scores for p in local], atol=1e-5)
