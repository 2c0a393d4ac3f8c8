"""The gate every CPU candidate passes before `make repo` may serve it, and the images it is judged on.

A candidate (an artifact on an engine at a precision) is judged against the reference (PyTorch, or the FP32
file where there is no checkpoint) on held-out images: its top-1 on the labels, where there are labels, may
drop at most ``max_top1_drop`` points below the reference file's; and, labelled or not, it must answer like
the reference: top-1 agreement and top-5 overlap at least their bounds. Top-1 on labels moves little while a
few percent of individual answers change (an INT8 file passed at 92% agreement on real photos); users
validated the FP32 model's answers, not only its accuracy.

The images: a labelled ImageFolder (``train/`` calibrates, ``val/`` judges), or any folder of images, at any
depth and without labels (a quarter held out to judge, the rest to calibrate).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Defaults of the two agreement bounds, in percent. 99: at most one answer in a hundred may change. Top-5 overlap
# (the share of the reference's top 5 that the candidate's top 5 holds, on average) moves with near-ties far
# down the ranking, which users see less: 95.
DEFAULT_MIN_AGREEMENT = 99.0
DEFAULT_MIN_TOP5_OVERLAP = 95.0
REFERENCE_ROW = "fp32"  # the FP32 file on ONNX Runtime: where there is no checkpoint, the reference itself
# An unlabelled folder: every HELD_OUT_EVERY-th image (sorted) judges, at most MAX_HELD_OUT; the rest calibrate
HELD_OUT_EVERY = 4
MAX_HELD_OUT = 512
MIN_UNLABELLED_IMAGES = 8


@dataclass(frozen=True)
class Bounds:
    max_top1_drop: float
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    min_top5_overlap: float = DEFAULT_MIN_TOP5_OVERLAP


def accuracy(logits: np.ndarray, labels: np.ndarray | None, reference: np.ndarray) -> dict[str, Any]:
    """top-1 on the labels (None without labels), top-1 agreement and top-5 overlap with the reference's
    logits, in percent, and the max |logit difference|."""
    k = min(5, logits.shape[1])
    top, ref_top = np.argsort(-logits, 1)[:, :k], np.argsort(-reference, 1)[:, :k]
    overlap = (top[:, :, None] == ref_top[:, None, :]).any(2).sum(1) / k
    return {"top1": None if labels is None else float(100 * np.mean(logits.argmax(1) == labels)),
            "agreement_with_pytorch": float(100 * np.mean(logits.argmax(1) == reference.argmax(1))),
            "top5_overlap": float(100 * np.mean(overlap)),
            "max_abs_logit_diff": float(np.abs(logits.astype(np.float32) - reference).max())}


def reasons(r: dict[str, Any], reference_top1: float | None, bounds: Bounds) -> list[str]:
    """Why a candidate's scores ``r`` fail the gate (nothing: it passes)."""
    out = []
    if r.get("top1") is not None and reference_top1 is not None and r["top1"] < reference_top1 - bounds.max_top1_drop:
        out.append(f"top-1 {r['top1']:.2f}% vs FP32 {reference_top1:.2f}% (allowed drop {bounds.max_top1_drop} "
                   "points)")
    if r["agreement_with_pytorch"] < bounds.min_agreement:
        out.append(f"agrees with the reference on {r['agreement_with_pytorch']:.2f}% of top-1s (at least "
                   f"{bounds.min_agreement}%: MIN_AGREEMENT)")
    if r.get("top5_overlap", 100.0) < bounds.min_top5_overlap:
        out.append(f"top-5 overlap {r['top5_overlap']:.2f}% (at least {bounds.min_top5_overlap}%)")
    return out


def failures(results: dict[str, dict[str, Any]], bounds: Bounds) -> list[str]:
    """Names of the candidates that fail the gate; the FP32 file on ONNX Runtime is the baseline, never gated."""
    base = results[REFERENCE_ROW].get("top1")
    return [name for name, r in results.items() if name != REFERENCE_ROW and reasons(r, base, bounds)]


def describe(bounds: Bounds, labelled: bool) -> str:
    top1 = f"top-1 may drop at most {bounds.max_top1_drop} points below FP32; " if labelled else "no labels; "
    return (f"{top1}top-1 agreement with the reference at least {bounds.min_agreement}% and top-5 overlap at least "
            f"{bounds.min_top5_overlap}%")


@dataclass(frozen=True)
class GateImages:
    """The images a build is calibrated and judged on."""

    judge: list[Path]
    labels: np.ndarray | None  # one per judged image; None: an unlabelled folder
    calibrate: list[Path]
    source: str  # what they are, for the report

    @property
    def labelled(self) -> bool:
        return self.labels is not None


def labelled_split(data: Path, split: str, classes: Sequence[str]) -> list[tuple[Path, int]] | None:
    """``data/split/<class>/`` for every class, or None where a class folder is missing or empty."""
    from training.data import image_files  # torch: only when there are images to find

    root = Path(data) / split
    if not root.is_dir() or not all(image_files(root / c) for c in classes):
        return None
    return [(p, i) for i, c in enumerate(classes) for p in image_files(root / c)]


def gate_images(data: Path, classes: Sequence[str]) -> GateImages:
    """A labelled ImageFolder (train/ and val/ with a folder per class), else every image under ``data``."""
    from training.data import image_files

    val, train = labelled_split(data, "val", classes), labelled_split(data, "train", classes)
    if val is not None and train is not None:
        return GateImages([p for p, _ in val], np.array([y for _, y in val]), [p for p, _ in train],
                          f"the val split `{data}/val`, labelled")
    if (Path(data) / "val").is_dir():
        print(f"note: {data}/val has no folder with images for each of the model's {len(classes)} classes: "
              f"every image under {data} is used without labels")
    images = image_files(Path(data))
    if len(images) < MIN_UNLABELLED_IMAGES:
        raise ValueError(f"{data} holds {len(images)} images: at least {MIN_UNLABELLED_IMAGES} are needed, a "
                         f"folder of images (any depth, no labels) or an ImageFolder with train/ and val/")
    judge = images[HELD_OUT_EVERY - 1::HELD_OUT_EVERY][:MAX_HELD_OUT]
    held = set(judge)
    return GateImages(judge, None, [p for p in images if p not in held],
                      f"{len(judge)} of the {len(images)} images under `{data}` (every {HELD_OUT_EVERY}th), "
                      "unlabelled")
