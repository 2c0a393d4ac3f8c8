"""Train an image classifier on an ImageFolder data set and write self-describing checkpoints.

    python -m training.train --data data/synthetic --arch resnet_tiny --img-size 64 --epochs 12 --out artifacts
    python -m training.train --config recipe.yaml --data my_data            # flags from a file, CLI wins
    torchrun --nproc_per_node 2 -m training.train --data ...                 # DDP (gloo on CPU, NCCL on GPU)
    python -m training.train --data ... --arch resnet_tiny --width 16 --teacher artifacts/best.pt   # distillation
    python -m training.train --data ... --resume auto                        # continue from <out>/last.pt
    python -m training.train --data ... --init pruned.pt --teacher artifacts/best.pt   # fine-tune (training.prune)

Writes ``<out>/last.pt`` after every epoch, ``<out>/best.pt`` when val top-1 improves (both atomic,
plain dicts, see training.checkpoint) and ``<out>/metrics.jsonl`` (one line per epoch). With the same
seed, a run that is killed and resumed from last.pt ends with bit-identical weights.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from core.atomic_io import atomic_write_bytes, remove_stale_temporaries
from core.metadata import file_sha256, git_commit, library_versions
from core.preprocess import DaliPreprocessor, PreprocessSpec
from training.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from training.data import (
    EpochSampler,
    ImageFolderTrain,
    TrainTransform,
    dataset_fingerprint,
    drop_bad_images,
    find_classes,
    list_images,
)
from training.distributed import DistInfo, all_reduce_sum, barrier, cleanup, init_distributed
from training.evaluate import evaluate, format_topk
from training.models import ARCHS, build_model, check_arch
from training.sources import head_parameters, load_pretrained, model_spec, size_arguments
from training.sources import split as split_arch
from training.sparsity import SPARSITY_PATTERNS, dense_state_dict, sparsify

METRICS_LOG = "metrics.jsonl"  # in --out: one JSON line per epoch

# ------------------------------------------------------------------------------------------------
# recipe pieces
# ------------------------------------------------------------------------------------------------

def param_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float,
                 head: set[str] | None = None) -> list[dict]:
    """Norm weights and biases (the 1-d parameters) get their own weight decay, 0 by default. With
    ``head`` (fine-tuning: the new head's parameter names), the other parameters, the backbone's, form
    groups of their own, marked ``backbone``, for their own learning rate."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((head is not None and name not in head, p.ndim <= 1), []).append(p)
    keys = [(False, False), (False, True)] + ([(True, False), (True, True)] if head is not None else [])
    return [{"params": groups.get(k, []), "weight_decay": norm_weight_decay if k[1] else weight_decay,
             "backbone": k[0]} for k in keys if k in groups or head is None]


# Fine-tuning from --weights, unless told otherwise: the new head learns alone for the first epoch (a random
# head's large gradients would otherwise reach the pretrained features through the backbone), then the backbone
# follows at a tenth of the rate, so the features adapt without being overwritten (perf/experiments/transfer.py
# measures it: docs/results.md).
FINETUNE_BACKBONE_LR_SCALE, FINETUNE_FREEZE_EPOCHS = 0.1, 1


def resolve_fine_tuning(args) -> None:
    """The fine-tuning recipe's defaults, where --backbone-lr-scale / --freeze-epochs were not given."""
    if getattr(args, "backbone_lr_scale", None) is None:
        args.backbone_lr_scale = FINETUNE_BACKBONE_LR_SCALE if args.weights and not args.layer_decay else 1.0
    if getattr(args, "freeze_epochs", None) is None:
        args.freeze_epochs = FINETUNE_FREEZE_EPOCHS if args.weights else 0


def fine_tuning(args) -> bool:
    """Whether the backbone learns apart from the head: pretrained weights and a backbone recipe."""
    return bool(args.weights) and (args.backbone_lr_scale != 1.0 or args.freeze_epochs > 0)


def layer_decay_groups(model: nn.Module, args) -> list[dict]:
    """timm's layer-wise learning-rate decay: each layer group learns at layer_decay ** (its depth below the
    head) of --lr (timm's own grouping, param_groups_layer_decay; its 1-d parameters get no weight decay).
    A group that holds the head counts as the head (it learns during --freeze-epochs)."""
    if split_arch(args.arch)[0] != "timm":
        raise ValueError(f"--layer-decay uses timm's layer grouping: timm architectures only, not {args.arch}")
    if args.backbone_lr_scale != 1.0:
        raise ValueError("--layer-decay sets every layer's rate: give it or --backbone-lr-scale, not both")
    from timm.optim import param_groups_layer_decay

    head = {id(p) for n, p in model.named_parameters() if n in head_parameters(model, args.arch)}
    groups = param_groups_layer_decay(model, weight_decay=args.weight_decay, layer_decay=args.layer_decay)
    for g in groups:
        g["lr"], g["backbone"] = args.lr * g.pop("lr_scale"), not any(id(p) in head for p in g["params"])
    return groups


def make_optimizer(model: nn.Module, args) -> torch.optim.Optimizer:
    if args.layer_decay:
        groups = layer_decay_groups(model, args)
    else:
        head = head_parameters(model, args.arch) if fine_tuning(args) else None
        groups = param_groups(model, args.weight_decay, args.norm_weight_decay, head)
        for g in groups:  # the backbone learns at a fraction of the head's rate
            g["lr"] = args.lr * (args.backbone_lr_scale if g["backbone"] else 1.0)
    if args.opt == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov and args.momentum > 0)
    if args.opt == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr)
    raise ValueError(f"unknown optimizer {args.opt!r}")


def lr_factor(step: int, steps_per_epoch: int, args) -> float:
    """Linear warm-up over ``warmup_epochs``, then cosine to zero or step decay; per iteration."""
    warmup = args.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if args.lr_scheduler == "cosine":
        t = (step - warmup) / max(1, args.epochs * steps_per_epoch - warmup)
        return 0.5 * (1 + math.cos(math.pi * t))
    return args.lr_gamma ** ((step // steps_per_epoch) // args.lr_step_size)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, ce: nn.Module,
                      alpha: float, temperature: float) -> torch.Tensor:
    """(1 - alpha) * label loss + alpha * T^2 * KL(teacher_T || student_T) on temperature-softened logits."""
    kd = F.kl_div(F.log_softmax(student / temperature, 1), F.log_softmax(teacher / temperature, 1),
                  reduction="batchmean", log_target=True) * temperature ** 2
    return (1 - alpha) * ce(student, target) + alpha * kd


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(name)


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 autocast on a GPU, full precision on the CPU."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "none"
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def make_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    return torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay), use_buffers=True)


# ------------------------------------------------------------------------------------------------
# loop
# ------------------------------------------------------------------------------------------------

def forward_loss(model: nn.Module, images: torch.Tensor, target: torch.Tensor, criterion: nn.Module, args,
                 teacher: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and the loss: the label loss, or with a teacher the distillation loss."""
    output = model(images)
    if teacher is None:
        return output, criterion(output, target)
    with torch.no_grad():
        teacher_logits = teacher(images)
    return output, distillation_loss(output, teacher_logits, target, criterion, args.distill_alpha,
                                     args.distill_temperature)


def optimizer_step(loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer, args,
                   scaler: torch.amp.GradScaler | None = None) -> None:
    """Backward, optional gradient clipping (on unscaled gradients), then the optimizer's step."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if args.clip_grad_norm:
        nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def train_one_epoch(model, criterion, optimizer, scheduler, loader, epoch: int, args, device, dist: DistInfo,
                    scaler=None, amp_dtype=None, ema=None, teacher=None) -> dict[str, float]:
    model.train()
    total, correct, loss_sum, start = 0, 0, 0.0, time.perf_counter()
    # disable=None: tqdm's own test, a bar only when its stream (stderr) is a terminal; logs and pipes get
    # the epoch's line (score_and_save) instead of carriage-return frames
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch", leave=False,
               disable=True if args.quiet or not dist.is_main else None)
    for images, target in bar:
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if args.channels_last_on:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            output, loss = forward_loss(model, images, target, criterion, args, teacher)
        optimizer_step(loss, model, optimizer, args, scaler)
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        n = target.numel()
        total += n
        correct += (output.argmax(1) == target).sum().item()
        loss_sum += loss.item() * n
        bar.set_postfix(loss=f"{loss_sum / total:.3f}", acc=f"{100 * correct / total:.1f}",
                        img_s=f"{total * dist.world_size / (time.perf_counter() - start):.0f}")
    elapsed = time.perf_counter() - start
    images_seen, images_right, loss_total = all_reduce_sum([total, correct, loss_sum], dist)
    return {"train_loss": loss_total / images_seen, "train_top1": 100.0 * images_right / images_seen,
            "images_per_s": images_seen / elapsed, "lr": optimizer.param_groups[0]["lr"]}


# ------------------------------------------------------------------------------------------------
# main's steps: what a run is made of, in the order main builds it
# ------------------------------------------------------------------------------------------------

@dataclass
class TrainData:
    classes: list[str]
    spec: PreprocessSpec
    train_set: ImageFolderTrain
    sampler: EpochSampler
    loader: DataLoader


@dataclass
class Student:
    """The network being trained and what it started from."""
    model: nn.Module
    arch_args: dict[str, Any]
    init: dict[str, str] | None = None  # the --init checkpoint and its sha256
    pruning: dict[str, Any] | None = None  # how the starting network was made, carried forward
    pretrained: dict[str, Any] | None = None  # --weights: which, their sha256, the head left out


@dataclass
class Optimization:
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None = None
    ema: torch.optim.swa_utils.AveragedModel | None = None


@dataclass
class Progress:
    start_epoch: int = 0
    best_top1: float = -1.0
    best_epoch: int = 0


@dataclass
class ValData:
    pre: DaliPreprocessor
    paths: list[Path]
    labels: np.ndarray


@dataclass
class Run:
    """Everything one training run is made of (main's steps build it); rank 0 alone has ``val``."""
    args: argparse.Namespace
    device: torch.device
    dist: DistInfo
    amp_dtype: torch.dtype | None
    log: Callable[..., None]
    data: TrainData
    student: Student
    opt: Optimization
    teacher: nn.Module | None
    distill: dict[str, Any] | None
    progress: Progress
    val: ValData | None
    provenance: dict[str, Any]
    config: dict[str, Any]


def _silent(*args: object, **kwargs: object) -> None:
    """``log`` on the ranks other than 0."""


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def class_names(data: Path) -> list[str]:
    classes = find_classes(data / "train")
    val_classes = find_classes(data / "val")
    if val_classes != classes:
        raise ValueError(f"train and val class folders differ: {sorted(set(classes) ^ set(val_classes))}")
    return classes


def train_samples(args, classes: list[str], dist: DistInfo) -> list[tuple[Path, int]]:
    # the bad-image scan decodes every file: rank 0 does it (cached by the files' listing, see
    # training.data.drop_bad_images), the other ranks then read its verdict
    if dist.is_main:
        samples = drop_bad_images(list_images(args.data / "train", classes), args.on_bad_image)
    barrier(dist)
    if not dist.is_main:
        samples = drop_bad_images(list_images(args.data / "train", classes), args.on_bad_image)
    return samples


def load_train_data(args, dist: DistInfo, device: torch.device) -> TrainData:
    classes = class_names(args.data)
    # a pretrained library model is trained, scored and served with the preprocessing it learned with
    spec = (model_spec(args.arch, args.weights, args.img_size) if args.weights else None) or \
        PreprocessSpec.for_size(args.img_size)
    samples = train_samples(args, classes, dist)
    transform = TrainTransform(spec, scale=(args.crop_scale_min, 1.0), hflip=args.hflip, color_jitter=args.color_jitter)
    train_set = ImageFolderTrain(samples, transform, args.seed)
    # The sampler reshuffles from (seed, epoch): the same order whether resumed or not, and in DDP
    # the ranks' shards interleave so that together they see what one process with the
    # combined batch would see. EpochSampler sends the epoch with every index, so persistent
    # workers augment each epoch afresh.
    sampler = EpochSampler(DistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                              seed=args.seed, drop_last=True))
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        drop_last=len(sampler) > args.batch_size, persistent_workers=args.workers > 0,
                        pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise ValueError(f"{len(samples)} training images are too few for batch size {args.batch_size} "
                         f"x {dist.world_size} process(es)")
    return TrainData(classes, spec, train_set, sampler, loader)


def model_arguments(args, num_classes: int) -> dict[str, Any]:
    """What the architecture is built with (recorded in the checkpoint): the classes, and the width and
    dropout where set (a library model's dropout argument: timm's drop_rate, torchvision's dropout)."""
    source = split_arch(args.arch)[0]
    library = source != "builtin"
    if library and args.width:
        raise ValueError(f"--width is for the built-in networks; {args.arch} has its library's own widths")
    dropout_name = "drop_rate" if source == "timm" else "dropout"
    return {"num_classes": num_classes, **({"width": args.width} if args.width else {}),
            **({dropout_name: args.dropout} if args.dropout else {}),
            **(size_arguments(args.arch, args.img_size) if library else {})}


def make_student(args, classes: list[str], device: torch.device) -> Student:
    """The network to train: ``--arch`` freshly initialised, or ``--init``'s network and weights (a pruned
    one: its architecture is in it; ``args.arch`` then becomes the checkpoint's)."""
    arch_args = model_arguments(args, len(classes))
    init = pruning = pretrained = None
    model: nn.Module
    if args.init and args.weights:
        raise ValueError("--init continues a checkpoint of this project, --weights fine-tunes pretrained weights: "
                         "give one of them")
    if args.init:
        init_ckpt = load_checkpoint(args.init)
        if init_ckpt["classes"] != classes:
            raise ValueError(f"--init {args.init} was trained on other classes than {args.data}")
        args.arch, arch_args = init_ckpt["arch"], init_ckpt["arch_args"]
        init = {"checkpoint": str(args.init), "sha256": file_sha256(args.init)}
        pruning = init_ckpt.get("pruning")
        model = model_from_checkpoint(init_ckpt).to(device)
    else:
        model = build_model(args.arch, **arch_args)
        if args.weights:
            pretrained = load_pretrained(model, args.arch, args.weights)
        model = model.to(device)
    if args.sparsity != "none":  # masks from the starting weights, held through training
        model = sparsify(model)
    if args.channels_last_on:
        model = model.to(memory_format=torch.channels_last)
    return Student(model, arch_args, init, pruning, pretrained)


def make_optimization(model: nn.Module, args, steps_per_epoch: int, amp_dtype: torch.dtype | None,
                      device: torch.device) -> Optimization:
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    optimizer = make_optimizer(model, args)
    freeze = args.freeze_epochs * steps_per_epoch  # the backbone holds still at first
    schedules = [(lambda step: 0.0 if step < freeze else lr_factor(step, steps_per_epoch, args)) if g["backbone"]
                 else (lambda step: lr_factor(step, steps_per_epoch, args)) for g in optimizer.param_groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    ema = make_ema(model, args.model_ema_decay) if args.model_ema else None
    return Optimization(criterion, optimizer, scheduler, scaler, ema)


def load_teacher(args, classes: list[str], device: torch.device) -> tuple[nn.Module | None, dict[str, Any] | None]:
    """The frozen ``--teacher`` and the checkpoints' record of it (None, None without one)."""
    if not args.teacher:
        return None, None
    teacher_ckpt = load_checkpoint(args.teacher)
    if teacher_ckpt["classes"] != classes:
        raise ValueError(f"teacher {args.teacher} was trained on other classes than {args.data}")
    teacher = model_from_checkpoint(teacher_ckpt).to(device).requires_grad_(False)
    distill = {"teacher": str(args.teacher), "teacher_sha256": file_sha256(args.teacher),
               "teacher_arch": teacher_ckpt["arch"], "teacher_arch_args": teacher_ckpt["arch_args"],
               "alpha": args.distill_alpha, "temperature": args.distill_temperature}
    return teacher, distill


def resume(args, classes: list[str], student: Student, opt: Optimization, log: Callable[..., None]) -> Progress:
    """Load ``--resume``'s training state into the student and its optimization; where the run starts."""
    if not args.resume:
        return Progress()
    resume_path = args.out / "last.pt" if str(args.resume) == "auto" else Path(args.resume)
    if not resume_path.is_file():
        if str(args.resume) != "auto":
            raise FileNotFoundError(f"--resume {resume_path}: no such checkpoint")
        return Progress()
    ckpt = load_checkpoint(resume_path)
    if (ckpt["arch"], ckpt["arch_args"], ckpt["classes"]) != (args.arch, student.arch_args, classes):
        raise ValueError(f"{resume_path} is a {ckpt['arch']} {ckpt['arch_args']} on other classes: "
                         "cannot resume")
    load_train_state(ckpt["train_state"], student.model, opt)
    progress = Progress(ckpt["epoch"], ckpt["best_top1"], ckpt.get("best_epoch", ckpt["epoch"]))
    log(f"resumed from {resume_path} at epoch {progress.start_epoch} (best top1 {progress.best_top1:.2f})")
    return progress


def load_train_state(state: dict[str, Any], model: nn.Module, opt: Optimization) -> None:
    model.load_state_dict(state["model"])
    opt.optimizer.load_state_dict(state["optimizer"])
    opt.scheduler.load_state_dict(state["lr_scheduler"])
    if opt.scaler is not None and state.get("scaler"):
        opt.scaler.load_state_dict(state["scaler"])
    if opt.ema is not None:
        opt.ema.load_state_dict(state["ema"])


def prepare_out_dir(out: Path, start_epoch: int) -> None:
    """Create ``out`` (rank 0), clear stale temporaries; metrics.jsonl keeps the epochs up to ``start_epoch``."""
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    metrics_log = out / METRICS_LOG
    kept = [ln for ln in (metrics_log.read_text().splitlines() if metrics_log.exists() else [])
            if json.loads(ln)["epoch"] <= start_epoch]  # a resumed run rewrites the epochs it repeats
    atomic_write_bytes(metrics_log, lambda tmp: tmp.write_text("".join(ln + "\n" for ln in kept)))


def load_val(args, classes: list[str], spec: PreprocessSpec, dist: DistInfo) -> ValData | None:
    """Rank 0's val inputs: from the serving pipeline, streamed each epoch (any val size fits)."""
    if not dist.is_main:
        return None
    samples = drop_bad_images(list_images(args.data / "val", classes), args.on_bad_image)
    paths, labels = [p for p, _ in samples], np.array([y for _, y in samples])
    return ValData(DaliPreprocessor(spec), paths, labels)


def provenance_and_config(args, dist: DistInfo, device: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
    """Where the weights came from (data, seed, processes, versions) and the effective flags."""
    provenance = {"data": str(args.data.resolve()),
                  "data_sha256": dataset_fingerprint(args.data) if dist.is_main else None,
                  "seed": args.seed, "world_size": dist.world_size, "device": device.type,
                  "versions": library_versions(), "git_commit": git_commit()}
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    return provenance, config


def checkpoint_dict(run: Run, deploy: nn.Module, metrics: dict[str, Any], epoch: int) -> dict[str, Any]:
    """The checkpoint after ``epoch``: the deployed weights, what they are, and the state to resume from."""
    args, opt, student, progress = run.args, run.opt, run.student, run.progress
    return {
        "model": dense_state_dict(deploy),
        "arch": args.arch, "arch_args": student.arch_args, "classes": run.data.classes,
        "preprocess": run.data.spec.to_dict(),
        "metrics": metrics, "provenance": run.provenance, "args": run.config, "distillation": run.distill,
        "init": student.init, "pruning": student.pruning, "sparsity": args.sparsity, "pretrained": student.pretrained,
        "epoch": epoch + 1, "best_top1": progress.best_top1, "best_epoch": progress.best_epoch,
        "train_state": {"model": student.model.state_dict(), "optimizer": opt.optimizer.state_dict(),
                        "lr_scheduler": opt.scheduler.state_dict(), "ema": opt.ema.state_dict() if opt.ema else None,
                        "scaler": opt.scaler.state_dict() if opt.scaler else None},
    }


def score_and_save(run: Run, epoch: int, stats: dict[str, float], t0: float) -> dict[str, Any]:
    """Rank 0 after an epoch: val metrics (logged, appended to metrics.jsonl), last.pt, and best.pt if better."""
    args, opt, progress, val = run.args, run.opt, run.progress, run.val
    assert val is not None  # rank 0 has loaded it
    deploy = opt.ema.module if opt.ema is not None else run.student.model  # the weights scored and exported
    metrics = {"epoch": epoch + 1, **evaluate(deploy, val.pre, val.paths, val.labels, run.device), **stats,
               "epoch_time_s": time.perf_counter() - t0}
    run.log(f"epoch {epoch + 1}/{args.epochs}  loss {stats['train_loss']:.3f}  val {format_topk(metrics)}  "
            f"({stats['images_per_s']:.0f} img/s)")
    with open(args.out / METRICS_LOG, "a") as f:
        f.write(json.dumps(metrics) + "\n")
    improved = metrics["top1"] > progress.best_top1
    if improved:
        progress.best_top1, progress.best_epoch = metrics["top1"], epoch + 1
    ckpt = checkpoint_dict(run, deploy, metrics, epoch)
    save_checkpoint(ckpt, args.out / "last.pt")
    if improved:
        save_checkpoint(ckpt, args.out / "best.pt")
    return metrics


def stop_early(run: Run, epoch: int) -> bool:
    """Early stopping on val top-1: rank 0 decides, every rank stops after the same epoch."""
    stop = run.dist.is_main and epoch + 1 - run.progress.best_epoch >= run.args.patience
    return bool(run.args.patience) and all_reduce_sum([float(stop)], run.dist)[0] > 0


def train_epochs(run: Run, model: nn.Module) -> dict[str, Any]:
    """The epochs from ``progress.start_epoch`` on (``model``: the student, DDP-wrapped when distributed);
    the last epoch's metrics on rank 0, {} elsewhere."""
    args, opt, metrics = run.args, run.opt, {}
    for epoch in range(run.progress.start_epoch, args.epochs):
        run.data.sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        stats = train_one_epoch(model, opt.criterion, opt.optimizer, opt.scheduler, run.data.loader, epoch, args,
                                run.device, run.dist, opt.scaler, run.amp_dtype, opt.ema, run.teacher)
        if run.dist.is_main:
            metrics = score_and_save(run, epoch, stats, t0)
        if stop_early(run, epoch):
            run.log(f"early stop after epoch {epoch + 1}: val top-1 has not improved for {args.patience} epoch(s)")
            break
    return metrics


def main(args: argparse.Namespace) -> dict:
    resolve_fine_tuning(args)  # also for a Namespace built without parse_args
    device = resolve_device(args.device)
    dist = init_distributed(device)
    amp_dtype = resolve_amp(args.amp, device)
    args.channels_last_on = args.channels_last == "on" or (args.channels_last == "auto" and device.type == "cuda")
    seed_everything(args.seed)
    # flushed: through a pipe (a log file, CI) each epoch's line arrives when the epoch ends, not at exit
    log = functools.partial(print, flush=True) if dist.is_main else _silent

    data = load_train_data(args, dist, device)
    student = make_student(args, data.classes, device)
    opt = make_optimization(student.model, args, len(data.loader), amp_dtype, device)
    teacher, distill = load_teacher(args, data.classes, device)
    progress = resume(args, data.classes, student, opt, log)
    if dist.is_main:
        prepare_out_dir(args.out, progress.start_epoch)
    ddp_model = torch.nn.parallel.DistributedDataParallel(student.model) if dist.enabled else student.model
    val = load_val(args, data.classes, data.spec, dist)
    provenance, config = provenance_and_config(args, dist, device)
    run = Run(args, device, dist, amp_dtype, log, data, student, opt, teacher, distill, progress, val, provenance,
              config)

    n_params = sum(p.numel() for p in student.model.parameters())
    if student.pretrained:
        log(f"fine-tuning from {student.pretrained['weights']} (new head: "
            f"{', '.join(student.pretrained['head_reinitialised']) or 'none'}; backbone lr x{args.backbone_lr_scale}, "
            f"frozen for {args.freeze_epochs} epoch(s)); preprocessing: {data.spec.interpolation} resize to "
            f"{data.spec.resize_size}, crop {data.spec.crop_size}")
    log(f"training {args.arch} ({n_params / 1e6:.2f}M parameters) on {len(data.train_set)} images "
        f"({len(data.classes)} classes) on {device.type}"
        f"{f' x{dist.world_size} ({dist.backend})' if dist.enabled else ''}, "
        f"effective batch {args.batch_size * dist.world_size}")
    metrics = train_epochs(run, ddp_model)
    log(f"best val top1 {progress.best_top1:.2f}% (epoch {progress.best_epoch})  -> {args.out / 'best.pt'}")
    cleanup(dist)
    return metrics


# ------------------------------------------------------------------------------------------------
# arguments: command line, optionally on top of a YAML/JSON config file
# ------------------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train an image classifier (ImageFolder)")
    p.add_argument("--config", type=Path, help="YAML or JSON file of flag values; command-line flags override it")
    add_data_args(p.add_argument_group("data"))
    add_model_args(p.add_argument_group("model"))
    add_optimization_args(p.add_argument_group("optimization"))
    add_run_args(p)
    return p


def add_data_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--data", type=Path, help="ImageFolder root with train/ and val/ (required)")
    g.add_argument("--out", type=Path, default=Path("artifacts"), help="checkpoint directory")
    g.add_argument("--img-size", type=int, default=64, help="model input (crop) size")
    g.add_argument("--workers", type=int, default=2, help="data loading processes per training process")
    g.add_argument("--on-bad-image", choices=("fail", "skip"), default="fail",
                   help="an unreadable/truncated/non-JPEG-PNG image stops training (fail) or is left out (skip)")
    # Defaults that suit data sets nobody has looked at: a flip changes the class of digits, text and
    # arrows, and crops below ~half the image cut off what small centred objects are made of (measured
    # on the real data sets of perf/experiments/real_data.py). Photo recipes turn both up (configs/).
    g.add_argument("--crop-scale-min", type=float, default=0.6, help="random resized crop: smallest area fraction")
    g.add_argument("--hflip", type=float, default=0.0, help="horizontal flip probability (0.5 suits most photos)")
    g.add_argument("--color-jitter", type=float, default=0.2, help="brightness/contrast/saturation jitter strength")


def arch_argument(value: str) -> str:
    """--arch, checked: argparse shows the reason instead of "invalid value"."""
    try:
        return check_arch(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def add_model_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--arch", default="resnet_tiny", type=arch_argument, metavar="ARCH",
                   help=f"a built-in network ({', '.join(sorted(ARCHS))}), or any classification model of a "
                        "library: torchvision:<name>, timm:<name> (training/sources.py)")
    g.add_argument("--weights", help="pretrained weights to fine-tune from: a file (a state dict), or the "
                   "library's name for them (torchvision: IMAGENET1K_V1, DEFAULT; timm: a pretrained tag); the "
                   "head is new, and the preprocessing becomes the model's own (resize fraction, "
                   "interpolation, mean/std) at --img-size")
    g.add_argument("--backbone-lr-scale", type=float,
                   help="fine-tuning: the backbone learns at this fraction of --lr (the new head at --lr); default "
                        f"{FINETUNE_BACKBONE_LR_SCALE} with --weights (1 with --layer-decay), else 1")
    g.add_argument("--freeze-epochs", type=int,
                   help=f"fine-tuning: epochs at the start in which only the head learns; default "
                        f"{FINETUNE_FREEZE_EPOCHS} with --weights, else 0")
    g.add_argument("--layer-decay", type=float,
                   help="fine-tuning a timm model: layer-wise learning-rate decay (each layer below the head learns "
                        "at this factor of the one above; timm's grouping), e.g. 0.75")
    g.add_argument("--width", type=int, help="base channel width (arch default: 32 for resnet_tiny, 64 otherwise)")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout before the classifier layer (0 = none)")
    g.add_argument("--init", type=Path,
                   help="start from this checkpoint's architecture and weights (--arch/--width are then ignored)")
    g.add_argument("--sparsity", choices=SPARSITY_PATTERNS, default="none",
                   help="2:4: train with ModelOpt 2:4 masks (TensorRT sparse tensor cores, engine --sparsity)")


def add_optimization_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--epochs", type=int, default=12)
    g.add_argument("--batch-size", type=int, default=64, help="per process")
    g.add_argument("--opt", choices=("sgd", "adamw"), default="sgd")
    g.add_argument("--lr", type=float, default=0.1)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--norm-weight-decay", type=float, default=0.0, help="weight decay of norm weights and biases")
    g.add_argument("--lr-scheduler", choices=("cosine", "step"), default="cosine")
    g.add_argument("--lr-step-size", type=int, default=30, help="step schedule: epochs between decays")
    g.add_argument("--lr-gamma", type=float, default=0.1, help="step schedule: decay factor")
    g.add_argument("--warmup-epochs", type=int, default=1, help="linear learning-rate warm-up")
    g.add_argument("--label-smoothing", type=float, default=0.1)
    g.add_argument("--patience", type=int, default=0,
                   help="early stopping: stop when val top-1 has not improved for this many epochs (0 = off)")
    g.add_argument("--clip-grad-norm", type=float, help="clip the gradient norm to this value")
    g.add_argument("--model-ema", action="store_true",
                   help="keep an EMA of the weights; it is what gets scored and exported")
    g.add_argument("--model-ema-decay", type=float, default=0.99)


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The hardware, distillation and run groups."""
    g = p.add_argument_group("hardware")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                   help="autocast dtype; auto = bf16 on a GPU, none on the CPU")
    g.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto", help="auto = on with a GPU")
    g = p.add_argument_group("distillation")
    g.add_argument("--teacher", type=Path, help="teacher checkpoint: train this model as its student")
    g.add_argument("--distill-alpha", type=float, default=0.5, help="weight of the distillation term")
    g.add_argument("--distill-temperature", type=float, default=4.0)
    g = p.add_argument_group("run")
    g.add_argument("--resume", help="checkpoint to resume from, or 'auto' for <out>/last.pt if it exists")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def load_config(path: Path, parser: argparse.ArgumentParser) -> dict:
    text = Path(path).read_text()
    if Path(path).suffix.lower() == ".json":
        values = json.loads(text)
    else:
        import yaml

        values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions}
    settable = sorted(d for d in actions if d not in ("help", "config"))
    out = {}
    for key, value in values.items():
        dest = key.replace("-", "_")
        if dest not in settable:
            raise ValueError(f"{path}: unknown setting {key!r}; valid: {settable}")
        action = actions[dest]
        if action.choices and value not in action.choices:
            raise ValueError(f"{path}: {key} must be one of {list(action.choices)}, got {value!r}")
        convert = action.type  # every --flag of this parser has a callable type, or none
        try:
            out[dest] = convert(value) if callable(convert) and value is not None and not isinstance(value, bool) \
                else value
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"{path}: {key}: {e}") from e
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = get_args_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**load_config(pre.config, parser))
    args = parser.parse_args(argv)
    if args.data is None:
        parser.error("--data is required (on the command line or in --config)")
    resolve_fine_tuning(args)
    return args


if __name__ == "__main__":
    try:
        main(parse_args())
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from e
