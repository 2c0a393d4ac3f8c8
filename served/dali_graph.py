"""The DALI preprocessing graph: encoded image bytes -> the model's CHW float input, on CPU or GPU.

The one definition every consumer runs: training's evaluation, ONNX validation and quantization
(core/preprocess.py builds CPU pipelines from it), the embedded server (its pipeline is
serialized from it) and the GPU server, whose DALI backend imports this very file, copied with the
served package beside ``dali.py`` in the model repository, and serializes it with the server's own DALI. It therefore
imports nothing but DALI, reads the spec by attribute (a PreprocessSpec, or the rendered JSON as a
namespace), and uses only operator arguments that DALI 1.42 (the NGC 24.10 container's) already has.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import nvidia.dali
from nvidia.dali import fn, types


def preprocess_graph(spec: Any, device: str, input_name: str) -> Any:
    """The pipeline body: an external source named ``input_name`` (the model input, which the DALI
    backend binds by name) through :func:`dali_graph`."""
    encoded = fn.external_source(name=input_name, dtype=types.DALIDataType.UINT8, device="cpu")
    return dali_graph(encoded, spec, device)


# the spec's interpolation and channel order in DALI's terms (core/preprocess.py validates the names)
INTERP = types.DALIInterpType
INTERP_TYPES = {"nearest": INTERP.INTERP_NN, "linear": INTERP.INTERP_LINEAR, "cubic": INTERP.INTERP_CUBIC}
COLOR_TYPES = {"RGB": types.DALIImageType.RGB, "BGR": types.DALIImageType.BGR}


def dali_graph(encoded: Any, spec: Any, device: str) -> Any:
    """decode -> resize -> (crop) -> normalize -> the spec's layout, float32, on ``device`` ("cpu" or "gpu")."""
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    interp = INTERP_TYPES[spec.interpolation]
    # "mixed" = nvJPEG: parse on the host, decode on the GPU; everything after stays on the GPU.
    # jpeg_fancy_upsampling: nvJPEG upsamples 4:2:0 chroma (most cameras' JPEGs) as libjpeg-turbo does
    # on the CPU; without it the two devices' pixels differ. The CPU decoder always does so.
    images: Any = decoder()(encoded, device="mixed" if device == "gpu" else "cpu",
                            output_type=COLOR_TYPES[spec.color], jpeg_fancy_upsampling=True)
    if spec.resize_policy == "shorter_center_crop":
        (new_h, new_w), (top, left) = library_geometry(encoded, spec.resize_size, spec.crop_size)
        images = fn.resize(images, resize_x=fn.cast(new_w, dtype=types.DALIDataType.FLOAT),
                           resize_y=fn.cast(new_h, dtype=types.DALIDataType.FLOAT), interp_type=interp,
                           antialias=True)
        images = fn.slice(images, start=fn.stack(top, left), shape=[spec.crop_size, spec.crop_size],
                          axis_names="HW")
    else:  # stretch
        images = fn.resize(
            images, resize_x=spec.crop_size, resize_y=spec.crop_size, interp_type=interp, antialias=True
        )
    return fn.crop_mirror_normalize(
        images,
        mean=[255.0 * m for m in spec.mean],
        std=[255.0 * s for s in spec.std],
        dtype=types.DALIDataType.FLOAT,
        output_layout=spec.layout,
    )


def dali_major() -> int:
    return int(nvidia.dali.__version__.split(".")[0])


def decoder() -> Any:
    """The image decoder that applies EXIF orientation, as training's and the peek's decode does. DALI 2's
    fn.decoders.image does; DALI 1.x's (1.42 in the 24.10 container) ignores it ("EXIF orientation metadata is
    disregarded"), so a phone's portrait photo would be served unrotated and, the peeked shape being rotated,
    resized with its sides swapped: there the experimental (nvImageCodec) decoder, asked to rotate."""
    if dali_major() >= 2:
        return fn.decoders.image
    return partial(fn.experimental.decoders.image, adjust_orientation=True)


def library_geometry(encoded: Any, resize: int, crop: int) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """The resized (height, width) and the centre crop's (top, left) of each image, as torchvision's
    ``Resize(resize)`` + ``CenterCrop(crop)`` (and timm's eval transform, built from them) compute them.

    DALI's own ``resize_shorter`` rounds the long side and its crop rounds the centre half up; the
    libraries truncate the long side (``int(resize * long / short)``) and round the offset half to even
    (Python's ``round``). Either is one pixel off the other on many photos, tens of levels at the edges,
    so the graph computes the libraries' numbers from each image's shape (read from its header, with its
    EXIF orientation, on the CPU: argument inputs must be CPU data on either device).
    core/preprocess.py ``library_geometry`` is the same arithmetic in Python, for Pillow."""
    # DALI 2 moved the orientation-aware peek out of ``experimental``; 1.42 (the 24.10 image's) has it there
    peek = fn.peek_image_shape if dali_major() >= 2 else fn.experimental.peek_image_shape
    shape = peek(encoded, dtype=types.DALIDataType.INT32)
    h, w = shape[0], shape[1]
    portrait = h > w  # the bools of a comparison act as 0/1 in DALI's arithmetic
    landscape = 1 - portrait
    new_h = portrait * (resize * h // w) + landscape * resize
    new_w = landscape * (resize * w // h) + portrait * resize
    return (new_h, new_w), (_half_even_centre(new_h - crop), _half_even_centre(new_w - crop))


def _half_even_centre(excess: Any) -> Any:
    """round(excess / 2) with ties to even: ``k`` for an even excess ``2k``, else the even one of k, k+1."""
    k = excess // 2
    odd = excess - 2 * k
    return k + odd * (k - 2 * (k // 2))
