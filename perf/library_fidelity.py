"""The served pixels against the libraries' own eval transforms, on real photos.

    python -m perf.library_fidelity [--size 224]

For a torchvision or timm model, the checkpoint's preprocessing is the library's eval transform
(training/sources.py: crop fraction, interpolation, mean/std), which the DALI graph serves. This
measures how close DALI comes to the library's own transform (torchvision's ``Weights.transforms()``,
timm's ``create_transform``, both Pillow) on scikit-image's photos of several aspect ratios: the
largest and the mean absolute difference per image, in 8-bit levels, per interpolation mode.
"""

from __future__ import annotations

import argparse
import io
from typing import Any

import numpy as np

from core.preprocess import DaliPreprocessor, decode_image
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


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | interpolation | photo (w x h) | max diff (levels) | mean diff (levels) |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['interpolation']} | {r['photo']} ({r['size'][0]}x{r['size'][1]}) | "
              f"{r['max_levels']:.0f} | {r['mean_levels']:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224)
    print(markdown(measure(p.parse_args().size)))


if __name__ == "__main__":
    main()
