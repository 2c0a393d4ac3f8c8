"""A running server to load-test by its URL (`make perf|loadtest|report URL=...`): its address and protocol,
the inference key and gRPC TLS as the client sends them (clients.keys, clients.client.Tls), and what the
server says it is. Nothing here starts or stops a server, and every call has a timeout.

    d = Deployment.from_environment("triton.example.com:8001", "grpc", Tls(root_cert=Path("ca.pem")))
    d, measured = d.describe()   # the server's version, the model's versions and interface, its config if readable
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from clients.client import Tls, error_message, error_status, triton_modules
from clients.keys import ADMIN, INFERENCE, Key, UnusableKeyError
from core import protocol as P
from perf.load.stats import STAGES

TIMEOUT_S = 10.0  # each call here: a server that does not answer within it is reported, not waited for
PROTOCOL_NAMES = {"http": "HTTP", "grpc": "gRPC"}
PROTOCOLS = tuple(PROTOCOL_NAMES)
# perf_analyzer's TLS flags for each of Tls's files
PERF_ANALYZER_TLS = (("root_cert", "--ssl-grpc-root-certifications-file"),
                     ("cert", "--ssl-grpc-certificate-chain-file"), ("key", "--ssl-grpc-private-key-file"))
# words of gRPC's errors when the TLS handshake itself failed (an untrusted CA, a wrong host name, not TLS)
TLS_FAILURES = ("tls", "ssl", "handshake", "certificate")


class DeploymentError(RuntimeError):
    """The server at the URL cannot be measured: unreachable, TLS failed, a key refused, the model missing."""


def key_source(key: Key) -> str:
    """Where ``key`` is taken from, as Key.load looks (for messages: never the key itself)."""
    return f"${key.env}" if os.environ.get(key.env) else str(key.file())


def host_port(url: str, protocol: str) -> str:
    """``url`` as tritonclient and perf_analyzer take it (host:port); http:// is accepted for HTTP."""
    scheme, sep, rest = url.partition("://")
    if sep and not (scheme == "http" and protocol == "http"):
        raise DeploymentError(f"URL={url}: give host:port of the server's {PROTOCOL_NAMES[protocol]} endpoint "
                              "(Triton has no HTTPS of its own; gRPC over TLS is PROTOCOL=grpc with TLS_ROOT_CERT)")
    address = rest if sep else url
    if ":" not in address.rstrip("/"):
        raise DeploymentError(f"URL={url}: give host:port (Triton's defaults: 8000 for HTTP, 8001 for gRPC)")
    return address.rstrip("/")


@dataclass(frozen=True)
class Deployment:
    """A server this run did not start, reached at ``url`` (host:port) over ``protocol``."""
    url: str
    protocol: str
    key: str | None = None  # the inference key, sent with every request
    tls: Tls | None = None  # gRPC over TLS
    admin_key: str | None = None  # sent only where the server keeps the model's configuration behind it
    timeout_s: float = TIMEOUT_S

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise DeploymentError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.tls is not None and self.protocol != "grpc":
            raise DeploymentError("TLS is offered for gRPC only: Triton's HTTP endpoint has no TLS (PROTOCOL=grpc "
                                  "with the gRPC port, or a TLS-terminating proxy in front of HTTP)")
        if self.tls is not None:
            try:
                self.tls.grpc_kwargs()  # the files exist, a client certificate has its key
            except (ValueError, FileNotFoundError) as e:
                raise DeploymentError(str(e)) from None

    @classmethod
    def from_environment(cls, url: str, protocol: str, tls: Tls | None = None,
                         timeout_s: float = TIMEOUT_S) -> Deployment:
        """The inference key taken as the client takes it: $TRITON_INFERENCE_KEY, else its key file."""
        try:
            key = INFERENCE.load()
        except UnusableKeyError as e:
            raise DeploymentError(str(e)) from None
        return cls(host_port(url, protocol), protocol, key, tls, timeout_s=timeout_s)

    @property
    def headers(self) -> dict[str, str]:
        """The keys' headers (gRPC: metadata); a fresh dict each time (tritonclient's HTTP client adds to it)."""
        return {**INFERENCE.headers(self.protocol, self.key), **ADMIN.headers(self.protocol, self.admin_key)}

    @property
    def secrets(self) -> tuple[str, ...]:
        """What no log or report may show."""
        return tuple(k for k in (self.key, self.admin_key) if k)

    def redact(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, "***")
        return text

    def perf_analyzer_args(self) -> list[str]:
        """perf_analyzer's flags for the keys (-H: HTTP headers, gRPC metadata too) and TLS."""
        args = [a for k, v in self.headers.items() for a in ("-H", f"{k}:{v}")]
        if self.tls is not None:
            args += ["--ssl-grpc-use-ssl", "true"]
            args += [a for field, flag in PERF_ANALYZER_TLS if (path := getattr(self.tls, field)) is not None
                     for a in (flag, str(path))]
        return args

    # -- calls ----------------------------------------------------------------------------------------
    def _client(self) -> Any:
        mod, _ = triton_modules(self.protocol)
        kw = ({"connection_timeout": self.timeout_s, "network_timeout": self.timeout_s} if self.protocol == "http"
              else self.tls.grpc_kwargs() if self.tls else {})
        return mod.InferenceServerClient(self.url, **kw)

    def _call(self, client: Any, method: str, *args: Any) -> Any:
        """A metadata, config or statistics call with the keys; gRPC's answer as JSON, with a deadline."""
        kw: dict[str, Any] = {"headers": self.headers or None}
        if self.protocol == "grpc":
            kw |= {"as_json": True, "client_timeout": self.timeout_s}
        return getattr(client, method)(*args, **kw)

    def _unreachable(self, why: str) -> DeploymentError:
        where = f"cannot reach Triton at {self.url} over {PROTOCOL_NAMES[self.protocol]} ({why})"
        if self.protocol == "grpc" and self.tls is not None and any(w in why.lower() for w in TLS_FAILURES):
            root = self.tls.root_cert or "the system CAs"
            return DeploymentError(f"{where}: the TLS handshake failed. Is TLS_ROOT_CERT ({root}) the CA that signed "
                                   "the server's certificate, the certificate made for this host name, and the URL "
                                   "the server's gRPC port, serving TLS?")
        if self.protocol == "grpc" and self.tls is None and "socket closed" in why.lower():
            return DeploymentError(f"{where}: if the server serves gRPC over TLS, give its CA: TLS_ROOT_CERT=ca.pem "
                                   "(--tls-root-cert)")
        return DeploymentError(f"{where}: is the server running, and the URL host:port of its "
                               f"{PROTOCOL_NAMES[self.protocol]} endpoint (HTTP 8000, gRPC 8001 with PROTOCOL=grpc)?")

    def _refused(self, e: Exception, what: str) -> DeploymentError:
        """A call the server answered with an error, as a message that says what to do."""
        message, status = error_message(e), error_status(e)
        if f"{INFERENCE.header}'" in message:  # "expecting header 'inference-key'" (gRPC: its prefixed name)
            sent = (f"the inference key from {key_source(INFERENCE)} was refused" if self.key else
                    f"no inference key was sent (neither ${INFERENCE.env} nor the key file {INFERENCE.file()} is set)")
            return DeploymentError(
                f"Triton at {self.url} refused {what} ({status}: {message}): {sent}. Set ${INFERENCE.env} to the key "
                f"the server was started with, or point ${INFERENCE.file_env} (make: INFERENCE_KEY_FILE=) at a copy of "
                "its key file")
        if status in ("404", "StatusCode.NOT_FOUND") or "unknown model" in message:
            return DeploymentError(f"Triton at {self.url} does not serve {what} ({message}): is it this project's "
                                   "server?")
        return DeploymentError(f"Triton at {self.url} failed {what} ({status}: {message})")

    def statistics(self) -> dict[str, dict]:
        """Triton's cumulative per-model statistics keyed by model name, in the HTTP API's form
        (perf.load.stats.model_stats), read over this deployment's own protocol with its key."""
        client = self._client()
        try:
            stats = self._call(client, "get_inference_statistics")["model_stats"]
        except Exception as e:
            raise self._refused(e, "its statistics") from None
        finally:
            client.close()
        return {s["name"]: _http_form(s) for s in stats}

    def describe(self, model: str = P.ENSEMBLE) -> tuple[Deployment, dict]:
        """What is measured, as the server says it: its name and version, the model's versions and interface,
        and its configuration where the server lets it be read; and the deployment as it must be called (the
        admin key added where the configuration, which perf_analyzer reads, needs it). Raises DeploymentError
        with the reason and the fix: unreachable, TLS, a key refused, no such model."""
        client = self._client()
        try:
            try:
                live = client.is_server_live(**({"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}))
            except Exception as e:  # refused, DNS, a timeout, TLS: nothing answered
                raise self._unreachable(error_message(e).strip() or type(e).__name__) from None
            if not live:
                raise self._unreachable("it did not answer that it is live")
            try:
                server = self._call(client, "get_server_metadata")
            except Exception as e:
                raise self._refused(e, "its server metadata") from None
            try:
                meta = self._call(client, "get_model_metadata", model)
            except Exception as e:
                raise self._refused(e, f"model '{model}'") from None
            deployment, config, note = self._config(client, model)
        finally:
            client.close()
        versions = sorted(meta.get("versions") or [], key=lambda v: int(v) if v.isdigit() else -1)
        return deployment, {
            "url": self.url, "protocol": self.protocol, "tls": self.tls is not None,
            "tls_root_cert": str(self.tls.root_cert) if self.tls and self.tls.root_cert else None,
            "inference_key": self.key is not None, "key_from": key_source(INFERENCE) if self.key else None,
            "admin_key": deployment.admin_key is not None,
            "server": {"name": server.get("name"), "version": server.get("version")},
            "model": meta.get("name", model), "versions": versions, "version": versions[-1] if versions else None,
            "platform": meta.get("platform"), "inputs": meta.get("inputs", []), "outputs": meta.get("outputs", []),
            "config": config, "config_note": note}

    def _config(self, client: Any, model: str) -> tuple[Deployment, dict | None, str]:
        """The model's configuration as the server loaded it, if it lets it be read: with the inference key, else
        with the admin key where the server keeps its model-config API behind it and one is set."""
        try:
            config = _config_of(self.protocol, self._call(client, "get_model_config", model))
            return self, config, "read with the inference key"
        except Exception as e:
            if f"{ADMIN.header}'" not in error_message(e):
                return self, None, f"not readable: {error_message(e)}"
        try:
            admin_key = ADMIN.load()
        except UnusableKeyError as e:
            return self, None, f"the server keeps it behind the admin key, and that key is unusable: {e}"
        if admin_key is None:
            return self, None, (f"the server keeps its model-config API behind the admin key, and neither ${ADMIN.env} "
                                f"nor the key file {ADMIN.file()} is set")
        with_admin = replace(self, admin_key=admin_key)
        try:
            config = _config_of(self.protocol, with_admin._call(client, "get_model_config", model))
        except Exception as e:
            return self, None, f"the admin key from {key_source(ADMIN)} was refused: {error_message(e)}"
        return with_admin, config, f"read with the admin key from {key_source(ADMIN)}, which the server asks for it"

    def top_k(self, measured: dict) -> int:
        """The labels per answer of the model described by describe(): its LABELS output's last dimension."""
        labels = next((o for o in measured["outputs"] if o["name"] == P.LABELS), None)
        if labels is None:
            raise DeploymentError(f"model '{measured['model']}' at {self.url} has no {P.LABELS} output (the "
                                  "classification layout): locust's users ask for LABELS and SCORES")
        return int(labels["shape"][-1])


def _config_of(protocol: str, answer: dict) -> dict:
    return answer["config"] if protocol == "grpc" else answer


def _http_form(stat: dict) -> dict:
    """One model's statistics as the HTTP API gives them: gRPC's JSON form writes 64-bit counters as strings
    and leaves out what is zero."""
    def numbers(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: numbers(v) for k, v in x.items()}
        if isinstance(x, list):
            return [numbers(v) for v in x]
        return int(x) if isinstance(x, str) and x.isdigit() else x

    out = numbers(stat)
    out.setdefault("inference_count", 0)
    out.setdefault("execution_count", 0)
    inference = out.setdefault("inference_stats", {})
    for stage in ("success", *STAGES):
        inference[stage] = {"count": 0, "ns": 0, **inference.get(stage, {})}
    return out
