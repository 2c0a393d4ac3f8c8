"""Checkpoints are plain dicts that carry their own metadata (the contract every later stage reads).

Keys:
  model            state_dict
  arch, arch_args  how to rebuild the network (training.models.build_model): a built-in name, or
                   torchvision:<name> / timm:<name> (training/sources.py), with num_classes and the rest
  pretrained       the weights fine-tuning started from (--weights: the file and its sha256, or the
                   library's name; the library and its version; the head tensors left out), else None
  classes          class names, index order = logit order
  preprocess       core.preprocess.PreprocessSpec.to_dict()
  metrics          what the checkpoint reached on val (top1, top5, loss, epoch)
  provenance       data set path and sha256, seed, library versions, git commit
  args             the effective training configuration
  distillation     the teacher (path, sha256, architecture) when trained as a student, else None
  init, pruning    the checkpoint training started from (--init) and, for a pruned network, how it was
                   pruned (training.prune: library, targets, FLOPs and parameters before and after)
  sparsity         "2:4" when trained with 2:4 masks (folded into the weights), else "none"
  epoch, optimizer, lr_scheduler   for resuming
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.atomic_io import atomic_write_bytes
from core.preprocess import PreprocessSpec
from training.models import build_model

REQUIRED_KEYS = ("model", "arch", "arch_args", "classes", "preprocess")


def save_checkpoint(ckpt: dict[str, Any], path: Path) -> None:
    atomic_write_bytes(path, lambda tmp: torch.save(ckpt, tmp))


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (train one with `make train`, or name yours with "
                                f"CKPT=<file.pt>)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a checkpoint of this project: missing keys {missing}")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    model = build_model(ckpt["arch"], **ckpt["arch_args"])
    model.load_state_dict(ckpt["model"])
    return model.eval()


def spec_from_checkpoint(ckpt: dict[str, Any]) -> PreprocessSpec:
    return PreprocessSpec.from_dict(ckpt["preprocess"])
