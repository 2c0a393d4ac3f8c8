"""The in-process ceiling: the served pipeline's own work with no server and no network.

Same preprocessing (the DALI CPU pipeline from the checkpoint's spec), same runtime (ONNX Runtime on
the same ONNX file), same JPEGs, at the best batch size: the most images per second this machine
can push through the pipeline, which the server can approach but not beat. Also measures the same
preprocessing done the naive way (Pillow + NumPy, one image at a time) for the DALI-vs-Pillow plot.

    python -m perf.ceiling --onnx artifacts/model.onnx --images data/synthetic/val
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from core.metadata import read_metadata
from core.preprocess import DaliPreprocessor, PreprocessSpec, pillow_preprocess
from core.runners import OrtRunner
from perf.common import sample_images


def _rate(fn, n_images: int, min_time: float) -> float:
    fn()  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_time:
        fn()
        done += n_images
    return done / (time.perf_counter() - start)


def measure(onnx_path: Path, image_dir: Path, batches=(1, 8, 16, 32), threads: int = 0,
            min_time: float = 2.0, n_images: int = 64, stages: bool = True) -> dict:
    """Images/s of DALI + ONNX Runtime in this process at each batch size; ``stages``: also each stage alone."""
    spec = PreprocessSpec.from_dict(read_metadata(onnx_path)["preprocess"])
    blobs = [b for _, b in sample_images(image_dir, n_images)]
    # the best this process can do: every core, and idle threads spinning as ORT does by default
    infer = OrtRunner(onnx_path, threads=threads, allow_spinning=True)
    dali = DaliPreprocessor(spec, batch_size=max(batches))

    def end_to_end(batch: int):
        def run():
            for i in range(0, len(blobs), batch):
                infer(dali(blobs[i:i + batch]))
        return run

    per_batch = {b: _rate(end_to_end(b), len(blobs), min_time) for b in batches}
    best = max(per_batch, key=lambda b: per_batch[b])
    if not stages:
        return {"images_per_s_by_batch": per_batch, "best_batch": best, "ceiling_images_per_s": per_batch[best],
                "images": len(blobs)}
    dali_rate = _rate(lambda: dali(blobs), len(blobs), min_time)
    pillow_rate = _rate(lambda: [pillow_preprocess(b, spec) for b in blobs], len(blobs), min_time)
    inputs = dali(blobs[:best])
    model_rate = _rate(lambda: infer(inputs), len(inputs), min_time)
    return {"images_per_s_by_batch": per_batch, "best_batch": best, "ceiling_images_per_s": per_batch[best],
            "preprocess_images_per_s": {"dali_cpu_batched": dali_rate, "pillow_numpy_one_by_one": pillow_rate},
            "model_only_images_per_s_at_best_batch": model_rate, "images": len(blobs)}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="In-process ceiling: DALI + ONNX Runtime, no server")
    p.add_argument("--onnx", type=Path, required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--min-time", type=float, default=2.0, help="seconds per measurement")
    return p


if __name__ == "__main__":
    a = get_args_parser().parse_args()
    print(json.dumps(measure(a.onnx, a.images, min_time=a.min_time), indent=2))
