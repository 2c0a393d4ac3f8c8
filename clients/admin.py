"""The administrative key, and a small client for the APIs it unlocks.

Triton's model-repository (load/unload/index), model-config, logging, trace and shared-memory APIs
change or reveal what the server runs, so `make serve` restricts them to requests carrying a key
(Triton's ``--http-restricted-api`` / ``--grpc-restricted-protocol``). Inference, health, metadata and
statistics stay open. The key is ``$TRITON_ADMIN_KEY`` if set, else the content of a key file
(``$TRITON_ADMIN_KEY_FILE``, default ``.cache/admin.key``) that the server generates on first use,
readable by its owner only.

    python -m clients.admin index                 # models, versions and states (key from the file)
    python -m clients.admin load classifier       # (re)load a model: Triton swaps in its newest version
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import stat
import sys
import time
from pathlib import Path

from clients.client import error_message, triton_modules

PROJECT_ROOT = Path(__file__).resolve().parent.parent
KEY_ENV, KEY_FILE_ENV = "TRITON_ADMIN_KEY", "TRITON_ADMIN_KEY_FILE"
DEFAULT_KEY_FILE = PROJECT_ROOT / ".cache" / "admin.key"
HEADER = "admin-key"  # lower case: gRPC metadata keys are
# gRPC metadata reaches Triton's restricted-protocol check under this prefix (grpc_utils.h, r24.10)
GRPC_PREFIX = "triton-grpc-protocol-"
RESTRICTED_APIS = ("model-repository", "model-config", "logging", "trace", "shared-memory")
# AdminClient.reload: a parameter whose value changes on every reload. Triton skips a load of a model whose
# files and configuration are unchanged; a changed configuration is loaded beside the old instances and
# swapped in (as a new version is), so the model keeps serving meanwhile.
RELOAD_PARAMETER = "reloaded_at_ns"


class AdminKeyError(RuntimeError):
    pass


def key_file() -> Path:
    return Path(os.environ.get(KEY_FILE_ENV) or DEFAULT_KEY_FILE)


def load_key(create: bool = False, path: Path | None = None) -> str | None:
    """The key from the environment, else from the key file; ``create``: generate the file if missing.

    A key file that others can read is refused: anyone who reads it can reload or unload models."""
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV]
    path = Path(path or key_file())
    if not path.exists():
        if not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # O_EXCL: two servers starting at once cannot both write it; 0600 from the first byte
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return load_key(create=False, path=path)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise AdminKeyError(f"{path} is readable by others (mode {mode:o}): `chmod 600 {path}`, or delete it "
                            "and let the server generate a new one")
    key = path.read_text().strip()
    if not key or any(c in key for c in ":,= \t"):
        raise AdminKeyError(f"{path} does not hold a usable key (empty, or contains ':', ',', '=' or spaces)")
    return key


def server_args(key: str) -> list[str]:
    """tritonserver flags restricting RESTRICTED_APIS to requests with the key (syntax: <apis>:<header>=<value>)."""
    apis = ",".join(RESTRICTED_APIS)
    return [f"--http-restricted-api={apis}:{HEADER}={key}", f"--grpc-restricted-protocol={apis}:{HEADER}={key}"]


def headers(protocol: str, key: str | None) -> dict[str, str] | None:
    if key is None:
        return None
    return {HEADER if protocol == "http" else GRPC_PREFIX + HEADER: key}


class AdminClient:
    """Model control over HTTP or gRPC, sending the key; every call has a timeout."""

    def __init__(self, url: str, protocol: str = "http", key: str | None = None, timeout_s: float = 120.0):
        self.protocol, self.url, self.timeout_s = protocol, url, timeout_s
        self.headers = headers(protocol, key)
        mod, _ = triton_modules(protocol)
        # a load (a new ONNX session, a DALI pipeline) can take a while: HTTP's network timeout, gRPC's deadline
        self._client = mod.InferenceServerClient(url, **({"connection_timeout": timeout_s, "network_timeout": timeout_s}
                                                          if protocol == "http" else {}))
        self._kw = {"client_timeout": timeout_s} if protocol == "grpc" else {}

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

    def reload(self, model: str) -> None:
        """New instances of ``model`` even though nothing changed (e.g. after its Python stub died): loaded
        with its current configuration plus a fresh RELOAD_PARAMETER."""
        cfg = self.config(model)
        cfg.setdefault("parameters", {})[RELOAD_PARAMETER] = {"string_value": str(time.time_ns())}
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
        key = load_key()
        with AdminClient(args.url, args.protocol, key, args.timeout) as c:
            if args.action == "index":
                print(json.dumps(c.index(), indent=2))
            else:
                getattr(c, args.action)(args.model)
                print(f"{args.action}ed {args.model}")
    except AdminKeyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the server's refusal (403 / UNAVAILABLE without the key), or unreachable
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
