"""ImageFolder data: file discovery, the train augmentation, and the data set fingerprint."""

from __future__ import annotations

import hashlib
import io
import math
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training.preprocess import PreprocessSpec

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def find_classes(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise FileNotFoundError(f"no such split directory: {split_dir} (expected ImageFolder layout root/<split>/<class>/*.jpg)")
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise ValueError(f"{split_dir} has {len(classes)} class folder(s); a classifier needs at least 2")
    return classes


def list_images(split_dir: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """(path, class index) for every image under split_dir/<class>/, sorted for determinism."""
    samples = []
    for idx, name in enumerate(classes):
        files = sorted(p for p in (split_dir / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"class folder {split_dir / name} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
        samples += [(p, idx) for p in files]
    return samples


def dataset_fingerprint(root: Path) -> str:
    """sha256 over every image's relative path and bytes: the data set's identity in provenance."""
    h = hashlib.sha256()
    for p in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


class TrainTransform:
    """Random resized crop + horizontal flip + normalize, in Pillow/torch (training only).

    Evaluation never uses this: it uses the DALI serving pipeline (training.preprocess).
    """

    def __init__(self, spec: PreprocessSpec, scale: tuple[float, float] = (0.35, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5):
        self.spec, self.scale, self.ratio, self.hflip = spec, scale, ratio, hflip
        self.mean = torch.tensor(spec.mean).view(3, 1, 1)
        self.std = torch.tensor(spec.std).view(3, 1, 1)

    def crop_box(self, w: int, h: int, rng: random.Random) -> tuple[int, int, int, int]:
        area = w * h
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
            cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
                return x, y, x + cw, y + ch
        s = min(w, h)  # fallback: central square
        return (w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        size = self.spec.crop_size
        img = img.resize((size, size), Image.BILINEAR, box=self.crop_box(*img.size, rng))
        if rng.random() < self.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self.mean) / self.std


class ImageFolderTrain(torch.utils.data.Dataset):
    """Decodes with Pillow on access; randomness comes from (seed, epoch, index) so runs repeat exactly."""

    def __init__(self, samples: list[tuple[Path, int]], transform: TrainTransform, seed: int):
        self.samples, self.transform, self.seed, self.epoch = samples, transform, seed, 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        try:
            img = Image.open(io.BytesIO(path.read_bytes())).convert("RGB")
        except Exception as e:  # name the file: a bare PIL error says nothing about which one
            raise RuntimeError(f"cannot read training image {path}: {e}") from e
        return self.transform(img, random.Random(hash((self.seed, self.epoch, i)))), label
