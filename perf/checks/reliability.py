"""Reliability measured on the real tritonserver: overload, graceful shutdown, fuzzing, live updates, faults.

    python -m perf.checks.reliability --repo model_repository --images data/synthetic/val     # make reliability

Each part is a function returning its figures, so the tests run the same code with small numbers
(tests/test_reliability.py) and `make reliability` runs it with the real ones and writes
perf/reports/reliability/report.{json,md}.

Every request made here is classified by how it ended (:func:`outcome`):
  ok          answered
  overloaded  refused by the queue policy: 503 / UNAVAILABLE "Exceeds maximum queue size" or
              "Request timeout expired"; a client may come back later
  refused     refused because the server is going away: the model has no available versions
              (drained), "Server is stopping", or the connection was refused (nothing was accepted)
  bad_input   400 / INVALID_ARGUMENT: the server blamed the request's data
  cut         the connection dropped or timed out while the request was in flight: the request may
              have been accepted and then lost
  error       anything else (a 500, a crash): never acceptable
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clients.client import error_message, error_status, image_input, triton_modules
from core import protocol as P
from perf.load.bodies import image_request, kserve_request, sample_images
from perf.paths import REPORTS
from serve.server import EXIT_TIMEOUT_S, TritonServer
from serve.watchdog import StubExit, children

OUTCOMES = ("ok", "overloaded", "refused", "bad_input", "cut", "error")


@dataclass
class Call:
    protocol: str
    sent: float      # time.monotonic() when sent
    done: float
    outcome: str
    message: str = ""


def outcome(e: BaseException) -> tuple[str, str]:
    """(outcome, message) of a failed request, from tritonclient's exception or the transport's."""
    status = error_status(e) or ""
    msg = error_message(e) if callable(getattr(e, "message", None)) else f"{type(e).__name__}: {e}"
    msg = msg or type(e).__name__
    if status in ("503", "StatusCode.UNAVAILABLE") and ("Exceeds maximum queue size" in msg
                                                       or "timeout expired" in msg):
        return "overloaded", msg
    if "has no available versions" in msg or "Server is stopping" in msg or "is not found" in msg:
        return "refused", msg
    if status in ("400", "StatusCode.INVALID_ARGUMENT"):
        return "bad_input", msg
    if isinstance(e, ConnectionRefusedError) or "Connect call failed" in msg or "Cannot connect" in msg \
            or "failed to connect" in msg.lower():
        return "refused", msg
    if isinstance(e, (ConnectionError, asyncio.TimeoutError, TimeoutError)) or "disconnected" in msg.lower() \
            or "reset by peer" in msg or "DEADLINE_EXCEEDED" in status or "Socket closed" in msg:
        return "cut", msg
    return "error", msg


async def worker(protocol: str, url: str, batches: list[list[bytes]], calls: list[Call], keep_going,
                 stop_on_refusal: bool = False, timeout_s: float = 60.0) -> None:
    """One closed-loop client: sends the batches in turn while ``keep_going()``; each call recorded.
    ``stop_on_refusal``: leave after the first refusal, as a client behind a load balancer goes elsewhere."""
    mod, aio = triton_modules(protocol, aio=True)
    client = aio.InferenceServerClient(url, **({"conn_timeout": timeout_s} if protocol == "http" else {}))
    kw = {"client_timeout": timeout_s} if protocol == "grpc" else {}
    try:
        i = 0
        while keep_going():
            sent = time.monotonic()
            try:
                await client.infer(P.ENSEMBLE, [image_input(mod, batches[i % len(batches)])], **kw)
                calls.append(Call(protocol, sent, time.monotonic(), "ok"))
            except Exception as e:
                kind, msg = outcome(e)
                calls.append(Call(protocol, sent, time.monotonic(), kind, msg[:300]))
                if kind == "refused" and stop_on_refusal:
                    return
                await asyncio.sleep(0.01)  # a failing server is not spun against
            i += 1
    finally:
        await client.close()


def counts(calls: list[Call]) -> dict[str, int]:
    return {k: sum(c.outcome == k for c in calls) for k in OUTCOMES}


def examples(calls: list[Call], kinds=("cut", "error", "bad_input")) -> dict[str, list[str]]:
    return {k: sorted({c.message for c in calls if c.outcome == k})[:5]
            for k in kinds if any(c.outcome == k for c in calls)}


def latency_ms(calls: list[Call], kind: str, q: float) -> float | None:
    xs = [1000 * (c.done - c.sent) for c in calls if c.outcome == kind]
    return round(float(np.percentile(xs, q)), 1) if xs else None


def to_batches(images: list[bytes], batch: int) -> list[list[bytes]]:
    return [images[i:i + batch] for i in range(0, len(images) - batch + 1, batch)] or [images]


def mixed_workers(server: TritonServer, batches: list[list[bytes]], n: int, calls: list[Call], keep_going,
                  **kw) -> list:
    """``n`` closed-loop clients (coroutines), HTTP and gRPC in turn, each starting at another batch."""
    protocols = ["http" if i % 2 == 0 else "grpc" for i in range(n)]
    return [worker(p, server.http_url if p == "http" else server.grpc_url,
                   batches[i % len(batches):] + batches[:i % len(batches)], calls, keep_going, **kw)
            for i, p in enumerate(protocols)]


@contextlib.contextmanager
def background_load(server: TritonServer, batches: list[list[bytes]], workers: int = 4):
    """Closed-loop clients (HTTP and gRPC in turn) in a thread while the body runs; yields their calls."""
    calls: list[Call] = []
    done = threading.Event()

    async def run():
        await asyncio.gather(*mixed_workers(server, batches, workers, calls, lambda: not done.is_set()))

    t = threading.Thread(target=lambda: asyncio.run(run()))
    t.start()
    try:
        yield calls
    finally:
        done.set()
        t.join(timeout=120)


# ------------------------------------------------------------------------------------------------
# overload
# ------------------------------------------------------------------------------------------------

def overload(server: TritonServer, images: list[bytes], batch: int = 4, concurrency: int = 16, seconds: float = 5.0,
             factor: float = 4.0) -> dict:
    """Capacity (closed loop at ``concurrency``), then an open-loop load of ``factor`` times it: requests
    are sent on a fixed schedule whatever the answers, as independent users do."""
    mod, aio = triton_modules("http", aio=True)
    batches = to_batches(images, batch)
    calls: list[Call] = []

    async def closed():
        until = time.monotonic() + seconds
        await asyncio.gather(*(worker("http", server.http_url, batches, calls, lambda: time.monotonic() < until)
                               for _ in range(concurrency)))

    asyncio.run(closed())
    capacity = counts(calls)["ok"] / seconds
    rate = factor * capacity
    offered: list[Call] = []

    async def open_loop():
        client = aio.InferenceServerClient(server.http_url, conn_limit=10_000, conn_timeout=60)

        async def one(i):
            sent = time.monotonic()
            try:
                await client.infer(P.ENSEMBLE, [image_input(mod, batches[i % len(batches)])])
                offered.append(Call("http", sent, time.monotonic(), "ok"))
            except Exception as e:
                kind, msg = outcome(e)
                offered.append(Call("http", sent, time.monotonic(), kind, msg[:300]))

        tasks, start = [], time.monotonic()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(i)))
        sent_s = time.monotonic() - start
        await asyncio.gather(*tasks)
        await client.close()
        return sent_s

    sent_s = asyncio.run(open_loop())
    c = counts(offered)
    return {"batch": batch, "concurrency": concurrency, "seconds": seconds,
            "capacity_requests_per_s": round(capacity, 1), "capacity_images_per_s": round(capacity * batch, 1),
            "capacity_p99_ms": latency_ms(calls, "ok", 99), "factor": factor,
            "offered_requests_per_s": round(len(offered) / sent_s, 1), "requests": len(offered),
            "accepted": c["ok"], "rejected": c["overloaded"], "other_errors": len(offered) - c["ok"] - c["overloaded"],
            "accepted_p50_ms": latency_ms(offered, "ok", 50), "accepted_p99_ms": latency_ms(offered, "ok", 99),
            "rejected_p99_ms": latency_ms(offered, "overloaded", 99),
            "examples": examples(offered, ("overloaded", "cut", "error"))}


# ------------------------------------------------------------------------------------------------
# graceful shutdown
# ------------------------------------------------------------------------------------------------

def shutdown_under_load(repo: Path, images: list[bytes], workers: int = 8, load_s: float = 2.0, batch: int = 4,
                        drain: bool = True, log_file: Path | None = None) -> dict:
    """Stop the server while ``workers`` clients (half HTTP, half gRPC) keep sending; each client leaves
    at its first refusal. Lost = requests that did not get an answer or a refusal (cut, error)."""
    batches = to_batches(images, batch)
    server = TritonServer(repo, None, model_control="explicit", admin_key=secrets.token_urlsafe(24), log_file=log_file)
    server.start()
    proc = server.proc
    assert proc is not None  # started
    calls: list[Call] = []
    stopped: dict = {}

    def stop_server() -> None:
        t = time.monotonic()
        stopped["at"] = t
        server.stop(drain=drain)
        stopped["exit_s"] = time.monotonic() - t
        stopped["returncode"] = proc.returncode

    def alive() -> bool:
        return proc.poll() is None

    async def run() -> None:
        tasks = [asyncio.create_task(w) for w in mixed_workers(server, batches, workers, calls, alive,
                                                               stop_on_refusal=True, timeout_s=3 * EXIT_TIMEOUT_S)]
        await asyncio.sleep(load_s)
        stopper = threading.Thread(target=stop_server)
        stopper.start()
        await asyncio.gather(*tasks)
        await asyncio.to_thread(stopper.join)

    try:
        asyncio.run(run())
    finally:
        server.stop()
    before = [c for c in calls if c.sent < stopped["at"]]
    c = counts(calls)
    return {"workers": workers, "drain": drain, "requests": len(calls), **c,
            "ok_after_stop_began": sum(x.outcome == "ok" and x.sent >= stopped["at"] for x in calls),
            "sent_before_stop": len(before), "answered_of_those": sum(x.outcome == "ok" for x in before),
            "lost": c["cut"] + c["error"], "exit_s": round(stopped["exit_s"], 2),
            "exit_timeout_s": EXIT_TIMEOUT_S, "returncode": stopped["returncode"], "examples": examples(calls)}


# ------------------------------------------------------------------------------------------------
# fuzzing
# ------------------------------------------------------------------------------------------------

# Triton 2.51's HTTP frontend answers a request whose JSON header it cannot parse with 500 (not 400), with
# these messages: the request is refused clearly and nothing else is affected, but the status is Triton's
# to fix. Counted separately; any other 5xx, or no answer, fails.
FRONTEND_PARSE_ERRORS = ("failed to parse the request JSON buffer", "Unable to parse '")

FUZZ_KINDS = ("random_bytes", "mutated_image", "truncated_image", "huge_dimensions", "wrong_dtype",
              "wrong_shape", "wrong_input", "malformed_header", "oversized")  # oversized last


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header (with a valid CRC) claims width x height, and no pixel data worth the name."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _jpeg_claiming(jpeg: bytes, width: int, height: int) -> bytes:
    """``jpeg`` with its frame header's size replaced."""
    data = bytearray(jpeg)
    pos = 2
    while pos + 4 < len(data):
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2:pos + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            data[pos + 5:pos + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
            return bytes(data)
        pos += 2 + length
    raise ValueError("no frame header in the JPEG")


OVERSIZED_EVERY = 100  # tens of MiB each: one case in a hundred


def fuzz_cases(seed: int, n: int, jpegs: list[bytes], oversized_bytes: int):
    """``n`` seeded malformed requests (kind, body, headers), made one at a time, cycling through
    FUZZ_KINDS (oversized every OVERSIZED_EVERY-th); the same seed gives the same requests, so a
    failure reproduces."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    pngs = []
    for j in jpegs[:4]:
        buf = io.BytesIO()
        Image.open(io.BytesIO(j)).save(buf, "PNG")
        pngs.append(buf.getvalue())
    images = jpegs + pngs
    for i in range(n):
        kind = "oversized" if i % OVERSIZED_EVERY == OVERSIZED_EVERY - 1 else FUZZ_KINDS[i % (len(FUZZ_KINDS) - 1)]
        img = images[int(rng.integers(len(images)))]
        if kind == "random_bytes":
            blob = rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes()
            body, hdr = image_request(blob)
        elif kind == "mutated_image":
            data = bytearray(img)
            for pos in rng.integers(0, len(data), int(rng.integers(1, 32))):
                data[pos] = int(rng.integers(256))
            body, hdr = image_request(bytes(data))
        elif kind == "truncated_image":
            body, hdr = image_request(img[:int(rng.integers(1, len(img)))])
        elif kind == "huge_dimensions":
            w, h = (int(x) for x in rng.integers(8000, 65535, 2))
            blob = _png_claiming(w, h) if rng.random() < 0.5 else _jpeg_claiming(jpegs[0], w, h)
            body, hdr = image_request(blob)
        elif kind == "wrong_dtype":
            dtype = ["FP32", "INT64", "BYTES", "FP16", "BOOL", "INT8"][int(rng.integers(6))]
            body, hdr = kserve_request([(P.IMAGE, dtype, [1, len(img)], img)])
        elif kind == "wrong_shape":
            shape = [[len(img)], [1, len(img) + 7], [2, len(img)], [1, 1, len(img)], [0, 0],
                     [-1, len(img)]][int(rng.integers(6))]
            body, hdr = kserve_request([(P.IMAGE, "UINT8", shape, img)])
        elif kind == "wrong_input":
            body, hdr = kserve_request([("NOT_" + P.IMAGE, "UINT8", [1, len(img)], img)]) if rng.random() < 0.5 else \
                kserve_request([(P.IMAGE, "UINT8", [1, len(img)], img), ("EXTRA", "UINT8", [1, 4], b"\0" * 4)])
        elif kind == "malformed_header":
            body, hdr = image_request(img)
            cut = int(hdr["Inference-Header-Content-Length"])
            variant = int(rng.integers(3))
            if variant == 0:  # the header length points into the middle of the JSON
                hdr = {**hdr, "Inference-Header-Content-Length": str(int(rng.integers(1, cut)))}
            elif variant == 1:  # JSON garbage
                junk = rng.integers(32, 127, cut, dtype=np.uint8).tobytes()
                body = junk + body[cut:]
            else:  # longer than the body
                hdr = {**hdr, "Inference-Header-Content-Length": str(len(body) + 100)}
        else:  # oversized: more encoded bytes than the server accepts (not zeros: those are row padding)
            blob = img + rng.integers(1, 256, oversized_bytes - len(img), dtype=np.uint8).tobytes()
            body, hdr = image_request(blob)
        yield kind, body, hdr


def _post(http_url: str, body: bytes, headers: dict[str, str], timeout_s: float):
    """POST one request to the ensemble's infer endpoint: (HTTP status, response headers (case-insensitive), body)."""
    import http.client

    host, port = http_url.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    try:
        conn.request("POST", f"/v2/models/{P.ENSEMBLE}/infer", body=body, headers=headers)
        r = conn.getresponse()
        return r.status, r.msg, r.read()
    finally:
        conn.close()


def send_raw(http_url: str, body: bytes, headers: dict[str, str], timeout_s: float = 60.0) -> tuple[int, str]:
    """POST one request to the ensemble; (HTTP status, error message or ""). Status 0: no answer."""
    import http.client

    try:
        status, _, text = _post(http_url, body, headers, timeout_s)
    except (OSError, http.client.HTTPException) as e:
        return 0, f"{type(e).__name__}: {e}"
    if status == 200:
        return 200, ""
    try:
        return status, json.loads(text).get("error", text[:200].decode(errors="replace"))
    except ValueError:
        return status, text[:200].decode(errors="replace")


def stub_pids(server: TritonServer) -> set[int]:
    """The Python-backend stub processes of ``server`` (its children, one per model instance)."""
    assert server.proc is not None  # started
    return children(server.proc.pid)


def fuzz(server: TritonServer, jpegs: list[bytes], n: int = 2000, seed: int = 0, oversized_bytes: int | None = None,
         check_every: int = 100) -> dict:
    """``n`` seeded malformed requests against a running server. Every one must be answered 200 or 4xx;
    every ``check_every`` cases and at the end a good image must still be classified as before, and the
    stub processes must be the same ones (none died and was restarted)."""
    from core.preprocess import MAX_IMAGE_BYTES

    proc = server.proc
    assert proc is not None  # running
    good_body, good_hdr = image_request(jpegs[0])
    reference = send_good(server.http_url, good_body, good_hdr)
    stubs = stub_pids(server)
    results: dict[str, dict[int, int]] = {}
    failures: list[dict] = []
    frontend_500 = 0
    t = time.monotonic()
    for i, (kind, body, hdr) in enumerate(fuzz_cases(seed, n, jpegs, oversized_bytes or MAX_IMAGE_BYTES + 1024)):
        status, msg = send_raw(server.http_url, body, hdr)
        results.setdefault(kind, {}).setdefault(status, 0)
        results[kind][status] += 1
        if status == 500 and msg.startswith(FRONTEND_PARSE_ERRORS):
            frontend_500 += 1
        elif not (status == 200 or 400 <= status < 500):
            failures.append({"case": i, "kind": kind, "status": status, "message": msg[:300]})
        checkpoint = (i + 1) % check_every == 0 or i == n - 1
        if checkpoint and send_good(server.http_url, good_body, good_hdr) != reference:
            failures.append({"case": i, "kind": kind, "status": "good request after it answered differently"})
    return {"cases": n, "seed": seed, "seconds": round(time.monotonic() - t, 1),
            "by_kind": {k: {str(s): c for s, c in sorted(v.items())} for k, v in results.items()},
            "frontend_parse_500": frontend_500, "failures": failures, "stubs_same": stub_pids(server) == stubs,
            "server_alive": proc.poll() is None}


def send_good(http_url: str, body: bytes, headers: dict[str, str]) -> str:
    """The top label for a good request (raises if it is not answered)."""
    status, hdrs, text = _post(http_url, body, headers, 60.0)
    if status != 200:
        raise RuntimeError(f"a good image was answered {status}: {text[:300]!r}")
    n = int(hdrs.get("Inference-Header-Content-Length", len(text)))
    outputs = {o["name"]: o for o in json.loads(text[:n])["outputs"]}
    return json.dumps(outputs[P.LABELS].get("data") or outputs[P.LABELS]["shape"])


# ------------------------------------------------------------------------------------------------
# live updates
# ------------------------------------------------------------------------------------------------

def live_update(repo: Path, images: list[bytes], data: Path | None, work: Path, workers: int = 4) -> dict:
    """Publish the served ONNX again as a new version, then roll back, on a copy of ``repo`` served with
    explicit model control, under closed-loop load; every request must be answered."""
    import shutil

    from serve.publish import publish, rollback, served_onnx

    live = Path(work) / "live_repo"
    shutil.rmtree(live, ignore_errors=True)
    shutil.copytree(repo, live, ignore=shutil.ignore_patterns(".staging-*", ".retired-*", ".rejected-*"))
    key = secrets.token_urlsafe(24)
    steps = []
    with TritonServer(live, None, model_control="explicit", admin_key=key,
                      log_file=Path(work) / "live_update.log") as s:
        new = Path(work) / "republished.onnx"
        shutil.copyfile(served_onnx(live), new)
        with background_load(s, to_batches(images, 4), workers) as calls:
            time.sleep(1.0)
            for name, action in (("publish", lambda: publish(new, live, data, s.http_url, key=key)),
                                 ("rollback", lambda: rollback(live, s.http_url, key=key))):
                t = time.monotonic()
                r = action()
                steps.append({"step": name, "version": r["version"], "seconds": round(time.monotonic() - t, 2)})
                time.sleep(1.0)
    c = counts(calls)
    return {"steps": steps, "requests": len(calls), **c, "failed": len(calls) - c["ok"],
            "examples": examples(calls, ("overloaded", "refused", "cut", "error"))}


# ------------------------------------------------------------------------------------------------
# faults: a Python-backend stub killed under load
# ------------------------------------------------------------------------------------------------

def _exit_of(server: TritonServer, seen: int, pid: int) -> StubExit | None:
    """The watchdog's record of ``pid``'s exit among those after its first ``seen``, or None."""
    assert server.watchdog is not None
    return next((e for e in server.watchdog.exits[seen:] if e.pid == pid), None)


def stub_faults(server: TritonServer, images: list[bytes], workers: int = 4, timeout_s: float = 60.0,
                settle_s: float = 1.0, answers_after: int = 20) -> list[dict]:
    """Kill (SIGKILL) each Python-backend model's stub in turn while clients keep sending; the server's
    watchdog must reload the model. Per model: seconds from the kill to the reload and to the first answer
    sent after it, requests failed meanwhile (those in flight in the dead stub wait for Triton's 1-2 s health
    check before they fail), and requests sent after the reload that failed (must be 0); the load goes on
    until ``answers_after`` of those were answered."""
    import os
    import signal

    from serve.watchdog import stub_model

    if server.watchdog is None:
        raise ValueError("the server runs without its stub watchdog")
    out = []
    for model in sorted(m for p in stub_pids(server) if (m := stub_model(p))):
        victim = {stub_model(p): p for p in stub_pids(server)}[model]
        seen = len(server.watchdog.exits)
        with background_load(server, to_batches(images, 4), workers) as calls:
            time.sleep(settle_s)
            killed = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            while time.monotonic() - killed < timeout_s:
                e = _exit_of(server, seen, victim)
                if e and e.error:
                    break
                if e and e.reloaded and sum(c.outcome == "ok" and c.sent >= e.reloaded
                                            for c in calls) >= answers_after:
                    break
                time.sleep(0.05)
        e = _exit_of(server, seen, victim)
        back = e.reloaded if e else None
        after = [c for c in calls if back is not None and c.sent >= back]
        out.append({"model": model, "pid": victim, "how": e.how if e else None,
                    "detected_s": round(e.detected - killed, 2) if e else None,
                    "reloaded_s": round(back - killed, 2) if back else None,
                    "first_answer_s": round(min(c.done for c in after if c.outcome == "ok") - killed, 2)
                    if any(c.outcome == "ok" for c in after) else None,
                    "failed_while_down": sum(c.outcome != "ok" and c.done >= killed for c in calls if c not in after),
                    "failed_after": sum(c.outcome != "ok" for c in after),
                    "answered_after": sum(c.outcome == "ok" for c in after),
                    "error": e.error if e else "not detected", "examples": examples(calls, ("error", "cut"))})
    return out


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------

def render_markdown(r: dict) -> str:
    lines = ["# Reliability report", "", f"Measured on the real tritonserver, {r['when']}, repository `{r['repo']}`; "
             "the load generators are Python clients (tritonclient asyncio) on the same machine.", ""]
    if "overload" in r:
        lines += _overload_section(r)
    if "shutdown" in r:
        lines += _shutdown_section(r)
    if "live_update" in r:
        lines += _live_update_section(r)
    if "stub_faults" in r:
        lines += _stub_faults_section(r)
    if "fuzz" in r:
        lines += _fuzz_section(r)
    return "\n".join(lines)


def _overload_section(r: dict) -> list[str]:
    """Capacity, then an open-loop load above it: accepted, rejected, other errors."""
    o = r["overload"]
    lines = ["## Overload", "",
             f"Capacity: closed loop, {o['concurrency']} clients, batches of {o['batch']} images: "
             f"{o['capacity_requests_per_s']} requests/s ({o['capacity_images_per_s']} images/s), "
             f"p99 {o['capacity_p99_ms']} ms. "
             f"Then requests were sent on a fixed schedule at {o['factor']}x that for {o['seconds']} s.", "",
             "| offered (req/s) | requests | accepted | rejected (503) | other errors "
             "| accepted p50 / p99 (ms) | rejected p99 (ms) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| {o['offered_requests_per_s']} | {o['requests']} | {o['accepted']} | {o['rejected']} | "
             f"{o['other_errors']} | "
             f"{o['accepted_p50_ms']} / {o['accepted_p99_ms']} | {o['rejected_p99_ms']} |", "",
             "Latencies are measured by the client, which shares the 2 cores with the server: at this offered "
             "rate they include the client's own backlog.", ""]
    return lines


def _shutdown_section(r: dict) -> list[str]:
    """Each stop under load: answered, refused, lost, how long the exit took."""
    lines = ["## Graceful shutdown under load", "",
             "The server is stopped while clients (half HTTP, half gRPC) keep sending; a client leaves at its "
             "first refusal. Lost = requests neither answered nor refused (cut mid-flight, or an error).", "",
             "| stop | requests | answered | refused | lost | exit (s) | exit timeout (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for x in r["shutdown"]:
        lines.append(f"| {'drain, then SIGINT' if x['drain'] else 'SIGINT only'} | {x['requests']} | {x['ok']} | "
                     f"{x['refused']} | {x['lost']} | {x['exit_s']} | {x['exit_timeout_s']} |")
    lines.append("")
    return lines


def _live_update_section(r: dict) -> list[str]:
    """Publish and rollback under load: the versions served and the failed requests."""
    u = r["live_update"]
    lines = ["## Live update under load", "",
             "A new classifier version is published, then rolled back, while clients keep sending.", "",
             "| step | version served after | seconds |", "| --- | ---: | ---: |"]
    lines += [f"| {x['step']} | {x['version']} | {x['seconds']} |" for x in u["steps"]]
    lines += ["", f"Requests during the run: {u['requests']}, answered {u['ok']}, failed {u['failed']}.", ""]
    return lines


def _stub_faults_section(r: dict) -> list[str]:
    """Each killed stub: when it was noticed and reloaded, the requests failed meanwhile and after."""
    lines = ["## A killed Python stub", "",
             "Each Python-backend model's stub process is killed (SIGKILL) under load. Triton 2.51 leaves it "
             "dead and "
             "fails that model's requests (500 \"Stub process ... is not healthy\") until restarted; the "
             "server's watchdog (serve/watchdog.py) notices and reloads the model.", "",
             "| model | detected (s) | reloaded (s) | first answer (s) | failed while down | failed after "
             "| answered after |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {x['model']} | {x['detected_s']} | {x['reloaded_s']} | {x['first_answer_s']} | "
              f"{x['failed_while_down']} | "
              f"{x['failed_after']} | {x['answered_after']} |" for x in r["stub_faults"]]
    lines += ["", "Times from the kill.", ""]
    return lines


def _fuzz_section(r: dict) -> list[str]:
    """The malformed requests by kind and how they were answered."""
    f = r["fuzz"]
    lines = ["## Fuzzing", "", f"{f['cases']} malformed requests (seed {f['seed']}) in {f['seconds']} s; "
             "a good image "
             "was checked after every 100.", "", "| kind | answers (HTTP status: count) |", "| --- | --- |"]
    lines += [f"| {k} | {', '.join(f'{s}: {n}' for s, n in v.items())} |" for k, v in f["by_kind"].items()]
    lines += ["", f"Failures: {len(f['failures'])}; stub processes unchanged: {f['stubs_same']}; server alive: "
              f"{f['server_alive']}. {f['frontend_parse_500']} requests with an unparsable JSON header were "
              "answered 500 "
              "by Triton 2.51's HTTP frontend (a clear message, nothing else affected; 400 would be right).", ""]
    return lines


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Reliability figures from the real tritonserver")
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--images", type=Path, default=Path("data/synthetic/val"))
    p.add_argument("--data", type=Path, help="ImageFolder root: the live update's accuracy gate (omit: no gate)")
    p.add_argument("--out", type=Path, default=REPORTS / "reliability")
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--fuzz-cases", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overload-seconds", type=float, default=5.0)
    return p


def main(args: argparse.Namespace) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    images = [b for _, b in sample_images(args.images, 64)]
    r: dict = {"when": time.strftime("%Y-%m-%d %H:%M"), "repo": str(args.repo)}
    with TritonServer(args.repo, None, log_file=args.out / "tritonserver.log") as server:
        print("overload ...", flush=True)
        r["overload"] = overload(server, images, batch=16, seconds=args.overload_seconds)
        print("fuzzing ...", flush=True)
        r["fuzz"] = fuzz(server, images, n=args.fuzz_cases, seed=args.seed)
    with TritonServer(args.repo, None, model_control="explicit", admin_key=secrets.token_urlsafe(24),
                      log_file=args.out / "stub_faults.log") as server:
        print("killed stubs ...", flush=True)
        r["stub_faults"] = stub_faults(server, images)
    print("shutdown under load ...", flush=True)
    r["shutdown"] = [shutdown_under_load(args.repo, images, args.workers, drain=d,
                                         log_file=args.out / f"shutdown_drain{int(d)}.log")
                     for d in (True, False)]
    print("live update under load ...", flush=True)
    r["live_update"] = live_update(args.repo, images, args.data, args.out)
    (args.out / "report.json").write_text(json.dumps(r, indent=2))
    (args.out / "report.md").write_text(render_markdown(r))
    print(render_markdown(r))
    ok = (not r["fuzz"]["failures"] and r["fuzz"]["stubs_same"] and r["overload"]["other_errors"] == 0
          and r["shutdown"][0]["lost"] == 0 and r["live_update"]["failed"] == 0
          and all(x["reloaded_s"] is not None and x["failed_after"] == 0 for x in r["stub_faults"]))
    print(f"\n{'all reliability checks passed' if ok else 'SOME RELIABILITY CHECKS FAILED'}; "
          f"report: {args.out / 'report.md'}")
    r["passed"] = ok
    return r


if __name__ == "__main__":
    raise SystemExit(0 if main(get_args_parser().parse_args())["passed"] else 1)
