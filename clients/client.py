"""Python client for the served ensemble over HTTP or gRPC (tritonclient), sync and asyncio.

    from clients.client import ImageClassifierClient
    with ImageClassifierClient("localhost:8001", protocol="grpc") as c:
        for p in c.classify_files(["cat.jpg", "dog.jpg"]):
            print(p.source, p.labels[0], p.scores[0])

Retries happen only where a retry can help:
- a batch that the server rejects because of a bad image (INVALID_ARG: HTTP 400, gRPC INVALID_ARGUMENT)
  is retried image by image, so the good images still get their answers and the bad one gets the
  server's error message;
- a request refused because the server is overloaded (UNAVAILABLE: HTTP 503, a full queue or a queue
  timeout) is retried after an exponential backoff with jitter, at most ``retries`` times;
- any other error (INTERNAL, an unreachable server) is the server's, not the images': every image of
  that batch gets it at once.
Every call has a timeout (``timeout_s``). Every request carries the inference key when there is one
(``key``; default: ``$TRITON_INFERENCE_KEY`` or its key file, see clients.keys), and gRPC can go over TLS
(``tls``).

Inside a running event loop (Jupyter, FastAPI) await ``aclassify`` / ``aclassify_files``; ``classify_async`` is
their synchronous convenience for scripts, which starts an event loop of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from clients.keys import GRPC_PREFIX, INFERENCE
from core import protocol as P

if TYPE_CHECKING:
    from clients.metrics import ClientMetrics

DEFAULT_URLS = {"http": "localhost:8000", "grpc": "localhost:8001"}


class ServerUnreachable(ConnectionError):
    pass


class RequestError(RuntimeError):
    """The server answered with an error (e.g. HTTP 400 / gRPC INVALID_ARGUMENT for a bad image)."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status

    @property
    def bad_input(self) -> bool:
        """The server blamed the request's data (Triton's INVALID_ARG), so a smaller request can succeed."""
        return self.status in ("400", "StatusCode.INVALID_ARGUMENT")

    @property
    def unavailable(self) -> bool:
        """Overloaded or stopping (Triton's UNAVAILABLE): the same request may succeed a little later."""
        return self.status in ("503", "StatusCode.UNAVAILABLE")


@dataclass
class Prediction:
    source: str
    labels: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    probabilities: list[float] | None = None
    error: str | None = None
    bad_input: bool = False  # the error blames this image (not the server, the network or the load)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self, with_probabilities: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_probabilities:
            d.pop("probabilities")
        return d


def pad_batch(blobs: Sequence[bytes]) -> np.ndarray:
    """Encoded images -> uint8 [N, max_len], zero-padded (the ensemble strips the padding)."""
    arr = np.zeros((len(blobs), max((len(b) for b in blobs), default=0)), np.uint8)
    for i, b in enumerate(blobs):
        arr[i, : len(b)] = np.frombuffer(b, np.uint8)
    return arr


def triton_modules(protocol: str, aio: bool = False) -> tuple[ModuleType, ModuleType]:
    """tritonclient's module for ``protocol``, and its asyncio module (``aio``; else the same one twice)."""
    if protocol == "http":
        import tritonclient.http as m
        if aio:
            import tritonclient.http.aio as a
            return m, a
    elif protocol == "grpc":
        import tritonclient.grpc as m
        if aio:
            import tritonclient.grpc.aio as a
            return m, a
    else:
        raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
    return m, m


def image_input(mod: ModuleType, blobs: Sequence[bytes]) -> Any:
    """The ensemble's IMAGE input for encoded images, with tritonclient module ``mod`` (HTTP sends it with
    the binary tensor extension by default)."""
    arr = pad_batch(blobs)
    inp = mod.InferInput(P.IMAGE, list(arr.shape), "UINT8")
    inp.set_data_from_numpy(arr)
    return inp


@dataclass(frozen=True)
class _Send:
    """A plan's step (ImageClassifierClient._request): send one inference request."""
    inputs: list[Any]
    outputs: list[Any]


@dataclass(frozen=True)
class _Wait:
    """A plan's step: wait before re-sending."""
    seconds: float


@dataclass(frozen=True)
class _Metadata:
    """A plan's step: ask the model's metadata (as a dict)."""


_Step = _Send | _Wait | _Metadata
_T = TypeVar("_T")
# yields its steps, is sent each call's result (or the exception the call raised), returns the predictions
_Plan = Generator[_Step, Any, list[Prediction]]


def _batches(blobs: Sequence[bytes], sources: Sequence[str],
             batch_size: int) -> list[tuple[Sequence[bytes], Sequence[str]]]:
    return [(blobs[i:i + batch_size], sources[i:i + batch_size]) for i in range(0, len(blobs), batch_size)]


def _failed(sources: Sequence[str], e: RequestError) -> list[Prediction]:
    return [Prediction(s, error=str(e), bad_input=e.bad_input) for s in sources]


def error_status(e: BaseException) -> str | None:
    """tritonclient's status of a failed call ("400", "StatusCode.UNAVAILABLE"), None for other errors."""
    status = getattr(e, "status", None)
    return str(status()) if callable(status) else None


def error_message(e: BaseException) -> str:
    """tritonclient's message of a failed call (the server's words), else the exception's text."""
    msg = getattr(e, "message", None)
    return msg() if callable(msg) else str(e)


@dataclass(frozen=True)
class Tls:
    """gRPC over TLS from the client's side: the CA that signed the server's certificate (None: the system's
    roots), and for mutual TLS the client's own certificate chain and private key (PEM files)."""
    root_cert: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def grpc_kwargs(self) -> dict[str, Any]:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs its private key, and the other way round")
        for path in (self.root_cert, self.cert, self.key):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"TLS file {path} does not exist")
        return {"ssl": True, "root_certificates": self.root_cert and str(self.root_cert),
                "private_key": self.key and str(self.key), "certificate_chain": self.cert and str(self.cert)}


AUTO = "auto"  # ImageClassifierClient's key: the inference key from the environment or its file, if any


def outside_event_loop(method: str, instead: str) -> None:
    """Raise, naming the awaitable ``instead``, if an event loop is running in this thread: ``method`` starts
    its own (asyncio.run), which cannot run inside another."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(f"ImageClassifierClient.{method} starts an event loop of its own, and one is already running "
                       f"here (Jupyter, an async web handler): use `await client.{instead}(...)` instead")


def request_error(e: BaseException) -> RequestError:
    """A failed call as a RequestError; a refusal for want of the inference key says where the key comes from."""
    message = error_message(e)
    if f"expecting header '{INFERENCE.header}'" in message or f"'{GRPC_PREFIX}{INFERENCE.header}'" in message:
        message += (f" (the server needs the inference key: set ${INFERENCE.env}, or copy the server's "
                    f"{INFERENCE.file().name} to {INFERENCE.file()} or to ${INFERENCE.file_env})")
    return RequestError(message, error_status(e))


class ImageClassifierClient:
    def __init__(self, url: str | None = None, protocol: str = "http", model: str = P.ENSEMBLE,
                 timeout_s: float = 60.0, with_probabilities: bool = False, top_k: int = 5,
                 retries: int = 4, backoff_s: float = 0.1, max_backoff_s: float = 2.0,
                 key: str | None = AUTO, tls: Tls | None = None, metrics: ClientMetrics | None = None):
        """``top_k``: labels asked for when the model answers through Triton's classification extension
        (a model with a postprocess step returns the k it was rendered with). ``retries``: attempts after
        UNAVAILABLE, waiting a random time up to ``backoff_s`` * 2^attempt (capped at ``max_backoff_s``).
        ``key``: the inference key sent with every request (None: none). ``tls``: gRPC over TLS (Triton's
        HTTP endpoint has none of its own). ``metrics``: the served metrics of every answer, counted here
        (clients/metrics.py; the answers then carry every class's probability)."""
        if tls is not None and protocol != "grpc":
            raise ValueError("TLS is offered for gRPC only: Triton's HTTP endpoint has no TLS (use --protocol grpc, "
                             "or a TLS-terminating proxy in front of HTTP)")
        self.protocol, self.model = protocol, model
        self.url = url or DEFAULT_URLS[protocol]
        self.timeout_s, self.top_k, self.metrics = timeout_s, top_k, metrics
        self.with_probabilities = with_probabilities or metrics is not None  # the entropy needs every class
        self._version = ""  # the model's newest version, from its metadata (the metrics' label)
        self.max_retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.retried = 0  # requests re-sent after UNAVAILABLE, over this client's life
        self._num_classes: int | None | bool = False  # False: not asked yet (see _classification)
        self._mod, _ = triton_modules(protocol)
        self._headers = INFERENCE.headers(protocol, INFERENCE.load() if key == AUTO else key)
        self._tls_kw = tls.grpc_kwargs() if tls else {}
        kw = {"network_timeout": timeout_s, "connection_timeout": timeout_s} if protocol == "http" else {}
        self._client = self._mod.InferenceServerClient(self.url, **kw, **self._tls_kw)
        # gRPC has no client-wide timeout: every call carries its own deadline
        self._timeout_kw = {"client_timeout": timeout_s} if protocol == "grpc" else {}

    @property
    def _call_kw(self) -> dict[str, Any]:
        """Every call's keyword arguments: its deadline (gRPC) and the key's header, a fresh dict each time
        (tritonclient's HTTP client adds its own entries to the headers it is given)."""
        return {**self._timeout_kw, **({"headers": dict(self._headers)} if self._headers else {})}

    @property
    def _metadata_kw(self) -> dict[str, Any]:
        """get_model_metadata's keyword arguments: gRPC answers a protobuf unless asked for JSON."""
        return {"as_json": True, **self._call_kw} if self.protocol == "grpc" else self._call_kw

    def _retry_delay(self, e: Exception, attempt: int) -> float:
        """Seconds to wait before re-sending after failed attempt ``attempt`` (0-based), or the RequestError
        raised when no retry can help: only UNAVAILABLE is retried, at most ``retries`` times. The wait is
        random in [0, backoff_s * 2^attempt] capped at max_backoff_s ("full jitter": clients refused
        together do not come back together)."""
        err = request_error(e)
        if not err.unavailable or attempt >= self.max_retries:
            raise err from None
        self.retried += 1
        return random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2 ** attempt))

    # -- connection -------------------------------------------------------------------------------
    def check_ready(self) -> None:
        """Raise ServerUnreachable with a helpful message unless the ensemble is ready."""
        try:
            live = self._client.is_server_live(**self._call_kw)
        except Exception as e:  # connection refused, DNS, timeouts: all mean "not reachable"
            why = error_message(e).strip() or type(e).__name__
            raise ServerUnreachable(
                f"cannot reach Triton at {self.url} over {self.protocol.upper()} ({why}); "
                f"is the server running? Start it with `make serve`, or pass --url") from None
        if not live:
            raise ServerUnreachable(f"Triton at {self.url} is not live")
        if not self._client.is_model_ready(self.model, **self._call_kw):
            raise ServerUnreachable(
                f"Triton at {self.url} is up but model '{self.model}' is not ready: the model repository it serves "
                f"has no such model, or it failed to load (the server's log says why); `make repo` renders "
                f"model_repository/, then restart `make serve`")

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ImageClassifierClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ---------------------------------------------------------------------------------
    def _classification(self) -> Generator[_Step, Any, int | None]:
        """A plan: how the model answers, from its metadata (asked once): None when it returns LABELS and
        SCORES (a postprocess model), else its number of classes: it returns PROBABILITIES, and the top k
        come from Triton's classification extension ("score:index:label" strings)."""
        if self._num_classes is False:
            meta = yield _Metadata()
            if isinstance(meta, Exception):
                raise request_error(meta) from None
            outputs = {o["name"]: o for o in meta["outputs"]}
            self._version = max(meta.get("versions") or [""], key=lambda v: int(v) if v.isdigit() else -1)
            self._num_classes = None if P.LABELS in outputs else int(outputs[P.PROBABILITIES]["shape"][-1])
        return self._num_classes

    def _inputs_outputs(self, mod: ModuleType, blobs: Sequence[bytes],
                        classes: int | None) -> tuple[list[Any], list[Any]]:
        inp = image_input(mod, blobs)
        if classes is not None:  # every class when the whole distribution is wanted
            k = classes if self.with_probabilities else min(self.top_k, classes)
            return [inp], [mod.InferRequestedOutput(P.PROBABILITIES, class_count=k)]
        names = P.OUTPUTS if self.with_probabilities else (P.LABELS, P.SCORES)
        return [inp], [mod.InferRequestedOutput(n) for n in names]

    def _predictions(self, result: Any, sources: Sequence[str], classes: int | None) -> list[Prediction]:
        if classes is not None:
            out: list[Prediction] = []
            for src, row in zip(sources, result.as_numpy(P.PROBABILITIES).reshape(len(sources), -1), strict=True):
                parsed = [x.decode().split(":", 2) for x in row]  # best first; a label may contain ':'
                probs = None
                if self.with_probabilities:
                    probs = [0.0] * classes
                    for score, index, _ in parsed:
                        probs[int(index)] = float(score)
                top = parsed[:self.top_k]
                top_labels, top_scores = [label for _, _, label in top], [float(score) for score, _, _ in top]
                out.append(Prediction(src, top_labels, top_scores, probs))
            return out
        labels, scores = result.as_numpy(P.LABELS), result.as_numpy(P.SCORES)
        probs = result.as_numpy(P.PROBABILITIES) if self.with_probabilities else None
        return [Prediction(src, [x.decode() for x in labels[i]], [float(s) for s in scores[i]],
                           None if probs is None else [float(p) for p in probs[i]])
                for i, src in enumerate(sources)]

    # -- one copy of the retry and isolation logic, for the sync and the asyncio paths -------------
    # A plan is a generator that decides what to send and what to do with the answers; it yields a
    # _Send or a _Metadata (and is sent back the result, or the exception the call raised) or a _Wait.
    # _run carries a plan out with the sync client and time.sleep, _run_async with an asyncio client
    # and asyncio.sleep: they differ only in how they call and wait.
    def _request(self, mod: ModuleType, blobs: Sequence[bytes], sources: Sequence[str] | None) -> _Plan:
        """One request for the whole batch, re-sent after UNAVAILABLE (with backoff); raises RequestError
        if the server rejects it."""
        sources = list(sources or [f"image{i}" for i in range(len(blobs))])
        classes = yield from self._classification()
        inputs, outputs = self._inputs_outputs(mod, blobs, classes)
        attempt = 0
        while True:
            answer = yield _Send(inputs, outputs)
            try:
                if isinstance(answer, Exception):
                    raise answer
                return self._predictions(answer, sources, classes)
            except Exception as e:
                delay = self._retry_delay(e, attempt)
            yield _Wait(delay)
            attempt += 1

    def _batch(self, mod: ModuleType, blobs: Sequence[bytes], sources: Sequence[str],
               progress: Callable[[int], None] | None) -> _Plan:
        """A batch's predictions, one per image: a batch rejected for bad input is retried image by image
        (the good images still get answers); any other RequestError is every image's error."""
        try:
            preds = yield from self._request(mod, blobs, sources)
        except RequestError as e:
            if e.bad_input and len(blobs) > 1:
                preds = yield from self._isolate(mod, blobs, sources)
            else:
                preds = _failed(sources, e)
        if self.metrics is not None:
            self.metrics.observe(self.model, self._version, blobs, preds)
        if progress:
            progress(len(blobs))
        return preds

    def _isolate(self, mod: ModuleType, blobs: Sequence[bytes], sources: Sequence[str]) -> _Plan:
        """One request per image: the good ones get their answers, the bad ones the server's error."""
        out: list[Prediction] = []
        for b, s in zip(blobs, sources, strict=True):
            try:
                out += yield from self._request(mod, [b], [s])
            except RequestError as e:
                out += _failed([s], e)
        return out

    def _run(self, plan: Generator[_Step, Any, _T]) -> _T:
        """Carry out a plan with the sync client."""
        answer: Any = None
        while True:
            try:
                step = plan.send(answer)
            except StopIteration as done:
                return done.value
            answer = None
            if isinstance(step, _Wait):
                time.sleep(step.seconds)
                continue
            try:
                if isinstance(step, _Metadata):
                    answer = self._client.get_model_metadata(self.model, **self._metadata_kw)
                else:
                    answer = self._client.infer(self.model, step.inputs, outputs=step.outputs, **self._call_kw)
            except Exception as e:
                answer = e

    async def _run_async(self, client: Any, plan: Generator[_Step, Any, _T]) -> _T:
        """Carry out a plan with an asyncio client (tritonclient's .aio): as _run, awaiting instead."""
        answer: Any = None
        while True:
            try:
                step = plan.send(answer)
            except StopIteration as done:
                return done.value
            answer = None
            if isinstance(step, _Wait):
                await asyncio.sleep(step.seconds)
                continue
            try:
                if isinstance(step, _Metadata):
                    answer = await client.get_model_metadata(self.model, **self._metadata_kw)
                else:
                    answer = await client.infer(self.model, step.inputs, outputs=step.outputs, **self._call_kw)
            except Exception as e:
                answer = e

    # -- sync -------------------------------------------------------------------------------------
    def infer(self, blobs: Sequence[bytes], sources: Sequence[str] | None = None) -> list[Prediction]:
        """One request for the whole batch (re-sent after UNAVAILABLE, with backoff); raises RequestError
        if the server rejects it (the metrics count the answers; classify's isolation counts refusals)."""
        preds = self._run(self._request(self._mod, blobs, sources))
        if self.metrics is not None:
            self.metrics.observe(self.model, self._version, blobs, preds)
        return preds

    def classify(self, blobs: Sequence[bytes], sources: Sequence[str], batch_size: int = 8,
                 progress: Callable[[int], None] | None = None) -> list[Prediction]:
        """Sync: batches one after the other; a rejected batch is retried image by image."""
        out: list[Prediction] = []
        for b, s in _batches(blobs, sources, batch_size):
            out += self._run(self._batch(self._mod, b, s, progress))
        return out

    def classify_files(self, paths: Sequence[Path | str], batch_size: int = 8) -> list[Prediction]:
        return self.classify([Path(p).read_bytes() for p in paths], [str(p) for p in paths], batch_size)

    # -- asyncio ----------------------------------------------------------------------------------
    def classify_async(self, blobs: Sequence[bytes], sources: Sequence[str], batch_size: int = 8,
                       concurrency: int = 4, progress: Callable[[int], None] | None = None) -> list[Prediction]:
        """``aclassify`` for synchronous code: runs it in an event loop of its own, so only where none is
        running (a script, the command line); inside one (Jupyter, FastAPI) ``await c.aclassify(...)``."""
        outside_event_loop("classify_async", "aclassify")
        return asyncio.run(self.aclassify(blobs, sources, batch_size, concurrency, progress))

    async def aclassify(self, blobs: Sequence[bytes], sources: Sequence[str], batch_size: int = 8,
                        concurrency: int = 4, progress: Callable[[int], None] | None = None) -> list[Prediction]:
        """Up to ``concurrency`` batches in flight at once on tritonclient's asyncio client, awaited in the
        caller's event loop; the same answers, retries and isolation as ``classify``. The asyncio client is
        opened for this call and closed at its end (it belongs to the loop that made it)."""
        mod, aio = triton_modules(self.protocol, aio=True)
        # HTTP: conn_timeout is aiohttp's total timeout per request; gRPC: a deadline per call (_call_kw)
        kw = {"conn_timeout": self.timeout_s} if self.protocol == "http" else {}
        client = aio.InferenceServerClient(self.url, **kw, **self._tls_kw)
        gate = asyncio.Semaphore(concurrency)

        async def one_batch(b: Sequence[bytes], s: Sequence[str]) -> list[Prediction]:
            async with gate:
                return await self._run_async(client, self._batch(mod, b, s, progress))

        try:
            # the metadata once, not by every batch at once; if it fails, each batch asks again and reports
            # the error as its images' (as classify does)
            with contextlib.suppress(RequestError):
                await self._run_async(client, self._classification())
            batches = [one_batch(b, s) for b, s in _batches(blobs, sources, batch_size)]
            return [p for preds in await asyncio.gather(*batches) for p in preds]
        finally:
            await client.close()

    async def aclassify_files(self, paths: Sequence[Path | str], batch_size: int = 8,
                              concurrency: int = 4) -> list[Prediction]:
        blobs = await asyncio.to_thread(lambda: [Path(p).read_bytes() for p in paths])  # disk reads off the loop
        return await self.aclassify(blobs, [str(p) for p in paths], batch_size, concurrency)
