"""ImageFolder data: file discovery, the train augmentation, and the data set fingerprint."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance

from core.preprocess import ImageRejected, PreprocessSpec, decode_image, open_image, pillow_filter, to_model_input

# File names of what the served ensemble accepts (core.preprocess.IMAGE_FORMATS), so that every
# training image can also be served.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def find_classes(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise FileNotFoundError(f"no such split directory: {split_dir} "
                                "(expected ImageFolder layout root/<split>/<class>/*.jpg)")
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise ValueError(f"{split_dir} has {len(classes)} class folder(s); a classifier needs at least 2")
    return classes


def image_files(root: Path) -> list[Path]:
    """Every image file (IMAGE_EXTENSIONS) under ``root``, at any depth, sorted for determinism."""
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def list_images(split_dir: Path, classes: Sequence[str]) -> list[tuple[Path, int]]:
    """(path, class index) for every image under split_dir/<class>/, sorted for determinism."""
    samples = []
    for idx, name in enumerate(classes):
        files = image_files(split_dir / name)
        if not files:
            raise ValueError(f"class folder {split_dir / name} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
        samples += [(p, idx) for p in files]
    return samples


def stratified(samples: Sequence[tuple[Path, int]], n: int | None = None) -> list[tuple[Path, int]]:
    """The samples in an order of which every prefix holds each class in proportion to its share (the first
    ``n``; all of them when ``n`` is None): a class's i-th of k samples is placed at (i + 0.5) / k. The
    first images in folder order would be the first classes only. Deterministic."""
    by_class: dict[int, list[tuple[Path, int]]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    keyed = sorted(((i + 0.5) / len(items), c, i) for c, items in by_class.items() for i in range(len(items)))
    order = [by_class[c][i] for _, c, i in keyed]
    return order if n is None else order[:n]


def image_problem(path: Path) -> str | None:
    """Why an image file cannot be used (unreadable, truncated, not JPEG/PNG), or None.

    Decodes at reduced size (JPEG draft mode), so a scan is cheap but still catches truncation; the
    size limits are the decode policy's (core.preprocess).
    """
    try:
        with open_image(path, path.stat().st_size) as img:
            img.draft("RGB", (64, 64))
            img.load()
    except ImageRejected as e:
        return str(e)
    except Exception as e:  # PIL raises several types for broken files
        return f"{type(e).__name__}: {e}"
    return None


def scan_cache_dir() -> Path:
    """Where scans and fingerprints are cached: $IMAGE_PLATFORM_CACHE, else ~/.cache/image-inference-platform."""
    return Path(os.environ.get("IMAGE_PLATFORM_CACHE", Path.home() / ".cache" / "image-inference-platform"))


def listing_key(paths: list[Path]) -> str:
    """sha256 over each file's absolute path, size and modification time: changes whenever a file does,
    costs one stat per file instead of reading every byte."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _cached(kind: str, key: str, compute):
    """``compute()`` once per (kind, key); the JSON result is kept in scan_cache_dir()."""
    path = scan_cache_dir() / kind / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    value = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(value))
        os.replace(tmp, path)  # atomic: another process (a DDP rank) never reads half a file
    except OSError:
        pass  # a read-only home still trains; it just scans again next time
    return value


def drop_bad_images(samples: list[tuple[Path, int]], on_bad: str = "fail") -> list[tuple[Path, int]]:
    """Check every image; ``on_bad="fail"`` raises naming the files, ``"skip"`` drops them with a warning.

    The scan decodes every file, so its result is cached by :func:`listing_key`: a restart, a resume
    or another rank on the same files reads the verdict instead of decoding everything again.
    """
    if on_bad not in ("fail", "skip"):
        raise ValueError(f"on_bad must be 'fail' or 'skip', got {on_bad!r}")
    paths = [p for p, _ in samples]
    verdict = _cached("scan", listing_key(paths),
                      lambda: {str(p): why for p in paths if (why := image_problem(p))})
    bad = [(p, verdict[str(p)]) for p in paths if str(p) in verdict]
    if not bad:
        return samples
    listing = "\n".join(f"  {p}: {why}" for p, why in bad[:20]) + ("\n  ..." if len(bad) > 20 else "")
    if on_bad == "fail":
        raise ValueError(f"{len(bad)} unreadable image(s) (use --on-bad-image skip to leave them out):\n{listing}")
    print(f"warning: skipping {len(bad)} unreadable image(s):\n{listing}")
    bad_paths = {p for p, _ in bad}
    return [s for s in samples if s[0] not in bad_paths]


def dataset_fingerprint(root: Path) -> str:
    """sha256 over every image's relative path and bytes: the data set's identity in provenance
    (cached by :func:`listing_key`, so only a changed data set is read again)."""
    files = image_files(root)

    def compute() -> str:
        h = hashlib.sha256()
        for p in files:
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
        return h.hexdigest()

    return _cached("fingerprint", listing_key(files), compute)


class TrainTransform:
    """Random resized crop + horizontal flip + colour jitter + normalize, in Pillow/NumPy (training only), with
    the spec's interpolation, channel order and layout.

    Evaluation never uses this: it uses the DALI serving pipeline (core.preprocess).
    """

    def __init__(self, spec: PreprocessSpec, scale: tuple[float, float] = (0.35, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5, color_jitter: float = 0.0):
        self.spec, self.scale, self.ratio, self.hflip, self.jitter = spec, scale, ratio, hflip, color_jitter

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
        img = img.resize((size, size), pillow_filter(self.spec.interpolation), box=self.crop_box(*img.size, rng))
        if rng.random() < self.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.jitter > 0:  # brightness, contrast, saturation, each by a factor in [1-j, 1+j]
            for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                img = enhance(img).enhance(rng.uniform(1 - self.jitter, 1 + self.jitter))
        return torch.from_numpy(to_model_input(np.asarray(img, dtype=np.float32) / 255.0, self.spec))


class EpochSampler(torch.utils.data.Sampler):
    """Wraps a sampler (DistributedSampler) so that each index travels with its epoch: ``(epoch, index)``.

    DataLoader workers hold their own copy of the data set, made when they start; with
    ``persistent_workers`` an epoch set later on the main process's copy never reaches them, and
    every epoch would replay epoch 0's augmentations. Indices are sent to the workers every epoch,
    so the epoch rides along with them.
    """

    def __init__(self, sampler: torch.utils.data.DistributedSampler):
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        epoch = self.sampler.epoch
        return ((epoch, i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def augmentation_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The augmentation randomness of one (seed, epoch, index): the same whatever the worker, the
    number of workers or processes, or an interruption, which exact resume and DDP consistency rely
    on; different in every epoch. (String seeds hash with SHA-512: independent of PYTHONHASHSEED.)"""
    return random.Random(f"{seed}:{epoch}:{index}")


class ImageFolderTrain(torch.utils.data.Dataset):
    """Decodes with the serving decode policy on access; augments with the (seed, epoch, index) RNG.

    Items are addressed by ``(epoch, index)`` (see :class:`EpochSampler`).
    """

    def __init__(self, samples: list[tuple[Path, int]], transform: TrainTransform, seed: int):
        self.samples, self.transform, self.seed = samples, transform, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, i = key
        path, label = self.samples[i]
        try:
            img = decode_image(path.read_bytes())
        except Exception as e:  # name the file: a bare decoder error says nothing about which one
            raise RuntimeError(f"cannot read training image {path}: {e}") from e
        return self.transform(img, augmentation_rng(self.seed, epoch, i)), label
