"""The served pixels against the libraries' own eval transforms, on real photos.

    python -m perf.experiments.library_fidelity [--size 224]

For a torchvision or timm model, the checkpoint's preprocessing is the library's eval transform
(training/sources.py: crop fraction, interpolation, mean/std), which the DALI graph serves. This
measures how close DALI comes to the library's own transform (torchvision's ``Weights.transforms()``,
timm's ``create_transform``, both Pillow) on scikit-image's photos of several aspect ratios: the
largest and the mean absolute difference per image, in 8-bit levels, per interpolation mode.

    python -m perf.experiments.library_fidelity --checkpoint CKPT --images DIR

With a trained checkpoint: the network's top-1 on every image of DIR (an ImageFolder tree, or files)
through the served DALI graph and through torchvision's eval transform (Pillow's ``Resize`` +
``CenterCrop`` + ``Normalize`` with the checkpoint's numbers), per interpolation mode: how often the two
agree, the largest change in a class probability, and the pixel differences.
"""

from __future__ import annotations

import argparse
import io
from typing import Any

import numpy as np

from core.preprocess import DaliPreprocessor, decode_image
from training.data import image_files
from training.sources import model_spec

PHOTOS = ("astronaut", "camera", "immunohistochemistry", "coffee", "chelsea", "rocket", "hubble_deep_field")
MODELS = ("torchvision:resnet18", "torchvision:efficientnet_b0", "timm:convnext_nano")


def photos() -> dict[str, bytes]:
    from PIL import Image
    from skimage import data

    out = {}
    for name in PHOTOS:
        pixels = getattr(data, name)()
        rgb = np.stack([pixels] * 3, -1) if pixels.ndim == 2 else pixels[..., :3]
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", quality=90)
        out[name] = buf.getvalue()
    return out


def library_transform(arch: str, size: int) -> Any:
    source, name = arch.split(":", 1)
    if source == "torchvision":
        from torchvision.models import get_model_weights

        t = get_model_weights(name).DEFAULT.transforms()
        t.crop_size, t.resize_size = [size], [int(size * t.resize_size[0] / t.crop_size[0])]
        return t
    import timm
    from timm.data import create_transform

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise ValueError(f"timm has no pretrained configuration for {name}")
    return create_transform(input_size=(3, size, size), interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std,
                            crop_pct=cfg.crop_pct, crop_mode=cfg.crop_mode)


def measure(size: int) -> list[dict[str, Any]]:
    images = photos()
    rows = []
    for arch in MODELS:
        spec = model_spec(arch, None, size)
        assert spec is not None
        transform, dali = library_transform(arch, size), DaliPreprocessor(spec, batch_size=1)
        levels = np.array(spec.std, np.float32).reshape(3, 1, 1) * 255
        for name, data in images.items():
            img = decode_image(data)
            diff = np.abs(transform(img).numpy() - dali([data])[0]) * levels
            rows.append({"model": arch, "interpolation": spec.interpolation, "photo": name, "size": img.size,
                         "max_levels": float(diff.max()), "mean_levels": float(diff.mean())})
    return rows


def agreement(checkpoint: str, images: str) -> list[dict[str, Any]]:
    """Per interpolation mode: top-1 agreement between the served pixels and the library's transform."""
    from dataclasses import replace
    from pathlib import Path

    import torch
    from torchvision import transforms as T

    from training.checkpoint import load_checkpoint, model_from_checkpoint, spec_from_checkpoint

    ckpt = load_checkpoint(checkpoint)
    model, spec = model_from_checkpoint(ckpt), spec_from_checkpoint(ckpt)
    if spec.resize_policy != "shorter_center_crop" or spec.color != "RGB" or spec.layout != "CHW":
        raise ValueError(f"the library transform is the shorter-side resize and centre crop to RGB CHW, not {spec}")
    files = image_files(Path(images))
    if not files:
        raise ValueError(f"no .jpg, .jpeg or .png files under {images}")
    encoded = [p.read_bytes() for p in files]
    levels = np.array(spec.std, np.float32).reshape(3, 1, 1) * 255
    modes = {"linear": T.InterpolationMode.BILINEAR, "cubic": T.InterpolationMode.BICUBIC}
    rows = []
    for interpolation, mode in modes.items():
        s = replace(spec, interpolation=interpolation)
        library = T.Compose([T.Resize(s.resize_size, mode), T.CenterCrop(s.crop_size), T.ToTensor(),
                             T.Normalize(s.mean, s.std)])
        served = torch.from_numpy(np.concatenate(list(DaliPreprocessor(s, batch_size=16).iter_files(files))))
        theirs = torch.stack([library(decode_image(b)) for b in encoded])
        with torch.no_grad():
            p_served = torch.cat([model(x).softmax(1) for x in served.split(16)])
            p_theirs = torch.cat([model(x).softmax(1) for x in theirs.split(16)])
        diff = (served - theirs).abs().numpy() * levels
        rows.append({"interpolation": interpolation, "images": len(files), "trained_with": spec.interpolation,
                     "agreement": float((p_served.argmax(1) == p_theirs.argmax(1)).float().mean()),
                     "classes_predicted": int(p_served.argmax(1).unique().numel()),
                     "max_probability_change": float((p_served - p_theirs).abs().max()),
                     "max_levels": float(diff.max()), "mean_levels": float(diff.mean())})
    return rows


def agreement_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| interpolation | images | top-1 agreement | largest probability change | max diff (levels) | "
             "mean diff (levels) |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['interpolation']}{' (trained)' if r['interpolation'] == r['trained_with'] else ''} | "
              f"{r['images']} | {100 * r['agreement']:.1f}% | {r['max_probability_change']:.4f} | "
              f"{r['max_levels']:.0f} | {r['mean_levels']:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | interpolation | photo (w x h) | max diff (levels) | mean diff (levels) |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['interpolation']} | {r['photo']} ({r['size'][0]}x{r['size'][1]}) | "
              f"{r['max_levels']:.0f} | {r['mean_levels']:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--checkpoint", help="a trained checkpoint: measure top-1 agreement on --images")
    p.add_argument("--images", help="the images (a folder, searched recursively) for --checkpoint")
    args = p.parse_args()
    if args.checkpoint:
        if not args.images:
            p.error("--checkpoint needs --images")
        print(agreement_markdown(agreement(args.checkpoint, args.images)))
    else:
        print(markdown(measure(args.size)))


if __name__ == "__main__":
    main()
