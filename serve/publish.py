"""Live model updates: publish a new ONNX as the served model's next version, or roll back, while serving.

    python -m serve.publish --onnx artifacts/model.onnx --repo model_repository --data data/synthetic
    python -m serve.publish --rollback --repo model_repository

How (explicit model control, `make serve`'s default): the new file is checked first (it loads in ONNX
Runtime, it has the served model's classes, preprocessing and tensors, and its val top-1 is within
``--max-top1-drop`` of the version being served, through the serving preprocess). It is then written
into a hidden staging folder of the model that runs it (``classify/`` in the fused layout, ``classifier/``
in the ensemble layouts), with the rest of the served version folder (its code, pipeline, labels), and
renamed to the next version number in one step, so Triton never sees a half-written version and a
served version is never rewritten in place. Then the server is asked (with the admin key) to load that
model: Triton loads the new version while the old one keeps serving, and swaps (``version_policy``
latest 1: requests without a version go to the newest READY one). A version that fails to load is
moved aside and the old one keeps serving.

Rollback moves the newest version folder aside (``<model>/.retired-<n>``, kept for inspection) and
asks the server to load again: the previous version comes back the same way. With no server running
(``--url ''``) the repository is changed and the next `make serve` serves it.

The embedded target only: a GPU repository's classifier is a TensorRT plan (`make engine` + `make repo`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from build import layouts
from build.settings import MANIFEST, read_manifest
from clients import admin
from clients.client import error_message
from clients.keys import ADMIN, UnusableKeyError
from core.atomic_io import atomic_write_bytes
from core.metadata import ArtifactMetadata, file_sha256, read_metadata
from core.preprocess import DaliPreprocessor
from core.runners import OrtRunner, Runner
from training.data import list_images
from training.evaluate import DEFAULT_MAX_TOP1_DROP, stream_logits, topk_accuracy

MODEL_FILE = "model.onnx"


class PublishError(RuntimeError):
    pass


def versions(model_dir: Path) -> list[int]:
    """The numeric version folders Triton sees, ascending (hidden staging/retired folders are not)."""
    return sorted(int(p.name) for p in Path(model_dir).iterdir() if p.is_dir() and p.name.isdigit())


def onnx_model_dir(repo: Path) -> Path:
    """The folder of the model whose versions hold the ONNX, as the repository was rendered (its layout)."""
    return Path(repo) / layouts.of_manifest(read_manifest(repo)).onnx_model


def served_onnx(repo: Path) -> Path:
    model_dir = onnx_model_dir(repo)
    vs = versions(model_dir)
    if not vs:
        raise PublishError(f"{model_dir} has no version folder: render the repository with `make repo`")
    return model_dir / str(vs[-1]) / MODEL_FILE


def check_compatible(new: ArtifactMetadata, served: ArtifactMetadata) -> None:
    """The rest of the ensemble (preprocess, labels, tensor names) stays as rendered: the new model must
    expect the same input and produce the same classes."""
    for differs, what in ((new.classes != served.classes, "class names"),
                          (new.preprocess != served.preprocess, "preprocessing")):
        if differs:
            raise PublishError(f"the new model's {what} differ from the served model's: a live update only swaps "
                               "the classifier; render the repository again (`make repo`) and restart the server")
    for key in ("input", "output", "probabilities"):
        if getattr(new.export, key) != getattr(served.export, key):
            raise PublishError(f"the new model's ONNX {key} tensor is {getattr(new.export, key)!r}, the served "
                               f"one's {getattr(served.export, key)!r}: export it with the same `make onnx`")


def top1(runners: dict[str, Runner], meta: ArtifactMetadata, data: Path) -> dict[str, float]:
    """val top-1 of each model, through the serving preprocess (one decode per batch for all)."""
    val = list_images(Path(data) / "val", meta.classes)
    if not val:
        raise PublishError(f"no val images under {data}/val for the accuracy check")
    labels = np.array([y for _, y in val])
    pre = DaliPreprocessor(meta.preprocess, batch_size=32)
    logits = stream_logits(runners, pre.iter_files([p for p, _ in val]))
    return {name: topk_accuracy(lg, labels, (1,))["top1"] for name, lg in logits.items()}


def precheck(onnx_path: Path, repo: Path, data: Path | None, max_top1_drop: float) -> dict:
    """Everything that can be refused before the server sees the file; returns the figures."""
    current = served_onnx(repo)
    try:
        meta = read_metadata(onnx_path)
        new = OrtRunner(Path(onnx_path).read_bytes())  # the ONNX Runtime session is the load check
    except Exception as e:
        raise PublishError(f"{onnx_path} is not a loadable exported model: {str(e).strip()[:500]}") from None
    check_compatible(meta, read_metadata(current))
    if data is None:
        return {"gate": "skipped (no --data)"}
    acc = top1({"new": new, "served": OrtRunner(current.read_bytes())}, meta, data)
    result = {"top1_new": acc["new"], "top1_served": acc["served"], "max_top1_drop": max_top1_drop}
    if acc["new"] < acc["served"] - max_top1_drop:
        raise PublishError(f"accuracy gate: the new model's val top-1 is {acc['new']:.2f}%, the served one's "
                           f"{acc['served']:.2f}% (at most {max_top1_drop} points lower is allowed); not published")
    return result


def _record(repo: Path, entry: dict) -> None:
    """Append to the manifest's history of published and retired versions (written atomically)."""
    path = Path(repo) / MANIFEST
    raw = json.loads(path.read_text())
    raw.setdefault("versions", []).append(entry)
    atomic_write_bytes(path, lambda tmp: tmp.write_text(json.dumps(raw, indent=2)))


def _load(url: str, protocol: str, key: str | None, model: str, version: int, timeout_s: float) -> None:
    """Ask the server to load ``model`` and check that ``version`` is the one READY."""
    with admin.AdminClient(url, protocol, key, timeout_s) as c:
        try:
            c.load(model)  # returns when Triton has loaded (or failed to load) the new version
        except Exception as e:
            raise PublishError(f"the server did not load version {version}: {error_message(e)}") from None
        if not c.ready(model, str(version)):
            raise PublishError(f"the server reports version {version} of '{model}' not ready")


def publish(onnx_path: Path, repo: Path, data: Path | None = None, url: str | None = "127.0.0.1:8000",
            protocol: str = "http", key: str | None = None, max_top1_drop: float = DEFAULT_MAX_TOP1_DROP,
            check: bool = True, timeout_s: float = 300.0) -> dict:
    """Publish ``onnx_path`` as the next classifier version; returns what was done. ``check=False`` skips
    the pre-checks (the server's own load is then the only check)."""
    repo = Path(repo)
    manifest = read_manifest(repo)
    if manifest.get("target") != "embedded":
        raise PublishError(f"{repo} is a {manifest.get('target')} repository: live updates swap an ONNX classifier "
                           "(embedded target); for TensorRT rebuild the engine and render again")
    figures = precheck(Path(onnx_path), repo, data, max_top1_drop) if check else {"gate": "skipped"}
    model_dir = onnx_model_dir(repo)
    version = versions(model_dir)[-1] + 1
    staging = model_dir / f".staging-{version}"
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted publish
    # the version folder holds the Python-backend code too (model.py): taken from the served version
    shutil.copytree(served_onnx(repo).parent, staging, ignore=shutil.ignore_patterns(MODEL_FILE, "__pycache__"))
    shutil.copyfile(onnx_path, staging / MODEL_FILE)
    for f in sorted(p for p in staging.rglob("*") if p.is_file()):  # the served package's files too
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    os.rename(staging, model_dir / str(version))  # atomic: Triton sees the whole version or none
    entry = {"version": version, "onnx_sha256": file_sha256(onnx_path), "source": str(Path(onnx_path).resolve()),
             "published": time.strftime("%Y-%m-%dT%H:%M:%S"), **figures}
    if url:
        try:
            _load(url, protocol, key, model_dir.name, version, timeout_s)
        except PublishError:
            os.rename(model_dir / str(version), model_dir / f".rejected-{version}-{int(time.time())}")
            raise
    _record(repo, entry)
    return entry


def rollback(repo: Path, url: str | None = "127.0.0.1:8000", protocol: str = "http", key: str | None = None,
             timeout_s: float = 300.0) -> dict:
    """Retire the newest classifier version; the previous one is served again."""
    model_dir = onnx_model_dir(repo)
    vs = versions(model_dir)
    if len(vs) < 2:
        raise PublishError(f"{model_dir} has {len(vs)} version(s): nothing to roll back to")
    newest, previous = vs[-1], vs[-2]
    retired = model_dir / f".retired-{newest}-{int(time.time())}"
    os.rename(model_dir / str(newest), retired)
    if url:
        try:
            _load(url, protocol, key, model_dir.name, previous, timeout_s)
        except PublishError:
            os.rename(retired, model_dir / str(newest))  # the server still serves the newest: keep them in step
            raise
    entry = {"version": previous, "rolled_back_from": newest, "retired_to": retired.name,
             "published": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _record(repo, entry)
    return entry


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Publish a new classifier version to a served repository, or roll back")
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--onnx", type=Path, help="the new model (exported by build.export_onnx / build.quantize)")
    p.add_argument("--rollback", action="store_true", help="retire the newest version; the previous one is served")
    p.add_argument("--data", type=Path, help="ImageFolder root whose val split gates accuracy (omit: no gate)")
    p.add_argument("--max-top1-drop", type=float, default=DEFAULT_MAX_TOP1_DROP)
    p.add_argument("--url", default="127.0.0.1:8000", help="the running server ('' = only change the repository)")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for the server to load the version")
    return p


def main(args: argparse.Namespace) -> int:
    if bool(args.onnx) == args.rollback:
        print("error: give --onnx FILE to publish, or --rollback", file=sys.stderr)
        return 2
    try:
        key = ADMIN.load()
        if args.rollback:
            r = rollback(args.repo, args.url or None, args.protocol, key, args.timeout)
            print(f"rolled back: version {r['rolled_back_from']} retired ({r['retired_to']}), "
                  f"version {r['version']} served")
        else:
            r = publish(args.onnx, args.repo, args.data, args.url or None, args.protocol, key, args.max_top1_drop,
                        timeout_s=args.timeout)
            print(f"published {args.onnx} as {onnx_model_dir(args.repo).name} version {r['version']}" +
                  (f" (val top-1 {r['top1_new']:.2f}%, served {r['top1_served']:.2f}%)" if "top1_new" in r else ""))
    except (PublishError, UnusableKeyError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
