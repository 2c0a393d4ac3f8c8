"""The administrative key, and a small client for the APIs it unlocks.

Triton's model-repository (load/unload/index), model-config, logging, trace and shared-memory APIs
change or reveal what the server runs, so `make serve` restricts them to requests carrying a key
(Triton's ``--http-restricted-api`` / ``--grpc-restricted-protocol``). The key: clients.keys.ADMIN
(inference, metadata and statistics take the inference key instead, health none).

    python -m clients.admin index                 # models, versions and states (key from the file)
    python -m clients.admin load classifier       # (re)load a model: Triton swaps in its newest version
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from clients.client import Tls, error_message, triton_modules
from clients.keys import ADMIN, UnusableKeyError

# AdminClient.reload: a parameter whose value changes on every reload. Triton skips a load of a model whose
# files and configuration are unchanged; a changed configuration is loaded beside the old instances and
# swapped in (as a new version is), so the model keeps serving meanwhile.
RELOAD_PARAMETER = "reloaded_at_ns"


class AdminClient:
    """Model control over HTTP or gRPC, sending the key; every call has a timeout."""

    def __init__(self, url: str, protocol: str = "http", key: str | None = None, timeout_s: float = 120.0,
                 tls: Tls | None = None):
        """``tls``: gRPC over TLS (clients.client.Tls)."""
        self.protocol, self.url, self.timeout_s = protocol, url, timeout_s
        self._headers = ADMIN.headers(protocol, key)
        mod, _ = triton_modules(protocol)
        # a load (a new ONNX session, a DALI pipeline) can take a while: HTTP's network timeout, gRPC's deadline
        if tls is not None and protocol != "grpc":
            raise ValueError("TLS is offered for gRPC only: Triton's HTTP endpoint has no TLS")
        self._client = mod.InferenceServerClient(url, **({"connection_timeout": timeout_s, "network_timeout": timeout_s}
                                                          if protocol == "http" else {}),
                                                 **(tls.grpc_kwargs() if tls else {}))
        self._kw = {"client_timeout": timeout_s} if protocol == "grpc" else {}

    @property
    def headers(self) -> dict[str, str] | None:
        """A fresh copy per call: tritonclient's HTTP client adds its own entries to the dict it is given."""
        return dict(self._headers) or None

    def index(self) -> list[dict]:
        """[{name, version, state, reason}] of every model version the repository holds."""
        kw = dict(self._kw, as_json=True) if self.protocol == "grpc" else {}
        out = self._client.get_model_repository_index(headers=self.headers, **kw)
        return out.get("models", []) if isinstance(out, dict) else out

    def config(self, model: str) -> dict:
        """The model's configuration as the server loaded it (Triton's JSON form)."""
        if self.protocol == "http":
            return self._client.get_model_config(model, headers=self.headers)
        return self._client.get_model_config(model, headers=self.headers, as_json=True, **self._kw)["config"]

    def load(self, model: str) -> None:
        self._client.load_model(model, headers=self.headers, **self._kw)

    def reload(self, model: str, parameters: dict[str, str] | None = None) -> None:
        """New instances of ``model`` even though nothing changed (e.g. after its Python stub died): loaded
        with its current configuration plus a fresh RELOAD_PARAMETER, and ``parameters`` set (the
        repository's file is not changed: a plain load() goes back to it)."""
        cfg = self.config(model)
        values = {**(parameters or {}), RELOAD_PARAMETER: str(time.time_ns())}
        cfg.setdefault("parameters", {}).update({k: {"string_value": v} for k, v in values.items()})
        self._client.load_model(model, headers=self.headers, config=json.dumps(cfg), **self._kw)

    def unload(self, model: str) -> None:
        self._client.unload_model(model, headers=self.headers, **self._kw)

    def ready(self, model: str, version: str = "") -> bool:
        return self._client.is_model_ready(model, version, headers=self.headers, **self._kw)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clients.admin", description="Triton model control, with the admin key")
    p.add_argument("action", choices=("index", "load", "unload"))
    p.add_argument("model", nargs="?")
    p.add_argument("--url", default="localhost:8000")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per call")
    args = p.parse_args(argv)
    if args.action != "index" and not args.model:
        p.error(f"{args.action} needs a model name")
    try:
        key = ADMIN.load()
        with AdminClient(args.url, args.protocol, key, args.timeout) as c:
            if args.action == "index":
                print(json.dumps(c.index(), indent=2))
            else:
                getattr(c, args.action)(args.model)
                print(f"{args.action}ed {args.model}")
    except UnusableKeyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the server's refusal (403 / UNAVAILABLE without the key), or unreachable
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
