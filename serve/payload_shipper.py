"""Payload samples shipped to an object store: ``make repo PAYLOAD_UPLOAD=s3://[host:port/]bucket/prefix``.

    python -m serve.payload_shipper download s3://127.0.0.1:9000/samples/classify samples/   # for make relabel

The served model records its samples into a local folder (served/payloads.py, ``payload_dir``), bounded in
size. Why not straight to S3 from the model: the served models run in the Python backend's stub, whose
interpreter cannot load Python's ``_ssl`` (``undefined symbol: _PyModule_Add`` with the pip wheel's stub), so
boto3 cannot run there; and an upload on the request path would cost every sampled request a network call.
So the server's launcher (serve.server.TritonServer, ``python -m serve``) runs this shipper beside Triton:
every ``interval_s`` it uploads each complete sample (the image first, then its record: a record in the
store means its image is there too) under ``prefix/<instance folder>/<file>``, then deletes the local
copies. A store that is down leaves the samples where they are, within the folder's bound, and they are
shipped when it is back; when the server stops, what is left is shipped once more.
"""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path
from typing import Any

from serve import object_store
from served.payloads import RECORD

INTERVAL_S = 2.0


class PayloadShipper:
    """Uploads ``directory``'s samples to ``url`` (s3://[host:port/]bucket/prefix) from a thread of its own."""

    def __init__(self, directory: Path | str, url: str, interval_s: float = INTERVAL_S):
        self.dir, self.url, self.interval_s = Path(directory), url, interval_s
        self.target = object_store.parse(url)
        self.s3 = object_store.client(url)
        self.shipped = self.failed = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PayloadShipper:
        object_store.ensure_bucket(self.s3, self.target.bucket)
        self._thread = threading.Thread(target=self._run, name="payload-shipper", daemon=True)
        self._thread.start()
        return self

    def key(self, path: Path) -> str:
        rel = path.relative_to(self.dir).as_posix()
        return f"{self.target.prefix}/{rel}" if self.target.prefix else rel

    def ship_once(self) -> int:
        """Upload every complete sample now (oldest first) and delete it here; the number shipped."""
        if not self.dir.is_dir():
            return 0
        shipped = 0
        for record in sorted(self.dir.rglob("*" + RECORD), key=lambda p: p.name):
            if record.name.startswith("."):  # a file being written (served.payloads writes .name.tmp, then renames)
                continue
            try:
                image_name = json.loads(record.read_text()).get("image")
                image = record.parent / image_name if image_name else None
                files = [p for p in (image, record) if p is not None and p.is_file()]
                for p in files:
                    self.s3.upload_file(str(p), self.target.bucket, self.key(p))
                for p in files:
                    p.unlink(missing_ok=True)
                shipped += 1
            except FileNotFoundError:  # the sampler deleted it first (its bound): nothing to ship
                continue
            except Exception as e:  # the store is down or refuses: kept here, tried again next time
                self.failed += 1
                self.last_error = f"{type(e).__name__}: {e}"
                break
        self.shipped += shipped
        return shipped

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.ship_once()

    def close(self) -> str:
        """Stop the thread and ship what is left (after the server stopped: its models wrote their last)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
        self.ship_once()
        why = f", {self.failed} failed tries (last: {self.last_error})" if self.failed else ""
        return f"payload samples: {self.shipped} shipped to {self.url}{why}"


def download(url: str, dest: Path | str) -> int:
    """Every object under ``url`` into ``dest`` (its keys as paths under the prefix): the samples, ready for
    ``make relabel`` (training.relabel) and served.payloads.read_samples. The number of files."""
    target, s3 = object_store.parse(url), object_store.client(url)
    base = f"{target.prefix}/" if target.prefix else ""
    n = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=target.bucket, Prefix=base):
        for o in page.get("Contents", []):
            path = Path(dest) / o["Key"][len(base):]
            path.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(target.bucket, o["Key"], str(path))
            n += 1
    return n


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Payload samples in an object store")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="copy the samples under an s3:// prefix into a folder (for make relabel)")
    d.add_argument("url")
    d.add_argument("dest", type=Path)
    return p


def main(a: Any) -> int:
    n = download(a.url, a.dest)
    print(f"{n} files from {a.url} in {a.dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
