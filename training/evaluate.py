"""Evaluation with the serving preprocess: what a checkpoint predicts for a JPEG is what Triton should.

    python -m training.evaluate --ckpt artifacts/best.pt --data data/synthetic --split val
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from training.checkpoint import load_checkpoint, model_from_checkpoint, spec_from_checkpoint
from training.data import list_images
from training.preprocess import DaliPreprocessor


@torch.inference_mode()
def logits_for_inputs(model: torch.nn.Module, inputs: np.ndarray, batch_size: int = 128) -> np.ndarray:
    model.eval()
    outs = [model(torch.from_numpy(inputs[i:i + batch_size])).numpy() for i in range(0, len(inputs), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    order = np.argsort(-logits, axis=1)
    return {f"top{k}": float(100.0 * np.mean(np.any(order[:, :k] == labels[:, None], axis=1)))
            for k in ks if k <= logits.shape[1]}


def evaluate(model: torch.nn.Module, inputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """top-1/top-5 (percent) and cross-entropy on preprocessed inputs."""
    logits = logits_for_inputs(model, inputs)
    metrics = topk_accuracy(logits, labels)
    metrics["loss"] = float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)))
    return metrics


def predict_files(ckpt: dict, paths: Sequence[Path]) -> np.ndarray:
    """Logits the checkpoint gives for image files, through the training package's eval transform."""
    inputs = DaliPreprocessor(spec_from_checkpoint(ckpt)).files(paths)
    return logits_for_inputs(model_from_checkpoint(ckpt), inputs)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a checkpoint on an ImageFolder split")
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="ImageFolder root")
    p.add_argument("--split", default="val")
    p.add_argument("--out", type=Path, help="write the metrics JSON here")
    return p


def main(args: argparse.Namespace) -> dict:
    ckpt = load_checkpoint(args.ckpt)
    samples = list_images(args.data / args.split, ckpt["classes"])
    labels = np.array([y for _, y in samples])
    logits = predict_files(ckpt, [p for p, _ in samples])
    metrics = topk_accuracy(logits, labels)
    metrics["images"] = len(samples)
    print(json.dumps(metrics, indent=2))
    if args.out:
        args.out.write_text(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main(get_args_parser().parse_args())
