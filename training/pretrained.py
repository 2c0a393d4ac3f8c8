"""A pretrained model as it is: a torchvision or timm classifier with the classes it was trained on (ImageNet's
1,000 for their pretrained weights), written as a checkpoint of this project with no training, so that export,
quantization, the repository and serving take it like any other.

    python -m training.pretrained --arch timm:convnext_nano --weights convnext_nano.pth --out artifacts/pretrained.pt
    make export ARCH=timm:convnext_nano WEIGHTS=convnext_nano.pth IMAGES=my_photos/   # then make repo serve

The class names come from the libraries themselves, offline: torchvision's weights record
(``meta["categories"]``), timm's ``ImageNetInfo`` for the ImageNet subset the model's head has. The
preprocessing is the library's own eval transform (training/sources.py), at the size the weights were
trained at unless ``--img-size`` says otherwise. The weights must fit the whole network, head included.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any

from core.metadata import git_commit, library_versions
from training.checkpoint import save_checkpoint
from training.sources import SOURCES, _torchvision_weights, create, load_pretrained, size_arguments, split


def torchvision_classes(name: str, weights: str | None) -> list[str]:
    """The categories torchvision records with the weights (a file: with the architecture's default weights)."""
    from torchvision.models import get_model_weights

    record = _torchvision_weights(name, weights) if weights and not Path(weights).is_file() \
        else get_model_weights(name).DEFAULT
    return list(record.meta["categories"])


def timm_classes(name: str, weights: str | None) -> list[str]:
    import timm
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(timm.create_model(name, pretrained=False))
    if subset is None:
        raise ValueError(f"timm's {name} is not an ImageNet classifier (no known subset for its head): serve it "
                         "with your own classes through `make train WEIGHTS=...` or `make import`")
    info = ImageNetInfo(subset)
    names = [info.index_to_description(i).split(",")[0].strip() for i in range(info.num_classes())]
    repeated = {n for n, k in Counter(names).items() if k > 1}  # ImageNet has two "crane"s, two "maillot"s
    return [f"{n} ({info.index_to_label_name(i)})" if n in repeated else n for i, n in enumerate(names)]


CLASSES = {"torchvision": torchvision_classes, "timm": timm_classes}


def checkpoint(arch: str, weights: str, img_size: int | None = None) -> dict[str, Any]:
    """The checkpoint dict of ``arch`` with ``weights`` loaded whole (head included) and the library's classes
    and preprocessing; nothing trained."""
    source, name = split(arch)
    if source not in SOURCES:
        raise ValueError(f"--arch {arch}: a pretrained model comes from a library (torchvision:<name> or "
                         "timm:<name>); a built-in network has no pretrained classes")
    transform = SOURCES[source].eval_transform(name, weights if not Path(weights).is_file() else None)
    spec = transform.spec(img_size or transform.native_size)
    classes = CLASSES[source](name, weights)
    arch_args = {"num_classes": len(classes), **size_arguments(arch, spec.crop_size)}
    model = create(arch, **arch_args)
    pretrained = load_pretrained(model, arch, weights, keep_head=True)
    return {"model": model.state_dict(), "arch": arch, "arch_args": arch_args, "classes": classes,
            "preprocess": spec.to_dict(), "pretrained": {**pretrained, "as_is": True}, "metrics": {},
            "provenance": {"trained": False, "versions": library_versions(), "git_commit": git_commit()},
            "args": {}, "distillation": None, "init": None, "pruning": None, "sparsity": "none"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="A pretrained torchvision or timm classifier as it is, as a checkpoint")
    p.add_argument("--arch", required=True, help="torchvision:<name> or timm:<name>")
    p.add_argument("--weights", required=True, help="a weights file, or the library's name for its weights")
    p.add_argument("--img-size", type=int, help="crop size (default: the size the weights were trained at)")
    p.add_argument("--out", type=Path, default=Path("artifacts/pretrained.pt"))
    return p


def main(args: argparse.Namespace) -> Path:
    ckpt = checkpoint(args.arch, args.weights, args.img_size)
    save_checkpoint(ckpt, args.out)
    spec = ckpt["preprocess"]
    print(f"wrote {args.out}: {args.arch} with {args.weights} as it is, {len(ckpt['classes'])} classes "
          f"({', '.join(ckpt['classes'][:3])}, ...), its own preprocessing: resize {spec['resize_size']}, crop "
          f"{spec['crop_size']}, {spec['interpolation']}")
    return Path(args.out)


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
