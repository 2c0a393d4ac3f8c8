"""`make gpu-check`: the one check of the GPU path, on a machine with an NVIDIA GPU, in the NGC container.

1. the DALI pipeline on the GPU (mixed/nvJPEG decode) against the CPU pipeline, same definition; and the
   pixels the served preprocess model returns (the server's own DALI backend, its decoder and settings),
   queried through Triton, against the CPU pipeline, on photo variants (4:2:0, 4:2:2 and 4:4:4 chroma,
   progressive, EXIF orientations, PNGs: training.photo_variants);
2. FP16 and INT8 TensorRT engines from the ONNX artifacts (build.engine), each stamped;
3. each engine scored like the ONNX artifacts in the build report (build.quantize): top-1 on the val
   split, top-1 agreement and max logit difference against PyTorch, latency at batch 1 and the best
   batch, and the same accuracy gate (top-1 at most --max-top1-drop points below FP32);
4. for each engine: the GPU repository (DALI backend -> TensorRT plan -> postprocess) served by the
   container's tritonserver, every val image classified over gRPC, compared with PyTorch;
5. for each engine, the served throughput from JPEG bytes (the ensemble) and from pre-decoded tensors
   (the TensorRT model alone) at several concurrencies, with perf_analyzer;
6. a report: artifacts/gpu_check/report.{json,md}.

Without a GPU or TensorRT it stops at once and says what is missing (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from build.engine import EngineBuilder, EngineEnvironmentError, PlanStamp, check_environment, check_plan
from build.gate import accuracy
from build.render_repo import fit_to_host, render
from build.settings import BatchProfile, RepoSettings, add_settings_args, keeps_manifest, repo_settings
from clients.client import ImageClassifierClient, Prediction, image_input, triton_modules
from core import protocol as P
from core.atomic_io import atomic_write_bytes
from core.metadata import ArtifactMetadata, read_metadata, source_checkpoint
from core.preprocess import DALI_INPUT_NAME, DaliPreprocessor, PreprocessSpec, build_dali_pipeline, decode_image
from core.runners import TrtRunner, latency
from perf.load.perf_analyzer import Sources, jpeg_and_tensor_inputs, jpegs_and_tensors
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.data import image_files, list_images
from training.evaluate import DEFAULT_MAX_TOP1_DROP, logits_for_files, stream_logits
from training.photo_variants import variants

CONTAINER_TRITON = Path("/opt/tritonserver/bin/tritonserver")


def dali_gpu_vs_cpu(spec: PreprocessSpec, files: list[Path], batch: int = 32) -> dict:
    """The GPU pipeline (nvJPEG) against the CPU one on the same images; also on zero-padded rows, which is
    how the DALI backend receives a multi-image request (the CPU target strips padding in Python)."""
    blobs = [f.read_bytes() for f in files[:batch]]
    pipe = build_dali_pipeline(spec, batch, device="gpu", build=True)

    def run_gpu(rows: list[bytes]) -> np.ndarray:
        pipe.feed_input(DALI_INPUT_NAME, [np.frombuffer(b, np.uint8) for b in rows])
        (out,) = pipe.run()
        return out.as_cpu().as_array()

    gpu = run_gpu(blobs)
    longest = max(len(b) for b in blobs)
    padded = run_gpu([b + b"\x00" * (longest - len(b)) for b in blobs])
    cpu = DaliPreprocessor(spec, batch_size=batch)(blobs)
    # nvJPEG and libjpeg-turbo may round differently; report how far apart they are
    return {"images": len(blobs), "max_abs_diff": float(np.abs(gpu - cpu).max()),
            "mean_abs_diff": float(np.abs(gpu - cpu).mean()),
            "padding_changes_output": bool(not np.array_equal(gpu, padded))}


# the served preprocess model's pixels may differ from the CPU pipeline's by decoder rounding (nvJPEG's chroma
# upsampling, the hardware decoder's IDCT), not by a picture: at most this many 8-bit levels on average
MAX_SERVED_MEAN_LEVELS = 1.0


def decoder_photos(files: Sequence[Path], n: int = 2) -> dict[str, bytes]:
    """Every encoding variant (training.photo_variants) of the first ``n`` images, by "stem/variant"."""
    out = {}
    for f in files[:n]:
        upright = decode_image(f.read_bytes())
        out.update({f"{f.stem}/{name}": data for name, data in variants(upright, large=False).items()})
    return out


def served_pixels(url: str, protocol: str, blobs: Sequence[bytes], model: str = P.PREPROCESS,
                  timeout_s: float = 60.0) -> list[np.ndarray]:
    """The pixels ``model`` (the repository's preprocess model) returns for each encoded image, one request
    each, through the running server: what its decoder, resize and normalize compute."""
    mod, _ = triton_modules(protocol)
    kw = {"network_timeout": timeout_s, "connection_timeout": timeout_s} if protocol == "http" else {}
    call_kw = {"client_timeout": timeout_s} if protocol == "grpc" else {}
    client = mod.InferenceServerClient(url, **kw)
    try:
        return [client.infer(model, [image_input(mod, [b])], outputs=[mod.InferRequestedOutput(P.PIXELS)],
                             **call_kw).as_numpy(P.PIXELS)[0] for b in blobs]
    finally:
        client.close()


def served_preprocess_vs_cpu(url: str, protocol: str, spec: PreprocessSpec, photos: dict[str, bytes]) -> dict:
    """The served preprocess model against the CPU pipeline on ``photos``, per photo: the largest and the
    mean difference in 8-bit levels (the normalized difference times std times 255, per channel)."""
    served = served_pixels(url, protocol, list(photos.values()))
    cpu = DaliPreprocessor(spec, batch_size=1)(list(photos.values()))
    axis = 0 if spec.layout == "CHW" else -1
    shape = [1, 1, 1]
    shape[axis] = 3
    scale = np.asarray(spec.std, np.float64).reshape(shape) * 255.0
    rows: dict[str, dict[str, float]] = {}
    for (name, _), s, c in zip(photos.items(), served, cpu, strict=True):
        if s.shape != c.shape:  # another crop size or layout than the spec's: nothing compares
            rows[name] = {"max_levels": float("inf"), "mean_levels": float("inf")}
            continue
        levels = np.abs(s.astype(np.float64) - c.astype(np.float64)) * scale
        rows[name] = {"max_levels": float(levels.max()), "mean_levels": float(levels.mean())}
    worst = max(rows, key=lambda k: rows[k]["mean_levels"])
    return {"images": len(rows), "photos": rows, "worst": worst,
            "max_levels": max(r["max_levels"] for r in rows.values()),
            "worst_mean_levels": rows[worst]["mean_levels"]}


def served_decoder_problems(check: dict, limit: float = MAX_SERVED_MEAN_LEVELS) -> list[str]:
    """The photos whose served pixels are further from the CPU pipeline's than decoder rounding explains."""
    return [f"served preprocess differs from the CPU pipeline on {name}: mean {r['mean_levels']:.2f} levels "
            f"(max {r['max_levels']:.1f}; allowed mean {limit})"
            for name, r in check["photos"].items() if not r["mean_levels"] <= limit]


@dataclass(frozen=True)
class Reference:
    """What every engine is checked against: the val split, its preprocess, the batching settings and
    PyTorch FP32 on the same images."""

    meta: ArtifactMetadata
    spec: PreprocessSpec
    val: list[Path]
    labels: np.ndarray
    settings: RepoSettings
    profile: BatchProfile
    pre: DaliPreprocessor
    sample: np.ndarray  # the first batch, for the engine latencies
    logits: np.ndarray  # PyTorch FP32 over the val split

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(1)


def load_reference(args: argparse.Namespace) -> Reference:
    """The val split, streamed through the serving preprocess, and PyTorch FP32's logits over it."""
    meta = read_metadata(args.artifacts / "model.onnx")
    spec = meta.preprocess
    items = list_images(args.data / "val", meta.classes)
    val, labels = [p for p, _ in items], np.array([y for _, y in items])
    settings = repo_settings(args, args.repo)
    if not keeps_manifest(args, args.repo):  # as `make repo TARGET=gpu` sizes them: for this host
        given = frozenset(f.name for f in fields(RepoSettings) if getattr(args, f.name, None) is not None)
        settings = fit_to_host(settings, os.cpu_count() or 1, keep=given)
    profile = BatchProfile.from_repo_settings(settings.max_batch_size, settings.preferred_batch_sizes)
    pre = DaliPreprocessor(spec, batch_size=profile.max)  # the val split is streamed: any size fits in memory
    sample = next(pre.iter_files(val[:profile.max]))
    torch_model = model_from_checkpoint(load_checkpoint(source_checkpoint(args.artifacts / "model.onnx", meta)))
    logits = logits_for_files(torch_model, pre, val)
    return Reference(meta, spec, val, labels, settings, profile, pre, sample, logits)


@dataclass(frozen=True)
class CheckRun:
    """One `make gpu-check`: its arguments, the reference, where it writes, and what every engine shares."""

    args: argparse.Namespace
    ref: Reference
    out: Path
    tensorrt_version: str
    cc: str
    fp32_top1: float
    binary: Path  # the tritonserver that serves every engine
    perf_inputs: Sources  # the same perf_analyzer payload for every engine
    photos: dict[str, bytes]  # the encoding variants the served preprocess model is checked on


def start_run(args: argparse.Namespace, ref: Reference, out: Path, tensorrt_version: str, cc: str,
              fp32_top1: float) -> CheckRun:
    binary = CONTAINER_TRITON if CONTAINER_TRITON.exists() else Path(shutil.which("tritonserver") or CONTAINER_TRITON)
    blobs = [p.read_bytes() for p in ref.val[:args.perf_images]]  # the same payload for every engine
    perf_inputs = jpeg_and_tensor_inputs(ref.meta.export.input, blobs, ref.pre(blobs), out / "perf_inputs")
    photo_files = image_files(args.photos) if args.photos else ref.val
    return CheckRun(args, ref, out, tensorrt_version, cc, fp32_top1, binary, perf_inputs,
                    decoder_photos(photo_files, args.decoder_photos))


def build_engine(run: CheckRun, precision: str) -> tuple[Path, Path, PlanStamp]:
    """(source ONNX, plan, its stamp): the engine built from the ONNX artifact, checked for this GPU."""
    artifacts = run.args.artifacts
    onnx_path = artifacts / f"model_{precision}.onnx"
    plan = artifacts / f"model_{precision}.plan"
    stamp = EngineBuilder(onnx_path, run.ref.profile, precision, timing_cache=artifacts / "trt_timing.cache") \
        .check_environment().parse().configure().build(plan)
    # in a Triton install, EngineBuilder.check_environment has refused bindings other than the server's TensorRT
    check_plan(Path(f"{plan}.json"), run.tensorrt_version, run.cc)
    return onnx_path, plan, stamp


def score_engine(plan: Path, precision: str, ref: Reference) -> dict:
    """The engine scored like the ONNX artifacts in the build report (build.quantize)."""
    engine = TrtRunner(plan)
    engine_logits = stream_logits({precision: engine}, ref.pre.iter_files(ref.val))[precision]
    return {**accuracy(engine_logits, ref.labels, ref.logits),
            "size_bytes": plan.stat().st_size,
            "latency": latency(engine, ref.sample, batches=sorted({1, ref.profile.opt, ref.profile.max}))}


def serve_engine(run: CheckRun, onnx_path: Path, plan: Path,
                 precision: str) -> tuple[list[Prediction], list[dict], dict]:
    """The GPU repository for the plan, served: every val image classified over gRPC, the served preprocess
    model's pixels against the CPU pipeline, then the served throughput from JPEG bytes and from tensors.
    Returns (predictions, throughput rows, the preprocess check)."""
    from serve.server import TritonServer

    ref, out = run.ref, run.out
    repo = out / f"repo_{precision}"
    render(onnx_path, repo, ref.settings, target="gpu", plan=plan)
    with TritonServer(repo, None, log_file=out / f"tritonserver_{precision}.log", binary=run.binary) as s:
        with ImageClassifierClient(s.grpc_url, "grpc") as c:
            preds = c.classify_files(ref.val, batch_size=ref.settings.max_batch_size)
        decoder = served_preprocess_vs_cpu(s.grpc_url, "grpc", ref.spec, run.photos)
        if s.proc is None:
            raise RuntimeError("tritonserver is not running")
        throughput = jpegs_and_tensors(s.grpc_url, s.http_url, "grpc", run.perf_inputs, run.args.concurrency,
                                       out / f"perf_{precision}", s.proc.pid)
    return preds, throughput, decoder


def check_engine(run: CheckRun, precision: str) -> dict:
    """Build, score and serve one engine: its entry in the report."""
    onnx_path, plan, stamp = build_engine(run, precision)
    scored = score_engine(plan, precision, run.ref)
    preds, throughput, decoder = serve_engine(run, onnx_path, plan, precision)
    served = np.array([run.ref.meta.classes.index(p.labels[0]) if p.ok else -1 for p in preds])
    entry = {"stamp": stamp.__dict__, "images": len(run.ref.val), "engine": scored,
             "gate": "pass" if scored["top1"] >= run.fp32_top1 - run.args.max_top1_drop else "FAIL",
             "served_agreement_with_pytorch": float(100 * np.mean(served == run.ref.predictions)),
             "errors": sum(not p.ok for p in preds), "throughput": throughput,
             "served_preprocess_vs_cpu": decoder,
             "host_side": host_side(throughput, run.ref.settings, os.cpu_count() or 1)}
    print(f"{precision}: engine top-1 {scored['top1']:.2f}% (PyTorch FP32 {run.fp32_top1:.2f}%, gate {entry['gate']}), "
          f"{scored['latency']['best_images_per_s']:.0f} img/s at batch {scored['latency']['best_batch']}; "
          f"served agreement with PyTorch {entry['served_agreement_with_pytorch']:.2f}%; served preprocess vs CPU: "
          f"worst mean {decoder['worst_mean_levels']:.2f} levels ({decoder['worst']}), max {decoder['max_levels']:.1f}")
    return entry


def host_side(throughput: list[dict], settings: RepoSettings, cores: int) -> dict:
    """The JPEG path's best throughput against the tensor path's (the classifier alone): well below 1, the
    host side of preprocessing (DALI's threads: nvJPEG's Huffman decoding, PNG, the peek; the guard) is what
    limits the server, not the GPU."""
    best = {source: max((r["images_per_s"] for r in throughput if r["source"] == source), default=0.0)
            for source in ("jpeg", "tensors")}
    return {"jpeg_images_per_s": best["jpeg"], "tensors_images_per_s": best["tensors"],
            "jpeg_over_tensors": best["jpeg"] / best["tensors"] if best["tensors"] else None,
            "dali_threads": settings.dali_threads, "dali_instances": settings.preprocess_instances,
            "host_cores": cores}


def host_side_line(name: str, h: dict) -> str:
    ratio = "n/a" if h["jpeg_over_tensors"] is None else f"{h['jpeg_over_tensors']:.2f}"
    return (f"- {name}: JPEG path {h['jpeg_images_per_s']:.0f} img/s at its best concurrency, {ratio} of the tensor "
            f"path's {h['tensors_images_per_s']:.0f} (DALI {h['dali_threads']} threads x {h['dali_instances']} "
            f"instances on {h['host_cores']} cores)")


def engine_row(name: str, entry: dict) -> str:
    e, lat = entry["engine"], entry["engine"]["latency"]
    return (f"| {name} | {e['size_bytes'] / 2 ** 20:.2f} MiB | {e['top1']:.2f} | {e['agreement_with_pytorch']:.2f} | "
            f"{e['max_abs_logit_diff']:.3g} | {lat['batch1_ms']:.2f} | {lat['best_batch']} | "
            f"{lat['best_images_per_s']:.0f} | {entry['gate']} | {entry['served_agreement_with_pytorch']:.2f} | "
            f"{entry['errors']} |")


def throughput_row(name: str, r: dict) -> str:
    return (f"| {name} | {r['source']} | {r['concurrency']} | {r['images_per_s']:.0f} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} |")


def markdown(report: dict, val_images: int) -> str:
    dali = report["dali_gpu_vs_cpu"]
    lines = [f"# GPU check: {report['gpu']} (compute capability {report['compute_capability']}), "
             f"TensorRT {report['tensorrt']}", "",
             f"DALI GPU vs CPU preprocessing on {dali['images']} images: max |diff| {dali['max_abs_diff']:.4f}, "
             f"mean {dali['mean_abs_diff']:.5f}; zero-padded rows "
             f"{'CHANGE' if dali['padding_changes_output'] else 'do not change'} the GPU output", "",
             f"PyTorch FP32 top-1 on {val_images} val images: {report['pytorch_fp32_top1']:.2f}%; "
             f"gate: at most {report['max_top1_drop']} points below.", "",
             "| engine | size | top-1 % | agreement with PyTorch % | max logit diff | ms at batch 1 | best batch | "
             "img/s at best | gate | served via Triton: agreement % | errors |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [engine_row(k, v) for k, v in report["engines"].items()]
    lines += ["", "The served preprocess model (the server's DALI backend, queried through Triton) against the CPU "
              "pipeline, in 8-bit levels, per photo variant:", "",
              "| engine's server | photo | mean levels | max levels |", "| --- | --- | --- | --- |"]
    lines += [f"| {k} | {name} | {r['mean_levels']:.2f} | {r['max_levels']:.1f} |"
              for k, v in report["engines"].items() for name, r in v["served_preprocess_vs_cpu"]["photos"].items()]
    lines += ["", "Engine latencies include host<->device copies (TensorRT Python API, one stream).", "",
              "Served throughput (perf_analyzer over gRPC, alternating per concurrency): `jpeg` = JPEG bytes "
              "through the ensemble (DALI decode + resize on the GPU, TensorRT), `tensors` = pre-decoded inputs "
              "to the TensorRT model alone.", "",
              "| engine | input | concurrency | img/s | p50 ms | p99 ms |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [throughput_row(k, r) for k, v in report["engines"].items() for r in v["throughput"]]
    lines += ["", "The host side: the JPEG path's best throughput over the tensor path's (well below 1: preprocessing "
              "on the host limits the server; raise DALI_THREADS, or HOST_CORES for another host):", ""]
    lines += [host_side_line(k, v["host_side"]) for k, v in report["engines"].items() if "host_side" in v]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    try:
        trt, cc, gpu_name = check_environment()
    except EngineEnvironmentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.artifacts / "gpu_check"
    out.mkdir(parents=True, exist_ok=True)
    ref = load_reference(args)
    fp32_top1 = float(100 * np.mean(ref.predictions == ref.labels))
    report = {"gpu": gpu_name, "compute_capability": cc, "tensorrt": trt.__version__, "pytorch_fp32_top1": fp32_top1,
              "max_top1_drop": args.max_top1_drop, "dali_gpu_vs_cpu": dali_gpu_vs_cpu(ref.spec, ref.val),
              "engines": {}}
    run = start_run(args, ref, out, trt.__version__, cc, fp32_top1)
    for precision in ("fp16", "int8"):
        report["engines"][precision] = check_engine(run, precision)
    atomic_write_bytes(out / "report.json", lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    atomic_write_bytes(out / "report.md", lambda tmp: tmp.write_text(markdown(report, len(ref.val))))
    print(f"wrote {out / 'report.md'}")
    problems = verdict(report, args.min_served_agreement)
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if problems else 0


def verdict(report: dict, min_served_agreement: float) -> list[str]:
    """What fails the check, one line each (nothing: it passed)."""
    problems = []
    if report["dali_gpu_vs_cpu"]["padding_changes_output"]:
        problems.append("zero-padded rows change the GPU pipeline's output (the DALI backend receives padded rows)")
    for name, e in report["engines"].items():
        if e["gate"] != "pass":
            problems.append(f"{name}: top-1 {e['engine']['top1']:.2f}% is more than {report['max_top1_drop']} points "
                            f"below PyTorch FP32 ({report['pytorch_fp32_top1']:.2f}%)")
        if e["served_agreement_with_pytorch"] < min_served_agreement:
            problems.append(f"{name}: served predictions agree with PyTorch on "
                            f"{e['served_agreement_with_pytorch']:.2f}% of {e['images']} images, "
                            f"below {min_served_agreement}%")
        if e["errors"]:
            problems.append(f"{name}: {e['errors']} request(s) failed")
        problems += [f"{name}: {p}" for p in served_decoder_problems(e["served_preprocess_vs_cpu"])]
    return problems


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Build engines, serve the GPU repository, check fidelity (GPU only)")
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    p.add_argument("--data", type=Path, default=Path("data/synthetic"))
    p.add_argument("--repo", type=Path, default=Path("model_repository_gpu"),
                   help="take batching settings from this repository's build.json, if it exists")
    p.add_argument("--max-top1-drop", type=float, default=DEFAULT_MAX_TOP1_DROP,
                   help="accuracy gate, as in `make quantize`")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64],
                   help="perf_analyzer concurrencies for the served throughput table")
    p.add_argument("--perf-images", type=int, default=64, help="val images perf_analyzer cycles through")
    p.add_argument("--photos", type=Path, help="photos whose encoding variants check the served decoder "
                                               "(default: the val split; give real photos, e.g. data/photos/val)")
    p.add_argument("--decoder-photos", type=int, default=3, help="how many of them")
    p.add_argument("--min-served-agreement", type=float, default=99.0,
                   help="percent of val images the served engine must classify as PyTorch does; on a small split "
                   "one image is 100/N points, so allow at least that")
    add_settings_args(p)
    return p


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
