"""The model repository's settings, its manifest (``build.json``), and the TensorRT batch profile they imply.

Rendering (build.render_repo), the engine build (build.engine), the tuner and Model Analyzer (perf/)
all read the settings from here; the defaults and their help are written once, in :class:`RepoSettings`
(``python -m build.render_repo --help`` prints them).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from core.metadata import file_sha256
from core.preprocess import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS

MANIFEST = "build.json"  # what a repository was rendered from and with: read back by the tuner and the reports


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class RepoSettings:
    # Defaults measured here (2 cores, wrk at 16 connections, `make compare`): instances of one thread
    # each keep both cores busy without oversubscribing them, and a short batching delay lets them take
    # turns instead of moving all requests as one convoy. Triton 2.51's batcher can miss an instance's
    # release while all are busy and sleep 500 ms (docs/performance.md, "Throughput"): with two fused
    # instances that hit 3 of 6 rounds of 15 s, with three none of 6, for 4% less throughput.
    max_batch_size: int = _setting(32, "largest batch any model accepts (and the TensorRT profile's max)")
    queue_delay_us: int = _setting(200, "dynamic batcher: microseconds to wait to fill a batch")
    preferred_batch_sizes: tuple[int, ...] = _setting(
        (), "dynamic batcher: sizes to form without waiting (the largest is the TensorRT profile's opt)")
    preprocess_instances: int = _setting(2, "DALI preprocessing model instances")
    classifier_instances: int = _setting(3, "classifier model instances (fused layout: instances of its one model)")
    dali_threads: int = _setting(
        1, "DALI CPU threads per preprocessing instance (gpu target: the serving host's cores / instances)")
    intra_op_threads: int = _setting(1, "ONNX Runtime threads per classifier instance (0 = one per core)")
    top_k: int = _setting(5, "labels and scores returned per image")
    max_image_pixels: int = _setting(
        MAX_IMAGE_PIXELS, "images with more pixels are refused before decoding (GPU target: by the guard model)")
    max_image_bytes: int = _setting(
        MAX_IMAGE_BYTES, "larger encoded images are refused before decoding (GPU target: by the guard model)")
    # overload: each composing model queues at most this many requests; beyond it, and for a request
    # that waited longer than the timeout, Triton answers UNAVAILABLE (HTTP 503) instead of letting latency
    # grow without bound (0 = unbounded / no timeout). The timeout is what bounds latency; the count only
    # bounds memory, and is large: with a small one (64 before) every connection beyond it was refused at
    # once and resent at once, and refusing took the cores the work needed (perf/ab/flood.py measures it)
    max_queue_size: int = _setting(
        1024, "requests each composing model queues before answering UNAVAILABLE / 503 (0 = unbounded); "
              "keep it above the client connections you expect")
    queue_timeout_ms: int = _setting(5000, "a request queued longer is answered UNAVAILABLE / 503 (0 = no timeout)")
    served_metrics: int = _setting(
        1, "the Python models export their own Prometheus metrics (confidence, entropy, classes, inputs; 0 = off)")
    response_cache_mb: int = _setting(
        0, "Triton's response cache for repeated requests (the same image bytes again): its size in MiB (0 = off)")
    served_metrics_interval_ms: int = _setting(
        1000, "how often those metrics are handed to Triton (0 = after every batch, which costs throughput)")
    drift_window: int = _setting(
        500, "answers the drift score compares with the val split's (image_classifier_drift_psi; 0 = off)")
    # payload sampling (served/payloads.py): the fused layout's model records a share of its requests
    payload_percent: int = _setting(0, "percent of the answered requests recorded for retraining (0 = off)")
    payload_dir: str = _setting("", "folder the sampled requests are written to (on the server's machine)")
    payload_max_kb: int = _setting(262144, "the samples' folder is kept under this many KiB (oldest deleted)")
    payload_images: int = _setting(1, "record the images' bytes too (0 = records only: sha256, size, answers)")
    payload_upload: str = _setting(
        "", "an s3://[host:port/]bucket/prefix the server ships the samples to (serve/payload_shipper.py); "
            "payload_dir then only stages them")


@dataclass(frozen=True)
class BatchProfile:
    """A TensorRT optimization profile over the batch dimension."""

    min: int = 1
    opt: int = 16
    max: int = 32

    @classmethod
    def from_repo_settings(cls, max_batch_size: int, preferred: tuple[int, ...] = ()) -> BatchProfile:
        """opt = the largest preferred batch size (what the dynamic batcher aims for), else half the max."""
        opt = max(preferred) if preferred else max(1, max_batch_size // 2)
        return cls(1, min(opt, max_batch_size), max_batch_size)

    @classmethod
    def of(cls, s: RepoSettings) -> BatchProfile:
        return cls.from_repo_settings(s.max_batch_size, s.preferred_batch_sizes)


def read_manifest(repo: Path) -> dict[str, Any]:
    path = Path(repo) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: render the repository with `make repo` first")
    manifest: dict[str, Any] = json.loads(path.read_text())
    for key in ("onnx", "plan"):  # stored relative to the repository, so the two move together
        if manifest.get(key):
            manifest[key] = str((Path(repo).resolve() / manifest[key]).resolve())
    return manifest


def rendered_onnx(repo: Path) -> Path:
    """The ONNX file ``repo`` was rendered from, verified against the sha256 recorded at render time."""
    manifest = read_manifest(repo)
    onnx_path = Path(manifest["onnx"])
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{repo} was rendered from {onnx_path}, which no longer exists: run `make repo`")
    if file_sha256(onnx_path) != manifest["onnx_sha256"]:
        raise ValueError(f"{onnx_path} has changed since {repo} was rendered from it: run `make repo` again")
    return onnx_path


def settings_from_manifest(manifest: dict[str, Any]) -> RepoSettings:
    s = dict(manifest["settings"])
    s["preferred_batch_sizes"] = tuple(s.get("preferred_batch_sizes", ()))
    return RepoSettings(**s)


def add_settings_args(p: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """One --flag per RepoSettings field (or those in ``only``); unset flags stay None so repo_settings()
    can tell them apart."""
    g = p.add_argument_group("repository settings (given: pinned in the repository's deployment.yaml; default: "
                             "as that file pins it, else fitted or built-in)")
    defaults = RepoSettings()
    for f in fields(RepoSettings):
        if only is not None and f.name not in only:
            continue
        tuple_field = f.name == "preferred_batch_sizes"
        kind = str if isinstance(getattr(defaults, f.name), str) else int
        g.add_argument("--" + f.name.replace("_", "-"), type=kind, nargs="*" if tuple_field else None, default=None,
                       help=f"{f.metadata['help']} (built-in default {getattr(defaults, f.name)})")
    g.add_argument("--reset-settings", action="store_true",
                   help="make repo: unpin every value of the repository's deployment.yaml (fitted or default again); "
                        "the GPU tools: ignore the settings its build.json records")


def keeps_manifest(args: argparse.Namespace, repo: Path | None) -> bool:
    """Whether a render keeps what ``repo`` was last rendered (or tuned) with: it has a manifest and
    --reset-settings was not given."""
    return repo is not None and (Path(repo) / MANIFEST).is_file() and not getattr(args, "reset_settings", False)


def repo_settings(args: argparse.Namespace, repo: Path | None) -> RepoSettings:
    """Explicit flags win, then the settings ``repo`` was last rendered with (e.g. by `make tune`), then defaults.

    Re-rendering a repository (a new checkpoint, another precision) so keeps its tuned batching instead
    of silently resetting it.
    """
    base, source = RepoSettings(), "built-in defaults"
    if repo is not None and keeps_manifest(args, repo):
        base, source = settings_from_manifest(read_manifest(repo)), str(Path(repo) / MANIFEST)
    explicit = {f.name: getattr(args, f.name) for f in fields(RepoSettings) if getattr(args, f.name, None) is not None}
    if "preferred_batch_sizes" in explicit:
        explicit["preferred_batch_sizes"] = tuple(explicit["preferred_batch_sizes"])
    settings = replace(base, **explicit)
    kept = [f.name for f in fields(RepoSettings) if f.name not in explicit]
    if source != "built-in defaults" and kept:
        print(f"settings from {source}: " + ", ".join(f"{k}={getattr(settings, k)}" for k in kept) +
              " (override with flags, or --reset-settings / RESET_SETTINGS=1 for the defaults)")
    return settings
