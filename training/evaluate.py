"""Evaluation with the serving preprocess: what a checkpoint predicts for a JPEG is what Triton should.

    python -m training.evaluate --ckpt artifacts/best.pt --data data/synthetic --split val --out artifacts/eval

Writes ``metrics.json`` (top-1, top-5, per-class accuracy, the most frequent confusions, the confusion
matrix), ``confusion.csv`` (the full matrix) and ``confusion.png`` (the matrix up to 30 classes, the
top confusions beyond). The val split is streamed batch by batch, so memory stays flat at any size.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from core.atomic_io import atomic_write_bytes
from core.preprocess import DaliPreprocessor
from core.runners import Runner, TorchRunner
from training.checkpoint import load_checkpoint, model_from_checkpoint, spec_from_checkpoint
from training.data import drop_bad_images, list_images

# Every accuracy gate (quantization, pruning, the GPU check): top-1 may fall at most this many points
# below the reference model's on val.
DEFAULT_MAX_TOP1_DROP = 1.0


def logits_for_inputs(model: torch.nn.Module, inputs: np.ndarray, batch_size: int = 128,
                      device: torch.device | str = "cpu") -> np.ndarray:
    """The PyTorch reference's logits (core.runners' PyTorch runner)."""
    return TorchRunner(model, batch_size, device)(inputs)


def stream_logits(runners: dict[str, Runner],
                  batches: Iterable[np.ndarray]) -> dict[str, np.ndarray]:
    """Every runner's logits over one pass of the streamed val split (DaliPreprocessor.iter_files): each
    batch is decoded once whatever the number of runners, and only logits are kept."""
    outs: dict[str, list[np.ndarray]] = {name: [] for name in runners}
    for batch in batches:
        batch = np.ascontiguousarray(batch)
        for name, run in runners.items():
            outs[name].append(run(batch))
    return {name: np.concatenate(o) if o else np.zeros((0, 0), np.float32) for name, o in outs.items()}


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    order = np.argsort(-logits, axis=1)
    return {f"top{k}": float(100.0 * np.mean(np.any(order[:, :k] == labels[:, None], axis=1)))
            for k in ks if k <= logits.shape[1]}


def logits_for_files(model: torch.nn.Module, pre: DaliPreprocessor, paths: Sequence[Path],
                     device: torch.device | str = "cpu") -> np.ndarray:
    """Logits for image files through the serving preprocess, streamed batch by batch: only the
    logits are kept, never every image's input (a 50,000-image val split fits in any memory)."""
    logits = stream_logits({"model": lambda x: logits_for_inputs(model, x, device=device)}, pre.iter_files(paths))
    return logits["model"]


def format_topk(metrics: dict[str, float], unit: str = "") -> str:
    """"top1 97.50  top5 99.75": the top-k the metrics have (top-5 is left out below 5 classes)."""
    return "  ".join(f"{k} {metrics[k]:.2f}{unit}" for k in ("top1", "top5") if k in metrics)


def evaluate(model: torch.nn.Module, pre: DaliPreprocessor, paths: Sequence[Path], labels: np.ndarray,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """top-1/top-5 (percent) and cross-entropy on image files."""
    logits = logits_for_files(model, pre, paths, device)
    metrics = topk_accuracy(logits, labels)
    metrics["loss"] = float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)))
    return metrics


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """rows = true class, columns = predicted class."""
    return np.bincount(labels * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def full_report(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    cm = confusion_matrix(logits.argmax(1), labels, len(classes))
    support = cm.sum(1)
    per_class = {c: (float(100.0 * cm[i, i] / support[i]) if support[i] else None) for i, c in enumerate(classes)}
    return {**topk_accuracy(logits, labels), "images": int(len(labels)), "per_class_top1": per_class,
            "top_confusions": top_confusions(cm, classes), "classes": classes, "confusion_matrix": cm.tolist()}


MATRIX_PLOT_MAX_CLASSES = 30  # beyond this a matrix plot is unreadable: plot the top confusions instead


def top_confusions(cm: np.ndarray, classes: list[str], k: int = 20) -> list[dict]:
    """The k most frequent (true, predicted) mistakes, most frequent first."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None)[:k]
    return [{"true": classes[i], "predicted": classes[j], "count": int(off[i, j])}
            for i, j in zip(*np.unravel_index(flat, off.shape), strict=True) if off[i, j] > 0]


def write_confusion_csv(cm: np.ndarray, classes: list[str], path: Path) -> None:
    import csv

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["true \\ predicted", *classes])
            w.writerows([c, *map(int, row)] for c, row in zip(classes, cm, strict=True))

    atomic_write_bytes(path, write)


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    if n > MATRIX_PLOT_MAX_CLASSES:
        top = top_confusions(cm, classes)
        fig, ax = plt.subplots(figsize=(8, 1.5 + 0.3 * max(1, len(top))))
        ax.barh([f"{t['true']} -> {t['predicted']}" for t in top][::-1], [t["count"] for t in top][::-1])
        ax.set_xlabel("images")
        ax.set_title(f"{title}\nthe {len(top)} most frequent confusions of {n} classes (full matrix: confusion.csv)",
                     fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        fig.tight_layout()
        atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
        plt.close(fig)
        return
    fig, ax = plt.subplots(figsize=(2 + 0.45 * n, 1.5 + 0.45 * n))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(n), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.tight_layout()
    atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def predict_files(ckpt: dict, paths: Sequence[Path]) -> np.ndarray:
    """Logits the checkpoint gives for image files, through the training package's eval transform."""
    return logits_for_files(model_from_checkpoint(ckpt), DaliPreprocessor(spec_from_checkpoint(ckpt)), list(paths))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a checkpoint on an ImageFolder split")
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="ImageFolder root")
    p.add_argument("--split", default="val")
    p.add_argument("--out", type=Path, help="directory for metrics.json and confusion.png")
    p.add_argument("--on-bad-image", choices=("fail", "skip"), default="fail")
    return p


def main(args: argparse.Namespace) -> dict:
    ckpt = load_checkpoint(args.ckpt)
    samples = drop_bad_images(list_images(args.data / args.split, ckpt["classes"]), args.on_bad_image)
    labels = np.array([y for _, y in samples])
    report = full_report(predict_files(ckpt, [p for p, _ in samples]), labels, ckpt["classes"])
    report.update(checkpoint=str(args.ckpt), data=str(args.data), split=args.split)
    print(f"{args.ckpt} on {args.data}/{args.split}: {format_topk(report, '%')}  ({report['images']} images)")
    worst = sorted(((v, c) for c, v in report["per_class_top1"].items() if v is not None))[:5]
    print("lowest per-class top-1: " + ", ".join(f"{c} {v:.1f}%" for v, c in worst))
    if args.out:
        atomic_write_bytes(args.out / "metrics.json", lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
        cm = np.array(report["confusion_matrix"])
        write_confusion_csv(cm, ckpt["classes"], args.out / "confusion.csv")
        plot_confusion(cm, ckpt["classes"], args.out / "confusion.png",
                       f"{Path(args.ckpt).name} on {args.split}: top-1 {report['top1']:.2f}%")
        print(f"wrote {args.out / 'metrics.json'}, confusion.csv and confusion.png")
    return report


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
