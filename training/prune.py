"""Structured (channel) pruning of a trained checkpoint, then distillation from the unpruned model.

    python -m training.prune --ckpt artifacts/best.pt --data data/synthetic --out artifacts/pruned --target-flops 0.5

1. prune: Torch-Pruning removes whole channels (every layer a residual connection ties together loses
   the same ones) by L2 magnitude, a little at a time, until the network has at most --target-flops
   (and/or --target-params) of the original's; the classifier's outputs are kept.
2. recover: training.train fine-tunes the pruned network (--init) as the student of the unpruned one
   (--teacher), with the unpruned checkpoint's recipe; --sparsity 2:4 adds ModelOpt 2:4 masks.
3. gate: top-1 on val may be at most --max-top1-drop points below the unpruned model's; only then is
   <out>/best.pt written (an older one is removed when the gate fails). The fine-tuning run stays in
   <out>/finetune/ for inspection.

The pruned checkpoint is an ordinary one: its architecture is ``arch`` plus ``arch_args["channels"]``
(the layer widths pruning changed, training.models) for the built-in networks, or
``arch_args["structure"]`` (every module pruning changed: its plain attributes and tensor shapes) for a
torchvision or timm network, so export, quantization and serving take it unchanged.
<out>/prune_report.json records parameters, FLOPs, top-1 and agreement with the unpruned
model; `make prune` adds the served comparison (perf.ab.pruned).

Why Torch-Pruning and not ModelOpt's FastNAS prune (both tried on this code): Torch-Pruning stops at
the asked FLOPs in small steps, has no search to tune and no extra dependencies; ModelOpt 0.47's
`mtp.prune` needed `torchprofile<0.1` and `huggingface_hub` (undeclared), a channel divisor smaller
than its default 32 to reach 50% on the narrow demo network, and a score function over a search.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.atomic_io import atomic_write_bytes
from core.metadata import file_sha256
from core.preprocess import DaliPreprocessor, PreprocessSpec
from training import train
from training.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint, spec_from_checkpoint
from training.data import drop_bad_images, list_images
from training.evaluate import DEFAULT_MAX_TOP1_DROP, logits_for_inputs, stream_logits
from training.models import build_model, changed_widths, pruned_structure
from training.sources import SEPARATOR
from training.sparsity import SPARSE_IN_MULTIPLE, SPARSITY_PATTERNS, eligible, two_four_violations

REPORT = "prune_report.json"
# recipe values the fine-tuning run does not inherit from the unpruned checkpoint's training run
NOT_INHERITED = {"data", "out", "init", "teacher", "resume", "config", "arch", "width", "epochs", "lr", "sparsity",
                 "patience", "quiet"}


class PruneGateError(RuntimeError):
    pass


def count_flops_params(model: nn.Module, img_size: int) -> tuple[int, int]:
    """FLOPs (2 x multiply-accumulates) of one image and the number of parameters."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model.eval(), torch.zeros(1, 3, img_size, img_size))
    return int(2 * macs), int(params)


def attention_layers(model: nn.Module) -> list[Any]:
    """timm's attention layers (a ``qkv`` projection split into ``num_heads`` heads of ``head_dim``)."""
    return [m for m in model.modules() if isinstance(getattr(m, "qkv", None), nn.Linear)
            and isinstance(getattr(m, "num_heads", None), int) and isinstance(getattr(m, "head_dim", None), int)]


def prune_to_target(model: nn.Module, img_size: int, num_classes: int, target_flops: float | None = 0.5,
                    target_params: float | None = None, round_to: int | None = 8, steps: int = 100) -> nn.Module:
    """Remove channels in ``steps`` equal steps (up to 90% of each layer's) until the FLOPs and/or parameter
    fractions are at most their targets. Layers that produce the class scores keep their outputs."""
    import torch_pruning as tp

    if not target_flops and not target_params:
        raise ValueError("give --target-flops and/or --target-params (fractions of the unpruned model, e.g. 0.5)")
    for t in (target_flops, target_params):
        if t is not None and not 0 < t < 1:
            raise ValueError(f"pruning targets are fractions between 0 and 1, got {t}")
    flops0, params0 = count_flops_params(model, img_size)
    example = torch.zeros(1, 3, img_size, img_size)
    keep = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    attention = attention_layers(model)
    # attention keeps its number of heads and loses width inside each head (Torch-Pruning's own recipe for
    # timm's ViTs): its qkv projection is pruned head by head, then each layer's head_dim follows
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=0.9, iterative_steps=steps, ignored_layers=keep, round_to=round_to,
                                  num_heads={a.qkv: a.num_heads for a in attention}, prune_head_dims=True,
                                  prune_num_heads=False)

    def fractions() -> tuple[float, float]:
        flops, params = count_flops_params(model, img_size)
        return flops / flops0, params / params0

    def reached(f: tuple[float, float]) -> bool:
        return (not target_flops or f[0] <= target_flops) and (not target_params or f[1] <= target_params)

    f = (1.0, 1.0)
    for _ in range(steps):
        if reached(f):
            break
        pruner.step()
        for a in attention:
            a.head_dim = a.qkv.out_features // (3 * a.num_heads)
            if hasattr(a, "attn_dim"):  # timm >= 1.0.20 reshapes the heads' output by it
                a.attn_dim = a.num_heads * a.head_dim
        f = fractions()
    if not reached(f):
        raise ValueError(f"pruning 90% of every layer's channels leaves {f[0]:.2f} of the FLOPs and "
                         f"{f[1]:.2f} of the parameters: the targets cannot be met")
    return model.eval()


def finetune_args(ckpt: dict, ckpt_path: Path, init_path: Path, data: Path, out: Path, epochs: int, lr: float | None,
                  sparsity: str, extra: list[str]) -> argparse.Namespace:
    """training.train's arguments: the unpruned run's recipe, the pruned network as --init, the unpruned
    model as --teacher."""
    parser = train.get_args_parser()
    dests = {a.dest for a in parser._actions}
    parser.set_defaults(**{k: v for k, v in ckpt.get("args", {}).items() if k in dests and k not in NOT_INHERITED})
    original_lr = ckpt.get("args", {}).get("lr", parser.get_default("lr"))
    return parser.parse_args(["--data", str(data), "--out", str(out), "--init", str(init_path), "--teacher",
                              str(ckpt_path), "--epochs", str(epochs), "--sparsity", sparsity, "--quiet",
                              # fine-tuning: a tenth of the original learning rate unless told otherwise
                              "--lr", str(lr if lr is not None else original_lr / 10), *extra])


PRUNED_SHAPE_ARGS = ("channels", "structure")  # the arch_args a pruned network's shape is recorded in


def prune_copy(args: argparse.Namespace, ckpt: dict[str, Any], spec: PreprocessSpec,
               unpruned: nn.Module) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Step 1: a pruned copy of the checkpoint's network, the record of how it was pruned (the checkpoint's
    ``pruning``) and the architecture arguments that rebuild it: the built-in networks' changed layer widths
    (``channels``), a library network's changed modules (``structure``, training.models.pruned_structure),
    checked here by rebuilding it."""
    base_args = {k: v for k, v in ckpt["arch_args"].items() if k not in PRUNED_SHAPE_ARGS}
    nominal = build_model(ckpt["arch"], **base_args)
    flops0, params0 = count_flops_params(unpruned, spec.crop_size)
    round_to = args.round_to or None
    if args.sparsity == "2:4":  # so that every pruned layer can carry a 2:4 mask (training.sparsity.eligible)
        round_to = math.lcm(round_to or 1, SPARSE_IN_MULTIPLE)
    try:
        pruned = prune_to_target(model_from_checkpoint(ckpt), spec.crop_size, len(ckpt["classes"]),
                                 args.target_flops or None, args.target_params, round_to)
    except RuntimeError as e:  # a layer Torch-Pruning's dependency graph does not follow: shapes break
        raise ValueError(f"Torch-Pruning cannot prune {ckpt['arch']}: {e}") from e
    flops, params = count_flops_params(pruned, spec.crop_size)
    import torch_pruning as tp

    if SEPARATOR in ckpt["arch"]:
        if ckpt["arch_args"].get("channels"):
            raise ValueError(f"{args.ckpt}: a library network pruned by width lists is not rebuildable")
        # against the unpruned network: an earlier pruning's changes are in it too
        arch_args = {**base_args, "structure": pruned_structure(pruned, nominal)}
    else:
        arch_args = {**ckpt["arch_args"], "channels": changed_widths(pruned, nominal)}
    check_rebuilds(ckpt["arch"], arch_args, pruned, spec.crop_size)
    pruning = {"library": f"torch-pruning {tp.__version__}", "importance": "group L2 magnitude",
               "round_to": round_to, "target_flops": args.target_flops, "target_params": args.target_params,
               "source": str(args.ckpt), "source_sha256": file_sha256(args.ckpt),
               "unpruned": {"flops": flops0, "params": params0}, "pruned": {"flops": flops, "params": params},
               "flops_fraction": flops / flops0, "params_fraction": params / params0}
    print(f"pruned {ckpt['arch']}: FLOPs {flops0 / 1e6:.1f}M -> {flops / 1e6:.1f}M ({flops / flops0:.2f}), "
          f"parameters {params0 / 1e3:.0f}K -> {params / 1e3:.0f}K ({params / params0:.2f})")
    return pruned, pruning, arch_args


def check_rebuilds(arch: str, arch_args: dict[str, Any], pruned: nn.Module, img_size: int) -> None:
    """The recorded arguments rebuild the pruned network: same tensors, same logits; else a clear error."""
    rebuilt = build_model(arch, **arch_args).eval()
    try:
        rebuilt.load_state_dict(pruned.state_dict())
    except RuntimeError as e:
        raise ValueError(f"the pruned {arch} cannot be rebuilt from its recorded shape: {e}") from e
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.allclose(rebuilt(x), pruned.eval()(x), atol=1e-4, rtol=1e-4):
            raise ValueError(f"the pruned {arch} rebuilt from its recorded shape computes something else")


def write_pruned_init(ckpt: dict[str, Any], pruned: nn.Module, pruning: dict[str, Any], arch_args: dict[str, Any],
                      stage: Path) -> Path:
    """The pruned network as an ordinary checkpoint (the fine-tuning run's --init), in a fresh ``stage``."""
    if stage.exists():
        shutil.rmtree(stage)  # a fresh fine-tuning run: never resume another pruning's weights
    init_path = stage / "pruned_init.pt"
    init = {k: v for k, v in ckpt.items() if k not in ("train_state", "optimizer", "lr_scheduler")}
    init.update(model={k: v.detach().clone() for k, v in pruned.state_dict().items()}, pruning=pruning,
                arch_args=arch_args)
    save_checkpoint(init, init_path)
    return init_path


def recover(args: argparse.Namespace, ckpt: dict[str, Any], init_path: Path, stage: Path) -> argparse.Namespace:
    """Step 2: fine-tune the pruned network as the unpruned one's student (training.train); its arguments."""
    targs = finetune_args(ckpt, args.ckpt, init_path, args.data, stage, args.epochs, args.lr, args.sparsity,
                          args.train_args)
    print(f"fine-tuning {args.epochs} epoch(s) at lr {targs.lr:g} with the unpruned model as teacher -> {stage}")
    train.main(targs)
    return targs


def val_top1(val_dir: Path, classes: list[str], spec: PreprocessSpec,
             models: dict[str, nn.Module]) -> tuple[dict[str, float], float, int]:
    """Each model's top-1 on the val split through the serving preprocess (one decode for all of them), the
    pruned model's agreement with the unpruned one, and the number of val images."""
    val = drop_bad_images(list_images(val_dir, classes), "skip")
    paths, labels = [p for p, _ in val], np.array([y for _, y in val])
    logits = stream_logits({name: functools.partial(logits_for_inputs, m) for name, m in models.items()},
                           DaliPreprocessor(spec).iter_files(paths))
    top1 = {name: float(100 * np.mean(out.argmax(1) == labels)) for name, out in logits.items()}
    agreement = float(100 * np.mean(logits["pruned"].argmax(1) == logits["unpruned"].argmax(1)))
    return top1, agreement, len(paths)


def two_four_counts(state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    """How many conv/linear weights can carry a 2:4 mask, of how many, and the 4-groups that break 2:4."""
    weights = {n: w for n, w in state_dict.items() if n.endswith(".weight") and w.ndim in (2, 4)}
    return {"eligible_layers": sum(eligible(w) for w in weights.values()), "layers": len(weights),
            "violations": sum(two_four_violations(w) for w in weights.values())}


def gate_report(args: argparse.Namespace, ckpt: dict[str, Any], spec: PreprocessSpec, unpruned: nn.Module,
                pruned: nn.Module, stage: Path, lr: float, pruning: dict[str, Any]) -> dict[str, Any]:
    """Step 3: the report (prune_report.json): val top-1 before and after, agreement, the gate's verdict."""
    result_ckpt = load_checkpoint(stage / "best.pt")
    models = {"unpruned": unpruned, "pruned": model_from_checkpoint(result_ckpt), "before_finetune": pruned}
    top1, agreement, images = val_top1(args.data / "val", ckpt["classes"], spec, models)
    sparse = two_four_counts(result_ckpt["model"])
    passed = top1["pruned"] >= top1["unpruned"] - args.max_top1_drop
    report = {"checkpoint": str(args.out / "best.pt"), "val_images": images, "max_top1_drop": args.max_top1_drop,
              "top1": top1, "agreement_with_unpruned": agreement, "gate": "pass" if passed else "fail",
              "epochs": args.epochs, "lr": lr, "sparsity": args.sparsity,
              "two_four": sparse if args.sparsity == "2:4" else None, **pruning}
    print(f"val top-1: unpruned {top1['unpruned']:.2f}%, pruned {top1['before_finetune']:.2f}% before and "
          f"{top1['pruned']:.2f}% after fine-tuning; agreement with unpruned {agreement:.2f}%")
    return report


def publish(args: argparse.Namespace, report: dict[str, Any], stage: Path) -> None:
    """Write the report; only when the gate passed, <out>/best.pt (else an older one is removed and
    PruneGateError raised)."""
    atomic_write_bytes(args.out / REPORT, lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    if report["gate"] != "pass":
        top1 = report["top1"]
        (args.out / "best.pt").unlink(missing_ok=True)
        raise PruneGateError(
            f"accuracy gate failed: pruned top-1 {top1['pruned']:.2f}% vs unpruned {top1['unpruned']:.2f}% "
            f"(allowed drop {args.max_top1_drop} points); {args.out / 'best.pt'} not written. "
            "Try more --epochs or a milder target.")
    atomic_write_bytes(args.out / "best.pt", lambda tmp: shutil.copyfile(stage / "best.pt", tmp))
    print(f"wrote {args.out / 'best.pt'} and {args.out / REPORT}")


def main(args: argparse.Namespace) -> dict:
    ckpt = load_checkpoint(args.ckpt)
    if ckpt.get("pruning"):
        print(f"note: {args.ckpt} is already pruned; pruning it again")
    spec = spec_from_checkpoint(ckpt)
    unpruned = model_from_checkpoint(ckpt)
    # 1. prune a copy; record its new shape so build_model rebuilds it
    pruned, pruning, arch_args = prune_copy(args, ckpt, spec, unpruned)
    stage = args.out / "finetune"
    init_path = write_pruned_init(ckpt, pruned, pruning, arch_args, stage)
    # 2. recover accuracy: distillation from the unpruned model
    targs = recover(args, ckpt, init_path, stage)
    # 3. the gate, on val through the serving preprocess
    report = gate_report(args, ckpt, spec, unpruned, pruned, stage, targs.lr, pruning)
    publish(args, report, stage)
    return report


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Prune channels to a FLOPs/parameter target, recover by distillation")
    p.add_argument("--ckpt", type=Path, required=True, help="the trained (unpruned) checkpoint; also the teacher")
    p.add_argument("--data", type=Path, required=True, help="ImageFolder root with train/ and val/")
    p.add_argument("--out", type=Path, default=Path("artifacts/pruned"))
    p.add_argument("--target-flops", type=float, default=0.5, help="at most this fraction of the FLOPs (0 = no target)")
    p.add_argument("--target-params", type=float, help="at most this fraction of the parameters")
    p.add_argument("--round-to", type=int, default=8,
                   help="keep channel counts multiples of this (tensor cores and SIMD want 8; 0 = any)")
    p.add_argument("--epochs", type=int, default=8, help="fine-tuning epochs")
    p.add_argument("--lr", type=float, help="fine-tuning learning rate (default: a tenth of the original)")
    p.add_argument("--sparsity", choices=SPARSITY_PATTERNS, default="none",
                   help="2:4: also make the weights 2:4 sparse (TensorRT sparse tensor cores; build.engine --sparsity)")
    p.add_argument("--max-top1-drop", type=float, default=DEFAULT_MAX_TOP1_DROP,
                   help="gate: allowed val top-1 drop below the unpruned model, in points")
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                   help="further training.train flags for the fine-tuning run (last on the command line)")
    return p


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from e
