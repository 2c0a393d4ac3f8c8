"""Sampled requests (served/payloads.py) as an ImageFolder tree by predicted class, for a person to correct.

    python -m training.relabel --samples /var/lib/payloads/classify --out data/relabel
    make relabel SAMPLES=... RELABEL_OUT=...

Each sample with its image goes to ``<out>/<predicted class>/<sha256 prefix>.<jpg|png>`` (the same image
sampled twice is written once); ``<out>/samples.jsonl`` lists what went where with the model's scores.
Move the wrongly classified files to their right folder (or delete them), add a val/ split, and train
on it as on any data set (``make train DATA=...``, or ``--init`` from the served checkpoint).
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import Counter
from pathlib import Path

from served.payloads import read_samples


def relabel(samples: Path, out: Path) -> Counter[str]:
    """Copy the samples' images into ``out`` by predicted class; the images per class."""
    counts: Counter[str] = Counter()
    out.mkdir(parents=True, exist_ok=True)
    with (out / "samples.jsonl").open("a") as index:
        for r in read_samples(samples):
            if r["path"] is None or not r["labels"]:
                continue  # a record without its image (sampled with PAYLOAD_IMAGES=0, or rotated away)
            label = r["labels"][0]
            if "/" in label or label in (".", ".."):
                raise ValueError(f"class name {label!r} cannot be a folder name")
            dest = out / label / (r["sha256"][:16] + r["path"].suffix)
            if dest.exists():
                continue
            dest.parent.mkdir(exist_ok=True)
            shutil.copyfile(r["path"], dest)
            counts[label] += 1
            index.write(json.dumps({"file": str(dest.relative_to(out)), "sha256": r["sha256"], "labels": r["labels"],
                                    "scores": r["scores"], "model": r["model"], "version": r["version"]}) + "\n")
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=Path, required=True, help="the served model's payload folder")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    if not a.samples.is_dir():
        raise SystemExit(f"error: {a.samples} is not a folder of samples")
    counts = relabel(a.samples, a.out)
    print(f"{sum(counts.values())} images -> {a.out}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
