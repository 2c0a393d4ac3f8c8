"""Transfer, measured offline: pretrained by this project on one real data set, fine-tuned on others.

    python -m perf.experiments.transfer --source animals --targets digits faces --archs resnet_tiny \
        torchvision:mobilenet_v3_small --epochs 4 --seeds 0
    make transfer

No weights can be downloaded here, so the "pretrained" network is this project's own: the default recipe
trained on ``--source`` (a real data set a package ships, training.real_datasets), per architecture. On each
target the same architecture is then trained twice per seed, with the same recipe and the same number of
epochs: from scratch, and fine-tuned from the source's weights with training's fine-tuning defaults (a new
head; ``--backbone-lr-scale`` / ``--freeze-epochs`` override them). Prints and writes the val top-1 of each,
per seed, with the median and range, and, from the fine-tuned runs' metrics.jsonl, the frozen epochs' val
top-1 against the lowest after unfreezing: a recipe that loses the pretrained features shows there
(``results.{json,md}`` under ``--work``).
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
    epochs = [json.loads(line) for line in (out / train.METRICS_LOG).read_text().splitlines()]
    return {"top1": ckpt["best_top1"], "best_epoch": ckpt["best_epoch"], "by_epoch": [e["top1"] for e in epochs],
            "backbone_lr_scale": ckpt["args"].get("backbone_lr_scale"),
            "freeze_epochs": ckpt["args"].get("freeze_epochs")}


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def unfreezing(run: dict) -> dict | None:
    """The last frozen epoch's val top-1 and the lowest after it (None without a frozen epoch): the dip is what
    unfreezing cost the pretrained features."""
    frozen = run["freeze_epochs"] or 0
    if not 0 < frozen < len(run["by_epoch"]):
        return None
    before, after = run["by_epoch"][frozen - 1], min(run["by_epoch"][frozen:])
    return {"frozen_top1": before, "lowest_after": after, "dip": max(0.0, before - after)}


def measure(source: str, targets: list[str], archs: list[str], work: Path, epochs: int, seeds: list[int],
            source_epochs: int, recipe: list[str]) -> dict:
    src = write_imagefolder(source, work / "data" / source)
    results = []
    for arch in archs:
        tag = arch.replace(":", "_")
        pretrained = trained(src, work / tag / "pretrained", ["--arch", arch, "--epochs", str(source_epochs)])
        weights = work / tag / "pretrained" / "best.pt"
        for target in targets:
            dst = write_imagefolder(target, work / "data" / target)
            rows = []
            for seed in seeds:
                common = ["--arch", arch, "--epochs", str(epochs), "--seed", str(seed)]
                scratch = trained(dst, work / tag / f"{target}-scratch-{seed}", common)
                tuned = trained(dst, work / tag / f"{target}-finetuned-{seed}",
                                [*common, "--weights", str(weights), *recipe])
                rows.append({"seed": seed, "scratch_top1": scratch["top1"], "finetuned_top1": tuned["top1"],
                             "finetuned_by_epoch": tuned["by_epoch"], "unfreezing": unfreezing(tuned),
                             "backbone_lr_scale": tuned["backbone_lr_scale"], "freeze_epochs": tuned["freeze_epochs"]})
                print(f"{arch} on {target}, seed {seed}: from scratch {scratch['top1']:.2f}%, fine-tuned "
                      f"{tuned['top1']:.2f}% (by epoch {', '.join(f'{t:.1f}' for t in tuned['by_epoch'])})")
            dips = [r["unfreezing"]["dip"] for r in rows if r["unfreezing"]]
            results.append({"arch": arch, "target": target, "source_top1": pretrained["top1"], "runs": rows,
                            "scratch": spread([r["scratch_top1"] for r in rows]),
                            "finetuned": spread([r["finetuned_top1"] for r in rows]),
                            "finetuned_wins": sum(r["finetuned_top1"] > r["scratch_top1"] for r in rows),
                            "largest_unfreezing_dip": max(dips) if dips else None})
    first = results[0]["runs"][0]
    return {"source": source, "epochs": epochs, "source_epochs": source_epochs, "seeds": seeds,
            "backbone_lr_scale": first["backbone_lr_scale"], "freeze_epochs": first["freeze_epochs"],
            "results": results}


def markdown(r: dict) -> str:
    def cell(s: dict) -> str:
        return f"{s['median']:.2f}% [{s['min']:.2f}-{s['max']:.2f}]"

    lines = [f"Pretrained on **{r['source']}** ({r['source_epochs']} epochs), then {r['epochs']} epochs on each "
             f"target, {len(r['seeds'])} seed(s) (median [range]); fine-tuning: a new head, the backbone at "
             f"{r['backbone_lr_scale']}x the learning rate, frozen for {r['freeze_epochs']} epoch(s).", "",
             "| architecture | target | source val top-1 | from scratch | fine-tuned | fine-tuned wins | largest dip "
             "after unfreezing, points |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for x in r["results"]:
        dip = "–" if x["largest_unfreezing_dip"] is None else f"{x['largest_unfreezing_dip']:.2f}"
        lines.append(f"| {x['arch']} | {x['target']} | {x['source_top1']:.2f}% | {cell(x['scratch'])} | "
                     f"{cell(x['finetuned'])} | {x['finetuned_wins']} of {len(x['runs'])} | {dip} |")
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", choices=sorted(DATASETS), default="animals")
    p.add_argument("--targets", nargs="+", choices=sorted(DATASETS), default=["digits", "faces"])
    p.add_argument("--archs", nargs="+", default=["resnet_tiny", "torchvision:mobilenet_v3_small"])
    p.add_argument("--epochs", type=int, default=4, help="epochs on each target, for both runs")
    p.add_argument("--source-epochs", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--backbone-lr-scale", type=float, help="default: training's fine-tuning default")
    p.add_argument("--freeze-epochs", type=int, help="default: training's fine-tuning default")
    p.add_argument("--work", type=Path, default=Path(".cache/transfer"))
    return p


def main(a: argparse.Namespace) -> dict:
    if a.source in a.targets:
        raise SystemExit("error: the targets must be other data sets than --source")
    recipe = [*(["--backbone-lr-scale", str(a.backbone_lr_scale)] if a.backbone_lr_scale is not None else []),
              *(["--freeze-epochs", str(a.freeze_epochs)] if a.freeze_epochs is not None else [])]
    r = measure(a.source, a.targets, a.archs, a.work, a.epochs, a.seeds, a.source_epochs, recipe)
    (a.work / "results.json").write_text(json.dumps(r, indent=2))
    (a.work / "results.md").write_text(markdown(r))
    print(markdown(r))
    return r


if __name__ == "__main__":
    main(get_args_parser().parse_args())
