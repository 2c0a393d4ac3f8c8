"""Every field of the preprocessing spec does what it says, alike in the DALI graph (serving, evaluation),
the training transform and the baseline's Pillow path, on real photos (scikit-image's)."""

from __future__ import annotations

import io
import random
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from core.preprocess import (
    INTERPOLATIONS,
    RESIZE_POLICIES,
    DaliPreprocessor,
    PreprocessSpec,
    decode_image,
    pillow_preprocess,
)
from training.data import TrainTransform

SIZE = 64


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    out = []
    for name in ("astronaut", "chelsea", "coffee"):  # 512x512, 451x300, 600x400
        buf = io.BytesIO()
        Image.fromarray(getattr(skdata, name)()).save(buf, "JPEG", quality=92)
        out.append(buf.getvalue())
    return out


def served(spec: PreprocessSpec, photos: list[bytes]) -> np.ndarray:
    return DaliPreprocessor(spec, batch_size=len(photos), num_threads=1)(photos)


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


@pytest.mark.parametrize("policy", RESIZE_POLICIES)
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_baseline_pillow_path_computes_what_dali_serves(photos, policy, interpolation):
    """The baseline's Pillow path follows the spec's resize policy and interpolation as DALI does: it is
    close to DALI's output with the same spec, and several times further from DALI with any other value."""
    spec = PreprocessSpec.for_size(SIZE, resize_policy=policy, interpolation=interpolation)
    pil = np.stack([pillow_preprocess(b, spec) for b in photos])
    assert pil.shape == (len(photos), *spec.input_shape)
    same = mean_abs(served(spec, photos), pil)
    assert same < 0.03, f"{policy}/{interpolation}: Pillow and DALI differ by {same:.4f} on average"
    others = [replace(spec, interpolation=o) for o in INTERPOLATIONS if o != interpolation]
    others.append(replace(spec, resize_policy=next(p for p in RESIZE_POLICIES if p != policy)))
    for other in others:
        assert mean_abs(served(other, photos), pil) > 3 * same, f"{other} is as close as {spec}"


def test_channel_order_and_layout_are_applied_everywhere(photos):
    """BGR reverses the channels and HWC moves them last, in DALI, in the baseline's path and in the
    training transform alike (mean/std equal per channel, so only the order differs)."""
    rgb = PreprocessSpec.for_size(SIZE, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    bgr, hwc = replace(rgb, color="BGR"), replace(rgb, layout="HWC")
    assert hwc.input_shape == (SIZE, SIZE, 3)
    assert rgb.input_shape == (3, SIZE, SIZE)
    for run in (lambda s: served(s, photos), lambda s: np.stack([pillow_preprocess(b, s) for b in photos])):
        x = run(rgb)
        np.testing.assert_allclose(run(bgr), x[:, ::-1], atol=1e-6)
        np.testing.assert_allclose(run(hwc), x.transpose(0, 2, 3, 1), atol=1e-6)
    img = decode_image(photos[1])
    out = {s.color + s.layout: TrainTransform(s)(img, random.Random(0)).numpy() for s in (rgb, bgr, hwc)}
    np.testing.assert_allclose(out["BGRCHW"], out["RGBCHW"][::-1], atol=1e-6)
    np.testing.assert_allclose(out["RGBHWC"], out["RGBCHW"].transpose(1, 2, 0), atol=1e-6)


def test_training_transform_resamples_with_the_specs_interpolation(photos):
    img = decode_image(photos[0])
    by_interp = {i: TrainTransform(PreprocessSpec.for_size(SIZE, interpolation=i))(img, random.Random(3)).numpy()
                 for i in INTERPOLATIONS}
    for a in INTERPOLATIONS:
        for b in INTERPOLATIONS:
            if a < b:
                assert mean_abs(by_interp[a], by_interp[b]) > 1e-3, f"{a} and {b} resample alike"


@pytest.mark.parametrize("field,value", [("interpolation", "lanczos"), ("color", "RGBA"), ("layout", "NCHW"),
                                         ("resize_policy", "pad")])
def test_a_value_no_consumer_applies_is_refused_by_name(field, value):
    with pytest.raises(ValueError, match=f"{field} must be one of"):
        PreprocessSpec.from_dict({**PreprocessSpec.for_size(SIZE).to_dict(), field: value})


@pytest.mark.parametrize("interpolation", ["linear", "cubic"])
def test_served_pixels_are_the_libraries_eval_transform(interpolation):
    """With a library model's spec (224 of 256, as torchvision's and timm's eval transforms), the DALI graph
    serves what torchvision's Resize + CenterCrop compute in Pillow, to within the resampling kernels'
    rounding, on real photos of landscape, portrait and square shapes whose resized long side and crop
    offset fall on every rounding case (truncated, not rounded; offsets rounded half to even)."""
    import torch
    from torchvision import transforms as T

    spec = PreprocessSpec(crop_size=224, resize_size=256, interpolation=interpolation)
    mode = {"linear": T.InterpolationMode.BILINEAR, "cubic": T.InterpolationMode.BICUBIC}[interpolation]
    library = T.Compose([T.Resize(256, mode), T.CenterCrop(224), T.PILToTensor()])
    astronaut, chelsea = skdata.astronaut(), skdata.chelsea()
    pictures = [astronaut, chelsea, chelsea.transpose(1, 0, 2), skdata.coffee()]
    pictures += [astronaut[:300, :w] for w in (301, 303, 305, 307, 311)]  # long sides 256..265 at 256
    encoded = []
    for rgb in pictures:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(rgb)).save(buf, "PNG")  # lossless: the geometry is what differs
        encoded.append(buf.getvalue())
    levels = np.array(spec.std, np.float32).reshape(3, 1, 1) * 255
    mean = np.array(spec.mean, np.float32).reshape(3, 1, 1) * 255
    for data, dali in zip(encoded, served(spec, encoded), strict=True):
        ref = library(decode_image(data)).to(torch.float32).numpy()
        diff = np.abs(dali * levels + mean - ref)
        assert diff.max() <= 8, (Image.open(io.BytesIO(data)).size, diff.max(), diff.mean())
        assert diff.mean() < 0.3, (Image.open(io.BytesIO(data)).size, diff.max(), diff.mean())


def test_library_fidelity_measures_agreement_with_the_library_transform(checkpoint, tiny_data):
    """perf.experiments.library_fidelity --checkpoint: the network's top-1 through the served graph and through
    torchvision's transform, per interpolation mode, with the pixel differences behind it."""
    from perf.experiments.library_fidelity import agreement, agreement_markdown

    rows = agreement(str(checkpoint), str(tiny_data / "val"))
    assert [r["interpolation"] for r in rows] == ["linear", "cubic"]
    assert all(r["images"] == len(list((tiny_data / "val").rglob("*.jpg"))) for r in rows)
    assert all(r["agreement"] >= 0.98 and r["max_levels"] <= 8 for r in rows), rows
    assert "| linear (trained) |" in agreement_markdown(rows)
