"""Train an image classifier on an ImageFolder data set and write self-describing checkpoints.

    python -m training.train --data data/synthetic --arch resnet_tiny --img-size 64 --epochs 12 --out artifacts

Writes ``<out>/last.pt`` after every epoch and ``<out>/best.pt`` when val top-1 improves; both are
plain dicts (see training.checkpoint) written atomically.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from training.checkpoint import git_commit, library_versions, save_checkpoint
from training.data import ImageFolderTrain, TrainTransform, dataset_fingerprint, find_classes, list_images
from training.evaluate import evaluate
from training.models import build_model
from training.preprocess import DaliPreprocessor, PreprocessSpec


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norm weights and biases (1-d parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warm-up, then cosine decay to zero."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * t))
    return f


def train_one_epoch(model, criterion, optimizer, scheduler, loader, epoch: int, args) -> dict[str, float]:
    model.train()
    total, correct, loss_sum, start = 0, 0, 0.0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, disable=args.quiet or not sys.stderr.isatty())
    for images, target in bar:
        output = model(images)
        loss = criterion(output, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        n = target.numel()
        total += n
        correct += (output.argmax(1) == target).sum().item()
        loss_sum += loss.item() * n
        bar.set_postfix(loss=f"{loss_sum / total:.3f}", acc=f"{100 * correct / total:.1f}",
                        img_s=f"{total / (time.perf_counter() - start):.0f}")
    elapsed = time.perf_counter() - start
    return {"train_loss": loss_sum / total, "train_top1": 100.0 * correct / total, "images_per_s": total / elapsed}


def main(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)

    classes = find_classes(args.data / "train")
    val_classes = find_classes(args.data / "val")
    if val_classes != classes:
        raise ValueError(f"train and val class folders differ: {sorted(set(classes) ^ set(val_classes))}")
    spec = PreprocessSpec.for_size(args.img_size)
    train_set = ImageFolderTrain(list_images(args.data / "train", classes), TrainTransform(spec), args.seed)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, drop_last=len(train_set) > args.batch_size,
        generator=torch.Generator().manual_seed(args.seed), persistent_workers=args.workers > 0,
    )
    # Val inputs come from the serving pipeline, computed once (the eval transform is deterministic).
    val_samples = list_images(args.data / "val", classes)
    val_inputs = DaliPreprocessor(spec).files([p for p, _ in val_samples])
    val_labels = np.array([y for _, y in val_samples])

    arch_args = {"num_classes": len(classes)}
    model = build_model(args.arch, **arch_args)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    optimizer = torch.optim.SGD(param_groups(model, args.weight_decay), lr=args.lr, momentum=0.9, nesterov=True)
    steps = args.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(min(len(loader) * args.warmup_epochs, steps), steps))

    provenance = {
        "data": str(args.data.resolve()),
        "data_sha256": dataset_fingerprint(args.data),
        "seed": args.seed,
        "versions": library_versions(),
        "git_commit": git_commit(),
    }
    best_top1, metrics = -1.0, {}
    print(f"training {args.arch} on {len(train_set)} images ({len(classes)} classes), val {len(val_samples)}")
    for epoch in range(args.epochs):
        train_set.epoch = epoch
        stats = train_one_epoch(model, criterion, optimizer, scheduler, loader, epoch, args)
        metrics = {"epoch": epoch + 1, **evaluate(model, val_inputs, val_labels), **stats}
        print(f"epoch {epoch + 1}/{args.epochs}  loss {stats['train_loss']:.3f}  val top1 {metrics['top1']:.2f}  "
              f"top5 {metrics.get('top5', float('nan')):.2f}  ({stats['images_per_s']:.0f} img/s)")
        ckpt = {
            "model": model.state_dict(), "arch": args.arch, "arch_args": arch_args, "classes": classes,
            "preprocess": spec.to_dict(), "metrics": metrics, "provenance": provenance,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "epoch": epoch + 1, "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
        }
        save_checkpoint(ckpt, args.out / "last.pt")
        if metrics["top1"] > best_top1:
            best_top1 = metrics["top1"]
            save_checkpoint(ckpt, args.out / "best.pt")
    print(f"best val top1 {best_top1:.2f}%  -> {args.out / 'best.pt'}")
    return metrics


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train an image classifier (ImageFolder)")
    p.add_argument("--data", type=Path, required=True, help="ImageFolder root with train/ and val/")
    p.add_argument("--out", type=Path, default=Path("artifacts"), help="checkpoint directory")
    p.add_argument("--arch", default="resnet_tiny", help="resnet_tiny, resnet18, resnet34, resnet50")
    p.add_argument("--img-size", type=int, default=64, help="model input (crop) size")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--workers", type=int, default=2, help="data loading processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
