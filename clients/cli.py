"""Command line: classify image files with the served ensemble.

    python -m clients data/synthetic/val --protocol grpc --batch-size 16 --async --json

Exit status: 0 every image answered; 3 some images refused as bad input (each named, the others
answered); 1 the server is unreachable or failed requests for its own reasons (overload after the
retries, an internal error, a dropped connection, no inference key); 2 no such files, an unusable key or
TLS file. The inference key comes from $TRITON_INFERENCE_KEY or its key file (clients.keys).
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from clients.client import DEFAULT_URLS, ImageClassifierClient, Prediction, ServerUnreachable, Tls
from clients.keys import UnusableKeyError
from core import protocol as P

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
PROGRESS_MIN_FILES = 32


def expand(paths: list[str]) -> list[Path]:
    """Files as given, directories searched recursively for images, globs expanded."""
    out: list[Path] = []
    for p in paths:
        matches = [Path(m) for m in sorted(glob.glob(p, recursive=True))] if glob.has_magic(p) else [Path(p)]
        if not matches:
            raise FileNotFoundError(f"no file matches {p!r}")
        for m in matches:
            if m.is_dir():
                out += sorted(f for f in m.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            elif m.is_file():
                out.append(m)
            else:
                raise FileNotFoundError(f"no such file or directory: {m}")
    return out


def format_table(preds: Sequence[Prediction], top_k: int) -> str:
    width = max([len(p.source) for p in preds] + [4])
    lines = [f"{'file':<{width}}  predictions"]
    for p in preds:
        body = (f"ERROR: {p.error}" if not p.ok else
                "  ".join(f"{lab} ({s:.3f})" for lab, s in zip(p.labels[:top_k], p.scores[:top_k], strict=True)))
        lines.append(f"{p.source:<{width}}  {body}")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clients", description="Classify images with the Triton ensemble")
    p.add_argument("paths", nargs="+", help="image files, directories (searched recursively) or globs")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--url", help=f"server address (default {DEFAULT_URLS['http']} for HTTP, "
                                 f"{DEFAULT_URLS['grpc']} for gRPC)")
    p.add_argument("--model", default=P.ENSEMBLE)
    p.add_argument("--batch-size", type=int, default=8, help="images per request")
    p.add_argument("--async", dest="use_async", action="store_true", help="send batches concurrently (asyncio)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight with --async")
    p.add_argument("--top-k", type=int, default=3, help="labels shown per image (at most the server's k)")
    p.add_argument("--json", action="store_true", help="one JSON object per image instead of a table")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--retries", type=int, default=4,
                   help="re-sends of a request the server refused as overloaded (503)")
    add_tls_arguments(p)
    p.add_argument("--metrics-file", type=Path,
                   help="write the served metrics of these answers here, in Prometheus' text format (for "
                        "node_exporter's textfile collector; clients/metrics.py)")
    p.add_argument("--drift-reference", type=Path,
                   help="with --metrics-file: the exported model.onnx (or a reference JSON) to score drift against")
    return p


def add_tls_arguments(p: argparse.ArgumentParser) -> None:
    """gRPC over TLS from the client's side: the options tls_options reads (perf.report takes them too)."""
    p.add_argument("--tls", action="store_true", help="gRPC over TLS (the server's certificate checked against "
                                                     "--tls-root-cert, else the system's CAs)")
    p.add_argument("--tls-root-cert", type=Path, help="PEM CA that signed the server's certificate (implies --tls)")
    p.add_argument("--tls-cert", type=Path, help="PEM client certificate chain, for mutual TLS")
    p.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")


def tls_options(args: argparse.Namespace) -> Tls | None:
    if args.tls or args.tls_root_cert or args.tls_cert or args.tls_key:
        return Tls(args.tls_root_cert, args.tls_cert, args.tls_key)
    return None


def main(args: argparse.Namespace) -> int:
    if args.drift_reference and not args.metrics_file:
        print("error: --drift-reference scores the answers' drift for --metrics-file: give that too", file=sys.stderr)
        return 2
    try:
        files = expand(args.paths)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not files:
        print("error: no images found (looked for .jpg, .jpeg, .png)", file=sys.stderr)
        return 2
    blobs, sources = [f.read_bytes() for f in files], [str(f) for f in files]
    try:  # the inference key (clients.keys), the TLS files and the drift reference
        metrics = None
        if args.metrics_file:  # prometheus_client only then: the GPU container's lock has no need of it otherwise
            from clients.metrics import ClientMetrics

            metrics = ClientMetrics.from_reference(args.drift_reference)
        client = ImageClassifierClient(args.url, args.protocol, args.model, timeout_s=args.timeout, top_k=args.top_k,
                                       retries=args.retries, tls=tls_options(args), metrics=metrics)
    except (UnusableKeyError, ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with client:
        try:
            client.check_ready()
        except ServerUnreachable as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        bar = None
        if len(files) >= PROGRESS_MIN_FILES and not args.no_progress:
            from tqdm import tqdm
            bar = tqdm(total=len(files), unit="img", file=sys.stderr)
        progress = bar.update if bar else None
        if args.use_async:
            preds = client.classify_async(blobs, sources, args.batch_size, args.concurrency, progress)
        else:
            preds = client.classify(blobs, sources, args.batch_size, progress)
        if bar:
            bar.close()
    if metrics is not None:
        metrics.write_textfile(args.metrics_file)
    if args.json:
        for p in preds:
            d = p.to_dict()
            d["labels"], d["scores"] = d["labels"][: args.top_k], d["scores"][: args.top_k]
            print(json.dumps(d))
    else:
        print(format_table(preds, args.top_k))
    failed = [p for p in preds if not p.ok]
    if failed:
        print(f"{len(failed)} of {len(preds)} images failed", file=sys.stderr)
    if any(not p.bad_input for p in failed):  # the server, the network or the load, not the images
        return 1
    return 3 if failed else 0
