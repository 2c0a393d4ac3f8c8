"""Transfer, measured offline: pretrained by this project on one real data set, fine-tuned on another.

    python -m perf.experiments.transfer --source animals --target digits --epochs 3 --seeds 0 1 2
    make transfer

No weights can be downloaded here, so the "pretrained" network is this project's own: the default recipe
trained on ``--source`` (a real data set a package ships, training.real_datasets). On ``--target`` the
same architecture is then trained twice per seed, with the same recipe and the same number of epochs:
from scratch, and fine-tuned from the source's weights (``--weights``: a new head, the backbone at
``--backbone-lr-scale`` of the learning rate, frozen for ``--freeze-epochs``). Prints and writes the val
top-1 of each, per seed, with the median and range (``results.{json,md}`` under ``--work``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from training import train
from training.checkpoint import load_checkpoint
from training.real_datasets import DATASETS, write_imagefolder


def trained(data: Path, out: Path, args: list[str]) -> dict:
    train.main(train.parse_args(["--data", str(data), "--out", str(out), "--quiet", *args]))
    ckpt = load_checkpoint(out / "best.pt")
    return {"top1": ckpt["best_top1"], "best_epoch": ckpt["best_epoch"]}


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def measure(source: str, target: str, work: Path, epochs: int, seeds: list[int], source_epochs: int,
            backbone_lr_scale: float, freeze_epochs: int) -> dict:
    src = write_imagefolder(source, work / "data" / source)
    dst = write_imagefolder(target, work / "data" / target)
    pretrained = trained(src, work / "pretrained", ["--epochs", str(source_epochs)])
    weights = work / "pretrained" / "best.pt"
    rows = []
    for seed in seeds:
        common = ["--epochs", str(epochs), "--seed", str(seed)]
        scratch = trained(dst, work / f"scratch-{seed}", common)
        tuned = trained(dst, work / f"finetuned-{seed}", [*common, "--weights", str(weights), "--backbone-lr-scale",
                                                           str(backbone_lr_scale), "--freeze-epochs",
                                                           str(freeze_epochs)])
        rows.append({"seed": seed, "scratch_top1": scratch["top1"], "finetuned_top1": tuned["top1"]})
        print(f"seed {seed}: from scratch {scratch['top1']:.2f}%, fine-tuned {tuned['top1']:.2f}%")
    return {"source": source, "target": target, "epochs": epochs, "source_epochs": source_epochs,
            "source_top1": pretrained["top1"], "backbone_lr_scale": backbone_lr_scale,
            "freeze_epochs": freeze_epochs, "runs": rows,
            "scratch": spread([r["scratch_top1"] for r in rows]),
            "finetuned": spread([r["finetuned_top1"] for r in rows]),
            "finetuned_wins": sum(r["finetuned_top1"] > r["scratch_top1"] for r in rows)}


def markdown(r: dict) -> str:
    def cell(s: dict) -> str:
        return f"{s['median']:.2f}% [{s['min']:.2f}-{s['max']:.2f}]"

    return "\n".join([
        f"Pretrained on **{r['source']}** ({r['source_epochs']} epochs, val top-1 {r['source_top1']:.2f}%), then "
        f"{r['epochs']} epochs on **{r['target']}**, {len(r['runs'])} seeds (median [range]); fine-tuning: backbone "
        f"at {r['backbone_lr_scale']}x the learning rate, frozen for {r['freeze_epochs']} epoch(s).", "",
        "| on the target | val top-1 |", "| --- | --- |",
        f"| from scratch | {cell(r['scratch'])} |", f"| fine-tuned | {cell(r['finetuned'])} |", "",
        f"Fine-tuning beat training from scratch in {r['finetuned_wins']} of {len(r['runs'])} seeds.", ""])


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", choices=sorted(DATASETS), default="animals")
    p.add_argument("--target", choices=sorted(DATASETS), default="digits")
    p.add_argument("--epochs", type=int, default=3, help="epochs on the target, for both runs")
    p.add_argument("--source-epochs", type=int, default=12)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--backbone-lr-scale", type=float, default=0.5)
    p.add_argument("--freeze-epochs", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path(".cache/transfer"))
    return p


def main(a: argparse.Namespace) -> dict:
    if a.source == a.target:
        raise SystemExit("error: --source and --target must be different data sets")
    r = measure(a.source, a.target, a.work, a.epochs, a.seeds, a.source_epochs, a.backbone_lr_scale,
                a.freeze_epochs)
    (a.work / "results.json").write_text(json.dumps(r, indent=2))
    (a.work / "results.md").write_text(markdown(r))
    print(markdown(r))
    return r


if __name__ == "__main__":
    main(get_args_parser().parse_args())
