"""`make gpu-check`: the one check of the GPU path, on a machine with an NVIDIA GPU, in the NGC container.

1. the DALI pipeline on the GPU (mixed/nvJPEG decode) against the CPU pipeline, same definition;
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
import shutil
import sys
from pathlib import Path

import numpy as np

from build.engine import EngineBuilder, EngineEnvironmentError, check_environment, check_plan
from build.quantize import accuracy, latency
from build.render_repo import render
from build.settings import BatchProfile, add_settings_args, repo_settings
from clients.client import ImageClassifierClient
from core.atomic_io import atomic_write_bytes
from core.metadata import read_metadata, source_checkpoint
from core.preprocess import DALI_INPUT_NAME, DaliPreprocessor, PreprocessSpec, build_dali_pipeline
from core.runners import TrtRunner
from perf.perf_analyzer import jpeg_and_tensor_inputs, jpegs_and_tensors
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.data import list_images
from training.evaluate import DEFAULT_MAX_TOP1_DROP, logits_for_files, stream_logits

CONTAINER_TRITON = Path("/opt/tritonserver/bin/tritonserver")


def dali_gpu_vs_cpu(spec: PreprocessSpec, files: list[Path], batch: int = 32) -> dict:
    """The GPU pipeline (nvJPEG) against the CPU one on the same images; also on zero-padded rows, which is
    how the DALI backend receives a multi-image request (the CPU target strips padding in Python)."""
    blobs = [f.read_bytes() for f in files[:batch]]
    pipe = build_dali_pipeline(spec, batch, device="gpu")
    pipe.build()

    def run_gpu(rows: list[bytes]) -> np.ndarray:
        pipe.feed_input(DALI_INPUT_NAME, [np.frombuffer(b, np.uint8) for b in rows])
        (out,) = pipe.run()
        return out.as_cpu().as_array()

    gpu = run_gpu(blobs)
    longest = max(len(b) for b in blobs)
    padded = run_gpu([b + b"\x00" * (longest - len(b)) for b in blobs])
    cpu = DaliPreprocessor(spec, batch_size=batch)(blobs)
    # nvJPEG and libjpeg-turbo may round differently; report how far apart they are
    return {"images": len(blobs), "max_abs_diff": float(np.abs(gpu - cpu).max()), "mean_abs_diff": float(np.abs(gpu - cpu).mean()),
            "padding_changes_output": bool(not np.array_equal(gpu, padded))}


def main(args: argparse.Namespace) -> int:
    try:
        trt, cc, gpu_name = check_environment()
    except EngineEnvironmentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from serve.server import TritonServer

    out = args.artifacts / "gpu_check"
    out.mkdir(parents=True, exist_ok=True)
    meta = read_metadata(args.artifacts / "model.onnx")
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    items = list_images(args.data / "val", meta["classes"])
    val, labels = [p for p, _ in items], np.array([y for _, y in items])
    settings = repo_settings(args, args.repo)
    profile = BatchProfile.from_repo_settings(settings.max_batch_size, settings.preferred_batch_sizes)
    pre = DaliPreprocessor(spec, batch_size=profile.max)  # the val split is streamed: any size fits in memory
    sample = next(pre.iter_files(val[:profile.max]))
    torch_model = model_from_checkpoint(load_checkpoint(source_checkpoint(args.artifacts / "model.onnx", meta)))
    reference_logits = logits_for_files(torch_model, pre, val)
    reference = reference_logits.argmax(1)
    fp32_top1 = float(100 * np.mean(reference == labels))
    report = {"gpu": gpu_name, "compute_capability": cc, "tensorrt": trt.__version__, "pytorch_fp32_top1": fp32_top1,
              "max_top1_drop": args.max_top1_drop, "dali_gpu_vs_cpu": dali_gpu_vs_cpu(spec, val), "engines": {}}
    binary = CONTAINER_TRITON if CONTAINER_TRITON.exists() else Path(shutil.which("tritonserver") or CONTAINER_TRITON)
    blobs = [p.read_bytes() for p in val[:args.perf_images]]  # the same payload for every engine
    perf_inputs = jpeg_and_tensor_inputs(meta["export"]["input"], blobs, pre(blobs), out / "perf_inputs")
    for precision in ("fp16", "int8"):
        onnx_path = args.artifacts / f"model_{precision}.onnx"
        plan = args.artifacts / f"model_{precision}.plan"
        stamp = EngineBuilder(onnx_path, profile, precision, timing_cache=args.artifacts / "trt_timing.cache") \
            .check_environment().parse().configure().build(plan)
        # in a Triton install, EngineBuilder.check_environment has refused bindings other than the server's TensorRT
        check_plan(Path(f"{plan}.json"), trt.__version__, cc)
        run = TrtRunner(plan)
        engine_logits = stream_logits({precision: run}, pre.iter_files(val))[precision]
        scored = {**accuracy(engine_logits, labels, reference_logits),
                  "size_bytes": plan.stat().st_size,
                  "latency": latency(run, sample, batches=sorted({1, profile.opt, profile.max}))}
        repo = out / f"repo_{precision}"
        render(onnx_path, repo, settings, target="gpu", plan=plan)
        with TritonServer(repo, None, log_file=out / f"tritonserver_{precision}.log", binary=binary) as s:
            with ImageClassifierClient(s.grpc_url, "grpc") as c:
                preds = c.classify_files(val, batch_size=settings.max_batch_size)
            throughput = jpegs_and_tensors(s.grpc_url, s.http_url, "grpc", perf_inputs, args.concurrency,
                                           out / f"perf_{precision}", s.proc.pid)
        served = np.array([meta["classes"].index(p.labels[0]) if p.ok else -1 for p in preds])
        report["engines"][precision] = {"stamp": stamp.__dict__, "images": len(val), "engine": scored,
                                        "gate": "pass" if scored["top1"] >= fp32_top1 - args.max_top1_drop else "FAIL",
                                        "served_agreement_with_pytorch": float(100 * np.mean(served == reference)),
                                        "errors": sum(not p.ok for p in preds), "throughput": throughput}
        e = report["engines"][precision]
        print(f"{precision}: engine top-1 {scored['top1']:.2f}% (PyTorch FP32 {fp32_top1:.2f}%, gate {e['gate']}), "
              f"{scored['latency']['best_images_per_s']:.0f} img/s at batch {scored['latency']['best_batch']}; "
              f"served agreement with PyTorch {e['served_agreement_with_pytorch']:.2f}%")
    atomic_write_bytes(out / "report.json", lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    lines = [f"# GPU check: {gpu_name} (compute capability {cc}), TensorRT {trt.__version__}", "",
             f"DALI GPU vs CPU preprocessing on {report['dali_gpu_vs_cpu']['images']} images: max |diff| "
             f"{report['dali_gpu_vs_cpu']['max_abs_diff']:.4f}, mean {report['dali_gpu_vs_cpu']['mean_abs_diff']:.5f}; "
             f"zero-padded rows {'CHANGE' if report['dali_gpu_vs_cpu']['padding_changes_output'] else 'do not change'} "
             "the GPU output", "",
             f"PyTorch FP32 top-1 on {len(val)} val images: {fp32_top1:.2f}%; gate: at most {args.max_top1_drop} points below.", "",
             "| engine | size | top-1 % | agreement with PyTorch % | max logit diff | ms at batch 1 | best batch | "
             "img/s at best | gate | served via Triton: agreement % | errors |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k, v in report["engines"].items():
        e, lat = v["engine"], v["engine"]["latency"]
        lines.append(f"| {k} | {e['size_bytes'] / 2 ** 20:.2f} MiB | {e['top1']:.2f} | {e['agreement_with_pytorch']:.2f} | "
                     f"{e['max_abs_logit_diff']:.3g} | {lat['batch1_ms']:.2f} | {lat['best_batch']} | "
                     f"{lat['best_images_per_s']:.0f} | {v['gate']} | {v['served_agreement_with_pytorch']:.2f} | {v['errors']} |")
    lines += ["", "Engine latencies include host<->device copies (TensorRT Python API, one stream).", "",
              "Served throughput (perf_analyzer over gRPC, alternating per concurrency): `jpeg` = JPEG bytes through the "
              "ensemble (DALI decode + resize on the GPU, TensorRT), `tensors` = pre-decoded inputs to the TensorRT "
              "model alone.", "",
              "| engine | input | concurrency | img/s | p50 ms | p99 ms |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {k} | {r['source']} | {r['concurrency']} | {r['images_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |"
              for k, v in report["engines"].items() for r in v["throughput"]]
    atomic_write_bytes(out / "report.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
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
            problems.append(f"{name}: served predictions agree with PyTorch on {e['served_agreement_with_pytorch']:.2f}% "
                            f"of {e['images']} images, below {min_served_agreement}%")
        if e["errors"]:
            problems.append(f"{name}: {e['errors']} request(s) failed")
    return problems


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Build engines, serve the GPU repository, check fidelity (GPU only)")
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    p.add_argument("--data", type=Path, default=Path("data/synthetic"))
    p.add_argument("--repo", type=Path, default=Path("model_repository_gpu"),
                   help="take batching settings from this repository's build.json, if it exists")
    p.add_argument("--max-top1-drop", type=float, default=DEFAULT_MAX_TOP1_DROP, help="accuracy gate, as in `make quantize`")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64],
                   help="perf_analyzer concurrencies for the served throughput table")
    p.add_argument("--perf-images", type=int, default=64, help="val images perf_analyzer cycles through")
    p.add_argument("--min-served-agreement", type=float, default=99.0,
                   help="percent of val images the served engine must classify as PyTorch does; on a small split "
                   "one image is 100/N points, so allow at least that")
    add_settings_args(p)
    return p


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
