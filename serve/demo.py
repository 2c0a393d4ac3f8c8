"""`make demo`'s last stage: start Triton on the repository, classify sample images over HTTP (sync)
and gRPC (async) with the project's client, print the predictions, stop the server."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clients.cli import format_table
from clients.client import ImageClassifierClient
from serve.server import PROJECT_ROOT, Ports, ServerError, TritonServer


def sample_images(val_dir: Path, per_class: int) -> list[Path]:
    return [f for d in sorted(p for p in val_dir.iterdir() if p.is_dir()) for f in sorted(d.glob("*.jp*g"))[:per_class]]


def main(args: argparse.Namespace) -> int:
    files = sample_images(args.images, args.per_class)
    if not files:
        print(f"error: no JPEGs under {args.images}/<class>/", file=sys.stderr)
        return 2
    try:
        server = TritonServer(args.repo, Ports(args.http_port, args.grpc_port, args.metrics_port),
                              log_file=PROJECT_ROOT / ".cache" / "triton-demo.log").start()
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        blobs, sources = [f.read_bytes() for f in files], [str(f) for f in files]
        with ImageClassifierClient(server.http_url, "http") as c:
            http_preds = c.classify(blobs, sources, batch_size=8)
        with ImageClassifierClient(server.grpc_url, "grpc") as c:
            grpc_preds = c.classify_async(blobs, sources, batch_size=4, concurrency=4)
    finally:
        server.stop()
    print(format_table(http_preds, top_k=3))
    correct = sum(p.ok and p.labels[0] == Path(p.source).parent.name for p in http_preds)
    same = sum(a.labels[:1] == b.labels[:1] for a, b in zip(http_preds, grpc_preds, strict=True))
    print(f"\n{correct}/{len(files)} correct (class = folder name) over HTTP; "
          f"gRPC async agrees on {same}/{len(files)}")
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Serve the repository and classify sample images")
    p.add_argument("--repo", type=Path, default=PROJECT_ROOT / "model_repository")
    p.add_argument("--images", type=Path, required=True, help="an ImageFolder split, e.g. data/synthetic/val")
    p.add_argument("--per-class", type=int, default=2)
    p.add_argument("--http-port", type=int, default=Ports.http)
    p.add_argument("--grpc-port", type=int, default=Ports.grpc)
    p.add_argument("--metrics-port", type=int, default=Ports.metrics)
    return p


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
