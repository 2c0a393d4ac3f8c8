"""A deterministic synthetic colour image data set, written as real JPEGs in ImageFolder layout.

Each class is a shape drawn in a class hue (jittered) on a random two-colour gradient with noise.
Image sizes and aspect ratios vary, so resizing and cropping matter; the shape sits near the centre
so the eval centre crop keeps it. The same seed always gives byte-identical files.

    python -m training.synthetic --out data/synthetic --train-per-class 80 --val-per-class 20
"""

from __future__ import annotations

import argparse
import colorsys
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "hbars", "vbars", "star", "hexagon",
          "ellipse", "chevron")


def _polygon(kind: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        n, radii = 3, [r]
    elif kind == "diamond":
        n, radii = 4, [r]
    elif kind == "hexagon":
        n, radii = 6, [r]
    elif kind == "star":
        n, radii = 10, [r, r * 0.45]
    else:
        raise ValueError(kind)
    pts = []
    for i in range(n):
        a = rot + 2 * math.pi * i / n
        rr = radii[i % len(radii)]
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, color, rng) -> None:
    rot = rng.uniform(-0.25, 0.25)
    box = (cx - r, cy - r, cx + r, cy + r)
    w = max(2, int(r * 0.35))
    if kind == "circle":
        draw.ellipse(box, fill=color)
    elif kind == "ellipse":
        draw.ellipse((cx - r, cy - r * 0.5, cx + r, cy + r * 0.5), fill=color)
    elif kind == "ring":
        draw.ellipse(box, outline=color, width=w)
    elif kind == "square":
        draw.rectangle((cx - r * 0.8, cy - r * 0.8, cx + r * 0.8, cy + r * 0.8), fill=color)
    elif kind == "cross":
        draw.rectangle((cx - r, cy - w / 2, cx + r, cy + w / 2), fill=color)
        draw.rectangle((cx - w / 2, cy - r, cx + w / 2, cy + r), fill=color)
    elif kind == "hbars":
        for k in (-1, 0, 1):
            y = cy + k * r * 0.66
            draw.rectangle((cx - r, y - w / 3, cx + r, y + w / 3), fill=color)
    elif kind == "vbars":
        for k in (-1, 0, 1):
            x = cx + k * r * 0.66
            draw.rectangle((x - w / 3, cy - r, x + w / 3, cy + r), fill=color)
    elif kind == "chevron":
        draw.line([(cx - r, cy + r * 0.5), (cx, cy - r * 0.5), (cx + r, cy + r * 0.5)], fill=color, width=w)
    else:
        draw.polygon(_polygon(kind, cx, cy, r, rot - math.pi / 2), fill=color)


def make_image(class_idx: int, num_classes: int, rng: np.random.Generator) -> Image.Image:
    w = int(rng.integers(56, 161))
    h = int(np.clip(w * rng.uniform(0.6, 1.6), 48, 200))
    # background: a random gradient between two muted colours plus noise
    c0, c1 = rng.uniform(0, 140, 3), rng.uniform(0, 140, 3)
    t = np.linspace(0, 1, w if rng.random() < 0.5 else h)
    grad = c0[None] * (1 - t[:, None]) + c1[None] * t[:, None]
    bg = np.broadcast_to(grad[None], (h, w, 3)) if len(t) == w else np.broadcast_to(grad[:, None], (h, w, 3))
    bg = np.clip(bg + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(bg)
    # foreground: class shape in the class hue (jittered), bright enough to stand out
    hue = (class_idx / num_classes + rng.uniform(-0.03, 0.03)) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.75, 1.0))
    color = tuple(int(255 * c) for c in rgb)
    s = min(w, h)
    r = s * rng.uniform(0.22, 0.32)
    cx = w / 2 + rng.uniform(-0.08, 0.08) * s
    cy = h / 2 + rng.uniform(-0.08, 0.08) * s
    draw_shape(ImageDraw.Draw(img), SHAPES[class_idx % len(SHAPES)], cx, cy, r, color, rng)
    return img


def class_names(num_classes: int) -> list[str]:
    return [f"{i:02d}_{SHAPES[i % len(SHAPES)]}" for i in range(num_classes)]


def generate(out: Path, num_classes: int = 10, train_per_class: int = 80, val_per_class: int = 20,
             seed: int = 0) -> Path:
    """Write ``out/{train,val}/<class>/*.jpg``; returns ``out``. Deterministic for a given seed."""
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in 2..{len(SHAPES)}, got {num_classes}")
    names = class_names(num_classes)
    for split, per_class, split_seed in (("train", train_per_class, 0), ("val", val_per_class, 1)):
        for ci, name in enumerate(names):
            d = out / split / name
            d.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, split_seed, ci])
            for k in range(per_class):
                img = make_image(ci, num_classes, rng)
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=int(rng.integers(80, 96)))
                (d / f"{name}_{k:04d}.jpg").write_bytes(buf.getvalue())
    return out


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write the synthetic ImageFolder data set", add_help=True)
    p.add_argument("--out", type=Path, default=Path("data/synthetic"))
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=80)
    p.add_argument("--val-per-class", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(args: argparse.Namespace) -> None:
    generate(args.out, args.num_classes, args.train_per_class, args.val_per_class, args.seed)
    n = sum(1 for _ in args.out.rglob("*.jpg"))
    print(f"wrote {n} JPEGs ({args.num_classes} classes) to {args.out}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
