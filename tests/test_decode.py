"""One decode path: training (Pillow), `make eval` (DALI) and the served ensemble (DALI in Triton) see the
same pixels for every real-photo variant, classify each variant alike and like its original, and
refuse oversized inputs with an error naming the limit."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from build.settings import RepoSettings
from clients.client import ImageClassifierClient
from core.preprocess import MAX_IMAGE_PIXELS, ImageRejected, decode_image
from training.checkpoint import load_checkpoint
from training.evaluate import predict_files
from training.photo_variants import reference, variants


@pytest.fixture(scope="module")
def dali_decode():
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1, exec_async=False,
                  exec_pipelined=False)
    def decode():
        return fn.decoders.image(fn.external_source(name="E", dtype=types.UINT8), device="cpu", output_type=types.RGB)

    pipe = decode()
    pipe.build()

    def run(data: bytes) -> np.ndarray:
        pipe.feed_input("E", [np.frombuffer(data, np.uint8)])
        (out,) = pipe.run()
        return out.as_array()[0]

    return run


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_training_decode_is_the_serving_decoder_on_every_variant(val_files, dali_decode):
    """Pixel for pixel, Pillow under the decode policy gives what DALI gives, and shows the upright picture."""
    for path in val_files[:3]:
        upright = decode_image(path.read_bytes())
        for name, data in variants(upright, large=False).items():
            ours, dali = np.asarray(decode_image(data)), dali_decode(data)
            assert ours.shape == dali.shape, f"{path.name} {name}: {ours.shape} vs DALI {dali.shape}"
            assert np.abs(ours.astype(int) - dali.astype(int)).max() <= 1, f"{path.name} {name}: differs from DALI"
            # upright and in the right colours: within JPEG re-encoding noise of the picture itself
            assert mean_abs(ours, np.asarray(reference(name, upright))) < 4, f"{path.name} {name}: not the picture"


def test_16bit_gray_png_is_scaled_not_clipped(dali_decode):
    ramp = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    ours = np.asarray(decode_image(buf.getvalue()))
    assert np.abs(ours.astype(int) - dali_decode(buf.getvalue()).astype(int)).max() <= 1
    assert ours[..., 0].max() == round(ramp.max() / 257)  # Pillow's own convert("RGB") gives 255 here


@pytest.fixture(scope="module")
def confident_val(checkpoint, val_files):
    """Val images the session model classifies with a clear margin (JPEG re-encoding cannot flip them)."""
    logits = predict_files(load_checkpoint(checkpoint), val_files)
    top2 = np.sort(logits, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    return [val_files[i] for i in np.argsort(-margin)[:2]]


def test_variants_classified_alike_by_eval_and_server(checkpoint, server, confident_val, tmp_path):
    ckpt = load_checkpoint(checkpoint)
    classes = ckpt["classes"]
    with ImageClassifierClient(server.http_url, "http") as client:
        for path in confident_val:
            upright = decode_image(path.read_bytes())
            files = []
            for name, data in variants(upright, large=path == confident_val[0]).items():
                files.append(tmp_path / f"{path.stem}_{name}")
                files[-1].write_bytes(data)
            original = classes[int(predict_files(ckpt, [path]).argmax())]
            evaluated = [classes[i] for i in predict_files(ckpt, files).argmax(1)]
            served = [p.labels[0] if p.ok else p.error for p in client.classify_files(files, batch_size=1)]
            for f, e, s in zip(files, evaluated, served, strict=True):
                assert e == s, f"{f.name}: make eval says {e}, the server says {s}"
                if not f.name.endswith("grayscale_jpeg"):  # colour is a cue of the synthetic classes
                    assert e == original, f"{f.name}: {e}, but its original is {original}"


def test_over_the_limits_is_refused_naming_the_limit(server, tmp_path):
    huge = io.BytesIO()
    Image.new("RGB", (10_000, 6_000), (90, 120, 200)).save(huge, "JPEG", quality=50)  # 60 MP, a few hundred kB
    with pytest.raises(ImageRejected, match=f"over the limit of {MAX_IMAGE_PIXELS} pixels"):
        decode_image(huge.getvalue())
    max_bytes = RepoSettings().max_image_bytes
    small = io.BytesIO()
    Image.new("RGB", (32, 32)).save(small, "JPEG")
    bloated = small.getvalue() + b"\x01" * max_bytes  # trailing bytes are accepted, but not this many
    with pytest.raises(ImageRejected, match=f"over the limit of {max_bytes} bytes"):
        decode_image(bloated)
    with ImageClassifierClient(server.http_url, "http", timeout_s=120) as client:
        good = client.classify([small.getvalue()], ["good"])[0]
        preds = client.classify([huge.getvalue(), bloated, small.getvalue()], ["huge", "bloated", "good"], batch_size=3)
    assert f"over the limit of {MAX_IMAGE_PIXELS} pixels" in preds[0].error
    assert f"over the limit of {max_bytes} bytes" in preds[1].error
    assert preds[2].ok
    assert preds[2].labels == good.labels


def stub_pid(server_pid: int, model: str) -> int:
    """The Python-backend stub process serving ``model`` (a child of tritonserver)."""
    import psutil

    for child in psutil.Process(server_pid).children(recursive=True):
        if "triton_python_backend_stub" in child.name() and any(f"/{model}/" in a for a in child.cmdline()):
            return child.pid
    raise LookupError(f"no stub process for {model}")


@pytest.mark.parametrize("layout", ["fused", "postprocess"])
def test_internal_failure_is_internal_not_the_images_fault(onnx_model, val_files, tmp_path, layout):
    """Out of memory inside the model that decodes (a real one: its address space is capped with prlimit
    while it decodes a 30-megapixel photo) is INTERNAL (HTTP 500), logged, not blamed on the image,
    and the model answers normally once memory is back. One instance, so the capped stub is the one asked."""
    import resource

    from build.render_repo import render
    from serve.server import TritonServer

    repo = tmp_path / "repo"
    render(onnx_model, repo, RepoSettings(max_batch_size=8, preprocess_instances=1, classifier_instances=1),
           layout=layout)
    photo = io.BytesIO()
    Image.open(val_files[0]).convert("RGB").resize((6400, 4800)).save(photo, "JPEG", quality=80)
    log = tmp_path / "tritonserver.log"
    with TritonServer(repo, None, log_file=log) as server, \
            ImageClassifierClient(server.http_url, "http", timeout_s=120) as client:
        good = client.classify([Path(val_files[0]).read_bytes()], ["good"])[0]
        pid = stub_pid(server.proc.pid, "classify" if layout == "fused" else "preprocess")
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        vm = int(next(ln.split()[1] for ln in status if ln.startswith("VmSize:"))) * 1024
        previous = resource.prlimit(pid, resource.RLIMIT_AS)
        resource.prlimit(pid, resource.RLIMIT_AS, (vm + (32 << 20), previous[1]))  # 32 MB more: a 92 MB decode fails
        try:
            preds = client.classify([photo.getvalue(), Path(val_files[0]).read_bytes()], ["big", "good"], batch_size=2)
        finally:
            resource.prlimit(pid, resource.RLIMIT_AS, previous)
        after = client.classify([photo.getvalue()], ["big"])[0]
    assert all("preprocess failed internally" in p.error for p in preds), [p.error for p in preds]
    assert not any("image 0 of" in p.error or "could not decode" in p.error for p in preds)
    assert "preprocess failed internally" in log.read_text()
    assert good.ok
    assert after.ok
