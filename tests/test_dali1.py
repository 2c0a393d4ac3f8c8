"""The served DALI graph under the GPU container's DALI line (1.x): every EXIF orientation and encoding variant of
real photographs decodes, is resized and normalized pixel for pixel as under the project's DALI 2.

DALI 1.x's fn.decoders.image ignores EXIF orientation while its shape peek applies it: a portrait phone photo
would be served unrotated and resized with its sides swapped. served/dali_graph.py takes DALI 1.x's
experimental decoder with adjust_orientation there. DALI 1.42 (the container's) has no real PyPI wheel; 1.53, of
the same line, has, and its CPU decoder runs without a GPU: `make dali1` installs it in .venv-dali1, kept out of
the project's virtualenv, and this test runs the graph there (tests/dali1/decode.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.preprocess import DaliPreprocessor, PreprocessSpec
from training.photo_variants import variants

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv-dali1" / "bin" / "python"


def photographs() -> dict[str, Image.Image]:
    """Two of scikit-image's photographs, one landscape and one portrait, so that a swapped side shows."""
    from skimage import data

    return {"astronaut": Image.fromarray(data.astronaut()).resize((300, 200)),
            "coffee": Image.fromarray(data.coffee()).resize((150, 240))}


@pytest.mark.slow
@pytest.mark.skipif(not PYTHON.exists(), reason="DALI 1.x is not installed: `make dali1` (make test does it)")
def test_the_served_graph_under_dali_1x_decodes_every_variant_as_dali_2_does(tmp_path):
    images, out, path = tmp_path / "images", tmp_path / "out", tmp_path / "path"
    for folder in (images, out, path / "served"):
        folder.mkdir(parents=True)
    for name in ("__init__.py", "dali_graph.py"):  # the graph alone, as the DALI backend loads it
        shutil.copy(ROOT / "served" / name, path / "served" / name)
    for photo, img in photographs().items():
        for variant, blob in variants(img, large=False).items():
            (images / f"{photo}-{variant}.{'png' if variant.startswith('png') else 'jpg'}").write_bytes(blob)
    spec = PreprocessSpec(crop_size=64, resize_size=73, interpolation="cubic")
    (tmp_path / "spec.json").write_text(json.dumps(spec.to_dict()))
    r = subprocess.run([str(PYTHON), str(ROOT / "tests" / "dali1" / "decode.py"), str(tmp_path / "spec.json"),
                        str(images), str(out)], env={"PYTHONPATH": str(path), "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "version.txt").read_text().startswith("1.")
    pre = DaliPreprocessor(spec, batch_size=1)
    files = sorted(images.iterdir())
    assert sum("exif_orientation" in f.name for f in files) == 14
    differ = {}
    for f in files:
        ours, theirs = pre([f.read_bytes()])[0], np.load(out / f"{f.name}.npy")
        if ours.shape != theirs.shape or np.abs(ours - theirs).max() > 1e-5:
            differ[f.name] = float(np.abs(ours - theirs).max()) if ours.shape == theirs.shape else "shape"
    assert differ == {}
