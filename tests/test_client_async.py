"""The client's awaitable API (aclassify, aclassify_files) on the real server, inside event loops that are
already running (Jupyter's, a web framework's), and classify_async's clear refusal there."""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
import warnings
from collections.abc import Iterator

import pytest

from clients.client import ImageClassifierClient, Prediction

PROTOCOLS = ["http", "grpc"]


def url_of(server, protocol: str) -> str:
    return server.http_url if protocol == "http" else server.grpc_url


def answers(preds: list[Prediction]) -> list[tuple[str, list[str]]]:
    assert all(p.ok for p in preds), [p.error for p in preds if not p.ok]
    return [(p.source, p.labels) for p in preds]


@pytest.fixture(scope="module", params=PROTOCOLS)
def sync_answers(request, server, val_files) -> tuple[str, list[Prediction]]:
    """The synchronous client's predictions for the val images, the reference of every test here."""
    with ImageClassifierClient(url_of(server, request.param), request.param, timeout_s=30) as c:
        return request.param, c.classify_files(val_files, batch_size=4)


def assert_same(preds: list[Prediction], reference: list[Prediction]) -> None:
    assert answers(preds) == answers(reference)
    for p, r in zip(preds, reference, strict=True):
        assert p.scores == pytest.approx(r.scores, abs=1e-5)


def test_aclassify_inside_asyncio_run(server, val_files, sync_answers):
    protocol, reference = sync_answers

    async def main() -> list[Prediction]:
        # a fresh client: the model's metadata is asked through the asyncio client too
        with ImageClassifierClient(url_of(server, protocol), protocol, timeout_s=30) as c:
            return await c.aclassify_files(val_files, batch_size=2, concurrency=4)

    assert_same(asyncio.run(main()), reference)


@pytest.fixture
def running_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop that was running before the client is used and runs on after it, in its own thread (as
    Jupyter's kernel or an ASGI server's)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_aclassify_in_a_running_loop_again_and_at_once(server, val_files, sync_answers, running_loop):
    protocol, reference = sync_answers
    blobs, names = [f.read_bytes() for f in val_files], [str(f) for f in val_files]
    with ImageClassifierClient(url_of(server, protocol), protocol, timeout_s=30) as c:

        async def handler() -> tuple[list[Prediction], ...]:
            # two requests handled at once by one client, as a web handler serving two users would
            return tuple(await asyncio.gather(c.aclassify(blobs, names, batch_size=3, concurrency=2),
                                              c.aclassify(blobs[::-1], names[::-1], batch_size=5)))

        for _ in range(2):  # the loop lives on between calls: each call opens and closes its own connection
            forward, backward = asyncio.run_coroutine_threadsafe(handler(), running_loop).result(timeout=120)
            assert_same(forward, reference)
            assert_same(backward[::-1], reference)


def test_classify_async_in_a_running_loop_names_the_awaitable(server, val_files):
    with ImageClassifierClient(server.http_url, "http", timeout_s=30) as c:

        async def notebook_cell() -> None:
            c.classify_async([val_files[0].read_bytes()], [str(val_files[0])])

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(RuntimeError, match=r"already running .*await client\.aclassify\("):
                asyncio.run(notebook_cell())
            gc.collect()
        assert not [w for w in caught if "never awaited" in str(w.message)], "a coroutine was made and dropped"
        # outside a loop the synchronous convenience still works
        assert c.classify_async([val_files[0].read_bytes()], [str(val_files[0])])[0].ok


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_aclassify_times_out_on_a_server_that_never_answers(silent_server, protocol, tmp_path):
    image = tmp_path / "x.jpg"
    image.write_bytes(b"\xff\xd8 not really a JPEG, never looked at")
    with ImageClassifierClient(silent_server, protocol, timeout_s=1, retries=0) as c:
        start = time.monotonic()
        preds = asyncio.run(c.aclassify_files([image, image], batch_size=1))
    # the metadata asked once for all, then again by each of the two batches: three one-second deadlines,
    # the batches' at once
    assert time.monotonic() - start < 15
    assert [(p.ok, p.bad_input) for p in preds] == [(False, False)] * 2, preds
