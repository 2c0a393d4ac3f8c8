"""The default recipe on real data sets it has never seen, scored where it counts: served by Triton.

    python -m perf.experiments.real_data --datasets digits mnist5k animals faces --work .cache/real_data
    make benchmark-data

For each data set of training.real_datasets: write it as ImageFolder JPEGs, train with the default
recipe (no flags but --data and --out: exactly what `make train DATA=...` runs), export to ONNX,
render the embedded repository, start the real tritonserver on it and classify every val image over
HTTP. Prints a table and writes ``results.json`` and ``results.md`` under ``--work``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from build.export_onnx import export
from build.render_repo import render
from build.settings import RepoSettings
from clients.client import ImageClassifierClient
from serve.server import TritonServer
from training import train
from training.checkpoint import load_checkpoint
from training.data import find_classes, list_images
from training.real_datasets import DATASETS, write_imagefolder


def run(name: str, work: Path, extra_train_args: tuple[str, ...] = ()) -> dict:
    data = write_imagefolder(name, work / "data" / name)
    out = work / "runs" / name
    t0 = time.perf_counter()
    train.main(train.parse_args(["--data", str(data), "--out", str(out), "--quiet", *extra_train_args]))
    train_s = time.perf_counter() - t0
    ckpt = load_checkpoint(out / "best.pt")
    export(out / "best.pt", data, out / "model.onnx")
    render(out / "model.onnx", out / "repo", RepoSettings())
    val = list_images(data / "val", find_classes(data / "val"))
    classes = ckpt["classes"]
    with TritonServer(out / "repo", None, log_file=out / "tritonserver.log") as server, \
            ImageClassifierClient(server.http_url, "http", timeout_s=60) as client:
        preds = client.classify_files([p for p, _ in val], batch_size=16)
    errors = [p.error for p in preds if not p.ok]
    if errors:
        raise RuntimeError(f"{name}: {len(errors)} val images were refused by the server, e.g. {errors[0]}")
    served = 100.0 * sum(p.labels[0] == classes[y] for p, (_, y) in zip(preds, val, strict=True)) / len(val)
    train_images = len(list_images(data / "train", classes))
    return {"dataset": name, "classes": len(classes), "train_images": train_images, "val_images": len(val),
            "best_epoch": ckpt.get("best_epoch"), "checkpoint_val_top1": ckpt["best_top1"],
            "served_val_top1": served, "train_seconds": round(train_s, 1)}


def markdown(results: list[dict]) -> str:
    lines = ["| data set | classes | train / val images | val top-1, checkpoint | val top-1, served | training time |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['dataset']} | {r['classes']} | {r['train_images']} / {r['val_images']} | "
              f"{r['checkpoint_val_top1']:.2f}% | {r['served_val_top1']:.2f}% | {r['train_seconds']:.0f} s |"
              for r in results]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=sorted(DATASETS), choices=sorted(DATASETS))
    p.add_argument("--work", type=Path, default=Path(".cache/real_data"))
    p.add_argument("--train-args", default="", help="extra training flags, e.g. '--epochs 20' (default: none)")
    a = p.parse_args()
    results = [run(n, a.work, tuple(a.train_args.split())) for n in a.datasets]
    table = markdown(results)
    (a.work / "results.json").write_text(json.dumps(results, indent=2))
    (a.work / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
