"""The server's two keys: one for model control, one for inference; the headers that carry them and the
tritonserver flags that require them.

Triton refuses an API group unless a request carries a header with a given value (its restricted APIs:
``--http-restricted-api`` / ``--grpc-restricted-protocol``). Each API group takes one key, so the two
keys are distinct and neither opens the other's APIs:

- ADMIN (``admin-key``): model-repository (load/unload/index), model-config, logging, trace and
  shared-memory, which change or reveal what the server runs. `make serve` always requires it.
- INFERENCE (``inference-key``): inference, metadata and statistics. Required when the server listens
  beyond loopback (anyone on the network could use it otherwise); health stays open for probes.

A key is ``$TRITON_<NAME>_KEY`` if set, else the content of a key file (``$TRITON_<NAME>_KEY_FILE``, default
``.cache/<name>.key``) that the server generates on first use, readable by its owner only.

    python -m clients.keys generate   # both key files, if missing (before the first `make -C docker serve`)
    python -m clients.keys flags      # the tritonserver flags for the keys in the environment (container entrypoints)
"""

from __future__ import annotations

import argparse
import os
import secrets
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# gRPC metadata reaches Triton's restricted-protocol check under this prefix (grpc_utils.h, r24.10)
GRPC_PREFIX = "triton-grpc-protocol-"
FORBIDDEN_CHARS = ":,= \t"  # the flag's syntax is <apis>:<header>=<value>


class UnusableKeyError(RuntimeError):
    """A key that cannot be used (a key file others can read, an empty or malformed key)."""


@dataclass(frozen=True)
class Key:
    name: str  # "admin", "inference"
    apis: tuple[str, ...]  # Triton's API groups it opens

    @property
    def header(self) -> str:
        return f"{self.name}-key"  # lower case: gRPC metadata keys are

    @property
    def env(self) -> str:
        return f"TRITON_{self.name.upper()}_KEY"

    @property
    def file_env(self) -> str:
        return f"{self.env}_FILE"

    def file(self) -> Path:
        return Path(os.environ.get(self.file_env) or PROJECT_ROOT / ".cache" / f"{self.name}.key")

    def load(self, create: bool = False, path: Path | None = None) -> str | None:
        """The key from the environment, else from the key file; ``create``: generate the file if missing.

        A key file that others can read is refused: anyone who reads it holds the key."""
        if os.environ.get(self.env):
            return check(os.environ[self.env], f"${self.env}")
        path = Path(path or self.file())
        if not path.exists():
            if not create:
                return None
            path.parent.mkdir(parents=True, exist_ok=True)
            try:  # O_EXCL: two servers starting at once cannot both write it; 0600 from the first byte
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return self.load(create=False, path=path)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise UnusableKeyError(f"{path} is readable by others (mode {mode:o}): `chmod 600 {path}`, or delete it "
                            "and let the server generate a new one")
        return check(path.read_text().strip(), str(path))

    def headers(self, protocol: str, key: str | None) -> dict[str, str]:
        """The request headers that carry ``key`` over ``protocol`` (none without a key)."""
        if key is None:
            return {}
        return {self.header if protocol == "http" else GRPC_PREFIX + self.header: key}

    def server_args(self, key: str) -> list[str]:
        """tritonserver flags that refuse this key's APIs to requests without it."""
        apis = ",".join(self.apis)
        return [f"--http-restricted-api={apis}:{self.header}={key}",
                f"--grpc-restricted-protocol={apis}:{self.header}={key}"]


def check(key: str, where: str) -> str:
    if not key or any(c in key for c in FORBIDDEN_CHARS):
        raise UnusableKeyError(f"{where} does not hold a usable key (empty, or contains ':', ',', '=' or spaces)")
    return key


ADMIN = Key("admin", ("model-repository", "model-config", "logging", "trace", "shared-memory"))
INFERENCE = Key("inference", ("inference", "metadata", "statistics"))
KEYS = (ADMIN, INFERENCE)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clients.keys", description=__doc__.split("\n")[0])
    p.add_argument("action", choices=("flags", "generate"),
                   help="flags: print the tritonserver flags requiring each key found in the environment; "
                        "generate: write each key file that is missing, and print the files")
    p.add_argument("--require", nargs="*", default=[k.name for k in KEYS], choices=[k.name for k in KEYS],
                   help="keys that must be set (default: both); a missing one is an error, not an open API")
    args = p.parse_args(argv)
    try:
        if args.action == "generate":
            for k in KEYS:
                k.load(create=True)
                print(k.file())
            return 0
        flags = []
        for k in KEYS:
            value = os.environ.get(k.env)
            if value is None and k.name in args.require:
                raise UnusableKeyError(f"${k.env} is not set: the server would answer {', '.join(k.apis)} "
                                "requests from anyone (set it from a secret)")
            if value is not None:
                flags += k.server_args(check(value, f"${k.env}"))
    except UnusableKeyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(" ".join(flags))
    return 0


if __name__ == "__main__":
    sys.exit(main())
