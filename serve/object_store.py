"""A model repository in an object store: Triton reads ``s3://`` repositories natively.

    python -m serve.object_store server --port 9000        # a local S3 server (moto), in the foreground
    python -m serve.object_store upload --repo model_repository --to s3://127.0.0.1:9000/models/classify
    make serve REPO=s3://127.0.0.1:9000/models/classify     # Triton downloads the models at load time

A URL is ``s3://[host:port/]bucket/prefix``: with ``host:port``, a self-hosted store at that address
(plain HTTP, as Triton's S3 client then uses); without, AWS itself. The credentials are the usual
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_DEFAULT_REGION``; for a self-hosted store and
none set, the local server's placeholders (LOCAL_CREDENTIALS) are used.

Object stores have no folders, only keys: a folder exists while a key lies under it. The ensemble's
version folder holds no file of its own, so build.render_repo writes a placeholder into it; without one
Triton fails the ensemble with "No model version was found". Uploads are not atomic (an object store
has no rename): publish a new release under a new prefix and point the server at it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from serve import die_with_parent, stop_on_signals

SCHEME = "s3://"
LOCAL_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local", "AWS_DEFAULT_REGION": "us-east-1"}
# not part of what is served: publish's staging, retired and rejected versions, bytecode caches
SKIPPED_DIRS = (".staging-", ".retired-", ".rejected-", "__pycache__")
TIMEOUT_S = 30


@dataclass(frozen=True)
class S3Url:
    endpoint: str | None  # "host:port" of a self-hosted store; None: AWS
    bucket: str
    prefix: str

    def __str__(self) -> str:
        return SCHEME + "/".join(filter(None, [self.endpoint, self.bucket, self.prefix]))


def is_object_store(repo: object) -> bool:
    return str(repo).startswith(SCHEME)


def parse(url: str) -> S3Url:
    """``s3://[host:port/]bucket/prefix`` (a first part with a ':' is an endpoint, as in Triton)."""
    if not is_object_store(url):
        raise ValueError(f"not an s3:// URL: {url!r}")
    parts = [p for p in url[len(SCHEME):].split("/") if p]
    endpoint = parts.pop(0) if parts and ":" in parts[0] else None
    if not parts:
        raise ValueError(f"{url!r} names no bucket: s3://[host:port/]bucket/prefix")
    return S3Url(endpoint, parts[0], "/".join(parts[1:]))


def credentials(url: str) -> dict[str, str]:
    """The environment a process needs to read ``url``: the caller's AWS settings, or for a self-hosted
    store with none set, the local placeholders."""
    if parse(url).endpoint and "AWS_ACCESS_KEY_ID" not in os.environ:
        return {**LOCAL_CREDENTIALS, **{k: os.environ[k] for k in LOCAL_CREDENTIALS if k in os.environ}}
    return {}


def client(url: str):
    """A boto3 S3 client for ``url``'s store, with timeouts on every call."""
    import boto3
    from botocore.config import Config

    u = parse(url)
    env = {**os.environ, **credentials(url)}
    return boto3.client("s3", endpoint_url=f"http://{u.endpoint}" if u.endpoint else None,
                        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
                        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
                        region_name=env.get("AWS_DEFAULT_REGION", "us-east-1"),
                        config=Config(connect_timeout=TIMEOUT_S, read_timeout=TIMEOUT_S, retries={"max_attempts": 3}))


def repository_files(repo: Path) -> dict[str, Path]:
    """key suffix -> file of everything a server reads from ``repo`` (hidden files too: the placeholder)."""
    repo = Path(repo)
    out = {}
    for p in sorted(repo.rglob("*")):
        rel = p.relative_to(repo)
        if p.is_file() and not any(part.startswith(SKIPPED_DIRS) for part in rel.parts[:-1]):
            out[rel.as_posix()] = p
    return out


def ensure_bucket(s3, bucket: str) -> None:
    """Create ``bucket`` unless the store has it."""
    if bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
        s3.create_bucket(Bucket=bucket)


def upload(repo: Path, url: str) -> list[str]:
    """Make ``url`` hold exactly ``repo``'s files (the bucket is created if missing, keys under the prefix
    that the repository no longer has are deleted); returns the keys written."""
    u, s3 = parse(url), client(url)
    files = repository_files(repo)
    if not any(k.endswith("config.pbtxt") for k in files):
        raise ValueError(f"{repo} holds no model (no */config.pbtxt): run `make repo` first")
    ensure_bucket(s3, u.bucket)
    base = f"{u.prefix}/" if u.prefix else ""
    written = []
    for rel, path in files.items():
        s3.upload_file(str(path), u.bucket, base + rel)
        written.append(base + rel)
    stale = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=u.bucket, Prefix=base)
             for o in page.get("Contents", []) if o["Key"] not in set(written)]
    for i in range(0, len(stale), 1000):
        s3.delete_objects(Bucket=u.bucket, Delete={"Objects": [{"Key": k} for k in stale[i:i + 1000]]})
    return written


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalS3:
    """moto's S3 server on 127.0.0.1 (in memory: what it holds is gone when it stops). A context manager;
    the process is stopped on every exit path."""

    def __init__(self, port: int | None = None, log_file: Path | None = None):
        self.port = port or free_port()
        self.log_file = log_file
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, bucket: str, prefix: str = "") -> str:
        return str(S3Url(self.endpoint, bucket, prefix))

    @property
    def process(self) -> subprocess.Popen:
        """The moto_server process; a RuntimeError before start()."""
        if self.proc is None:
            raise RuntimeError("moto_server has not been started: call start() first")
        return self.proc

    def start(self, timeout: float = 60.0) -> LocalS3:
        exe = Path(sys.executable).parent / "moto_server"
        if not exe.exists():
            raise FileNotFoundError(f"{exe} not found: moto[server] is installed by `make venv`")
        # the child writes to its own copy of the log file's descriptor: ours is closed once it has started
        with open(self.log_file, "ab") if self.log_file else contextlib.nullcontext(subprocess.DEVNULL) as sink:
            self.proc = proc = subprocess.Popen([*die_with_parent(), str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
                                                stdout=sink,
                                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready(proc, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, proc: subprocess.Popen, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with code {proc.returncode} (port {self.port} taken?)")
            try:
                with urllib.request.urlopen(f"http://{self.endpoint}/moto-api/", timeout=2):
                    return
            except OSError as e:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"moto_server did not answer on {self.endpoint} within {timeout:.0f} s") from e
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="A model repository in an object store (S3)")
    sub = p.add_subparsers(dest="action", required=True)
    srv = sub.add_parser("server", help="run a local S3 server (moto) in the foreground, in memory")
    srv.add_argument("--port", type=int, default=9000)
    up = sub.add_parser("upload", help="make an s3:// prefix hold exactly a rendered repository")
    up.add_argument("--repo", type=Path, default=Path("model_repository"))
    up.add_argument("--to", required=True, help="s3://[host:port/]bucket/prefix")
    a = p.parse_args(argv)
    if a.action == "server":
        stop_on_signals()  # Ctrl-C and `kill` stop it, and moto with it
        with LocalS3(a.port) as s3:
            print(f"local S3 server on {s3.endpoint} (in memory; Ctrl-C stops it); e.g. "
                  f"python -m serve.object_store upload --to {s3.url('models', 'classify')}", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                s3.process.wait()
        return 0
    try:
        keys = upload(a.repo, a.to)
    except Exception as e:  # botocore's errors name the bucket, key and reason
        print(f"error: uploading {a.repo} to {a.to} failed: {e}", file=sys.stderr)
        return 1
    print(f"uploaded {len(keys)} files of {a.repo} to {a.to}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
