"""End to end against the real tritonserver: fidelity with PyTorch, and bad input handled per request."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import MAX_BATCH
from PIL import Image
from tritonclient.utils import InferenceServerException

from clients.client import ImageClassifierClient, ServerUnreachable, image_input
from core import protocol as P
from serve.server import PROJECT_ROOT, free_ports
from training.checkpoint import load_checkpoint
from training.evaluate import predict_files


def softmax(x):
    z = np.exp(x - x.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def reference(checkpoint, val_files):
    """What the checkpoint predicts for each val JPEG with the training package's eval transform."""
    ckpt = load_checkpoint(checkpoint)
    return ckpt["classes"], predict_files(ckpt, val_files)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_fidelity_server_matches_pytorch(server, protocol, val_files, reference):
    classes, logits = reference
    url = server.http_url if protocol == "http" else server.grpc_url
    with ImageClassifierClient(url, protocol, with_probabilities=True) as c:
        preds = c.classify_files(val_files, batch_size=MAX_BATCH)
    assert all(p.ok for p in preds), [p.error for p in preds if not p.ok]
    served = [classes.index(p.labels[0]) for p in preds]
    agreement = np.mean(np.array(served) == logits.argmax(1))
    assert agreement >= 0.995, f"server agrees with PyTorch on only {agreement:.1%} of {len(val_files)} val images"
    np.testing.assert_allclose(np.array([p.probabilities for p in preds]), softmax(logits), atol=1e-4)
    # top-k is sorted and consistent with the probabilities
    for p in preds:
        assert p.scores == sorted(p.scores, reverse=True)
        assert p.scores[0] == pytest.approx(max(p.probabilities), abs=1e-6)


def test_async_concurrent_requests_match_sync(server, val_files):
    with ImageClassifierClient(server.grpc_url, "grpc") as c:
        blobs, names = [f.read_bytes() for f in val_files], [str(f) for f in val_files]
        sync = c.classify(blobs, names, batch_size=3)
        concurrent = c.classify_async(blobs, names, batch_size=1, concurrency=16)
    assert [p.source for p in concurrent] == names
    assert [p.labels for p in concurrent] == [p.labels for p in sync]


# ---------------------------------------------------------------------------------------------
# bad input: a clear per-request error, the server stays up, the next good request is right
# ---------------------------------------------------------------------------------------------

def jpeg_bytes(seed=0, size=(60, 40)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


def corrupt_jpeg() -> bytes:
    """Well-formed marker structure, undecodable content: the decoder itself must refuse it."""
    good = bytearray(jpeg_bytes())
    dht = good.index(b"\xff\xc4")
    good[dht + 5:dht + 21] = b"\xff" * 16  # a Huffman table's 16 code counts: more codes than any table holds
    return bytes(good)


def smashed_jpeg() -> bytes:
    good = bytearray(jpeg_bytes())
    rng = np.random.default_rng(1)
    good[300:900] = rng.integers(0, 255, 600, dtype=np.uint8).tobytes()  # scan data and tables smashed
    return bytes(good)


def jpeg_with_precision(bits: int) -> bytes:
    data = bytearray(jpeg_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 4] = bits  # marker (2), length (2), then the sample precision
    return bytes(data)


BAD_IMAGES = {
    "corrupt_jpeg": (corrupt_jpeg(), "could not decode the image data"),
    "smashed_jpeg": (smashed_jpeg(), "corrupt JPEG: expected a marker at byte"),
    "truncated_jpeg": (jpeg_bytes()[:700], "truncated JPEG"),
    # found by fuzzing (perf/checks/reliability.py, seed 0, case 1673): DALI failed with "Invalid sample_type: -1",
    # which is no decode error, so the server answered 500
    "jpeg_bad_precision": (jpeg_with_precision(155), "unsupported JPEG: 155-bit samples"),
    "empty": (b"", "empty input"),
    "all_zero": (bytes(64), "no image bytes (the row is all zero padding"),
    "not_an_image": (b"%PDF-1.4 this is a text document, not a picture\n", "not a JPEG or PNG image"),
}


def raw_infer(server, blobs, protocol: str = "http"):
    """One ensemble request with the bare tritonclient (no retry or error mapping of our client)."""
    module, url = (httpclient, server.http_url) if protocol == "http" else (grpcclient, server.grpc_url)
    c = module.InferenceServerClient(url)
    try:
        return c.infer(P.ENSEMBLE, [image_input(module, blobs)])
    finally:
        c.close()


def assert_good_request_answered(server, val_files, reference):
    classes, logits = reference
    files = val_files[:3]
    with ImageClassifierClient(server.http_url, "http") as c:
        preds = c.classify_files(files)
    assert [classes.index(p.labels[0]) for p in preds] == list(logits[:3].argmax(1))


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_image_http_400(server, case, val_files, reference):
    data, expected = BAD_IMAGES[case]
    with pytest.raises(InferenceServerException) as e:
        raw_infer(server, [data])
    assert e.value.status() == "400", e.value
    assert expected in e.value.message()
    assert "image 0 of 1" in e.value.message()
    assert_good_request_answered(server, val_files, reference)


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_image_grpc_invalid_argument(server, case, val_files, reference):
    data, expected = BAD_IMAGES[case]
    with pytest.raises(InferenceServerException) as e:
        raw_infer(server, [data], "grpc")
    assert e.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT), e.value
    assert expected in e.value.message()
    assert_good_request_answered(server, val_files, reference)


def test_one_bad_image_in_batch_is_named_and_others_answered(server, val_files, reference):
    classes, logits = reference
    blobs = [f.read_bytes() for f in val_files[:4]]
    blobs[2] = BAD_IMAGES["truncated_jpeg"][0]
    with pytest.raises(InferenceServerException) as e:
        raw_infer(server, blobs)
    assert "image 2 of 4: truncated JPEG" in e.value.message()
    assert "image 0" not in e.value.message()
    # the client library retries image by image: good images get their answer, the bad one its error
    with ImageClassifierClient(server.grpc_url, "grpc") as c:
        preds = c.classify(blobs, ["a", "b", "bad", "d"], batch_size=4)
    assert [p.ok for p in preds] == [True, True, False, True]
    assert "truncated JPEG" in preds[2].error
    assert [classes.index(p.labels[0]) for i, p in enumerate(preds) if i != 2] == list(logits[[0, 1, 3]].argmax(1))


def test_bad_request_does_not_poison_concurrent_good_requests(server, val_files, reference):
    """Bad and good requests interleaved in flight (so the dynamic batcher mixes them)."""
    classes, logits = reference
    good = [f.read_bytes() for f in val_files[:8]]
    blobs = [b for pair in zip(good, [BAD_IMAGES["corrupt_jpeg"][0]] * 8, strict=True) for b in pair]
    with ImageClassifierClient(server.grpc_url, "grpc") as c:
        preds = c.classify_async(blobs, [str(i) for i in range(16)], batch_size=1, concurrency=16)
    assert [p.ok for p in preds] == [True, False] * 8
    assert [classes.index(p.labels[0]) for p in preds[::2]] == list(logits[:8].argmax(1))
    assert all("could not decode the image data" in p.error for p in preds[1::2])


def test_missing_input_http_400(server, val_files, reference):
    req = urllib.request.Request(f"http://{server.http_url}/v2/models/{P.ENSEMBLE}/infer",
                                 data=json.dumps({"inputs": []}).encode(), headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400
    body = json.loads(e.value.read())
    assert P.IMAGE in body["error"]
    assert "input" in body["error"].lower()
    assert_good_request_answered(server, val_files, reference)


def test_missing_input_grpc_invalid_argument(server, val_files, reference):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException) as e:
        c.infer(P.ENSEMBLE, [])
    c.close()
    assert e.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT)
    assert P.IMAGE in e.value.message()
    assert_good_request_answered(server, val_files, reference)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_batch_larger_than_max_batch_size(server, protocol, val_files, reference):
    blobs = [val_files[0].read_bytes()] * (MAX_BATCH + 1)
    with pytest.raises(InferenceServerException) as e:
        raw_infer(server, blobs, protocol)
    assert e.value.status() in ("400", str(grpc.StatusCode.INVALID_ARGUMENT))
    assert f"batch-size must be <= {MAX_BATCH}" in e.value.message()
    assert_good_request_answered(server, val_files, reference)


def test_png_is_accepted(server, val_files, reference):
    classes, logits = reference
    buf = io.BytesIO()
    Image.open(val_files[0]).save(buf, "PNG")
    with ImageClassifierClient(server.http_url) as c:
        (p,) = c.infer([buf.getvalue()])
    assert p.labels[0] == classes[int(logits[0].argmax())]  # the class the checkpoint gives the JPEG


# ---------------------------------------------------------------------------------------------
# the client: library and command line
# ---------------------------------------------------------------------------------------------

def test_client_unreachable_server_says_so():
    (port,) = free_ports(1)
    for protocol in ("http", "grpc"):
        with (ImageClassifierClient(f"localhost:{port}", protocol, timeout_s=2) as c,
              pytest.raises(ServerUnreachable, match=f"cannot reach Triton at localhost:{port}")):
            c.check_ready()


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "clients", *args], capture_output=True, text=True,
                          cwd=PROJECT_ROOT, timeout=120)


def test_cli_json_over_grpc_async(server, tiny_data, val_files, reference):
    classes, logits = reference
    r = run_cli(str(tiny_data / "val"), "--protocol", "grpc", "--url", server.grpc_url, "--json", "--async",
                "--batch-size", "4", "--top-k", "2")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["source"] for row in rows] == [str(f) for f in val_files]
    assert all(len(row["labels"]) == 2 and row["error"] is None for row in rows)
    assert [classes.index(row["labels"][0]) for row in rows] == list(logits.argmax(1))


def test_cli_table_glob_and_bad_file(server, tiny_data, tmp_path, val_files):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(BAD_IMAGES["truncated_jpeg"][0])
    r = run_cli(str(tiny_data / "val" / "00_*" / "*.jpg"), str(bad), "--url", server.http_url)
    assert r.returncode == 3  # some images failed
    assert "broken.jpg" in r.stdout
    assert "image 0 of 1: truncated JPEG" in r.stdout
    assert r.stdout.count("00_circle_") >= 2
    assert "1 of" in r.stderr
    assert "images failed" in r.stderr


def test_cli_unreachable_and_missing_files(tiny_data):
    (port,) = free_ports(1)
    r = run_cli(str(tiny_data / "val"), "--url", f"localhost:{port}")
    assert r.returncode == 1
    assert "cannot reach Triton" in r.stderr
    assert "make serve" in r.stderr
    r = run_cli("/no/such/dir")
    assert r.returncode == 2
    assert "no such file or directory: /no/such/dir" in r.stderr
