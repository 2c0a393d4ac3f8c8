"""docs/serving.md's plain-HTTP example (curl, KServe v2 binary tensor extension), run as the page has it
against the real server: the same answers as the Python client, and the inference key's header."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from clients.client import ImageClassifierClient
from clients.keys import INFERENCE
from serve.server import TritonServer

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "serving.md"
KEY = "curl-test-inference-key"

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")


def doc_snippet() -> str:
    """The bash block between the curl-example marker comments of docs/serving.md."""
    m = re.search(r"<!-- curl-example\b[^>]*-->\s*```bash\n(.*?)```\s*<!-- /curl-example -->", DOC.read_text(), re.S)
    assert m, f"{DOC} has no curl-example block"
    return m.group(1)


def run_snippet(image: Path, url: str, key: str | None, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """The snippet in bash with the variables the page sets before it; its process group is killed on any exit
    path, so no curl outlives the test."""
    env = {k: v for k, v in os.environ.items() if k not in ("IMG", "URL", "KEY", INFERENCE.env)}
    env.update(IMG=str(image), URL=url, **({"KEY": key} if key else {}))
    proc = subprocess.Popen(["bash", "-eo", "pipefail", "-c", doc_snippet()], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def outputs(answer: subprocess.CompletedProcess[str]) -> dict[str, list]:
    assert answer.returncode == 0, answer.stdout + answer.stderr
    return {o["name"]: o["data"] for o in json.loads(answer.stdout)["outputs"]}


def test_doc_curl_example_answers_as_the_python_client(server, val_files):
    images = val_files[::len(val_files) // 4][:4]  # a few classes
    with ImageClassifierClient(server.http_url, "http", timeout_s=30) as c:
        expected = c.classify_files(images)
    for image, p in zip(images, expected, strict=True):
        got = outputs(run_snippet(image, server.http_url, None))
        assert got["LABELS"] == p.labels, image
        assert got["SCORES"] == pytest.approx(p.scores, abs=1e-6), image


@pytest.fixture(scope="module")
def keyed_server(repo, tmp_path_factory):
    """The same repository served as `make serve HOST=0.0.0.0` would: inference needs the inference key."""
    with TritonServer(repo, None, inference_key=KEY,
                      log_file=tmp_path_factory.mktemp("logs") / "tritonserver-keyed.log") as s:
        yield s


@pytest.mark.server
def test_doc_curl_example_sends_the_inference_key(keyed_server, val_files):
    refused = run_snippet(val_files[0], keyed_server.http_url, None)
    assert refused.returncode == 22, refused  # curl --fail-with-body: an HTTP error status
    assert f"expecting header '{INFERENCE.header}'" in refused.stdout
    with ImageClassifierClient(keyed_server.http_url, "http", timeout_s=30, key=KEY) as c:
        [expected] = c.classify_files(val_files[:1])
    assert outputs(run_snippet(val_files[0], keyed_server.http_url, KEY))["LABELS"] == expected.labels
