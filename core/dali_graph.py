"""The DALI preprocessing graph: encoded image bytes -> the model's CHW float input, on CPU or GPU.

The one definition every consumer runs: training's evaluation, ONNX validation and quantization
(core/preprocess.py builds CPU pipelines from it), the embedded server (its pipeline is
serialized from it) and the GPU server, whose DALI backend imports this very file, copied beside
``dali.py`` in the model repository, and serializes it with the server's own DALI. It therefore
imports nothing but DALI, reads the spec by attribute (a PreprocessSpec, or the rendered JSON as a
namespace), and uses only operator arguments that DALI 1.42 (the NGC 24.10 container's) already has.
"""

from __future__ import annotations

from typing import Any

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
    images: Any = fn.decoders.image(encoded, device="mixed" if device == "gpu" else "cpu",
                                    output_type=COLOR_TYPES[spec.color], jpeg_fancy_upsampling=True)
    if spec.resize_policy == "shorter_center_crop":
        images = fn.resize(images, resize_shorter=spec.resize_size, interp_type=interp, antialias=True)
        crop: tuple[int, int] | None = (spec.crop_size, spec.crop_size)
    else:  # stretch
        images = fn.resize(
            images, resize_x=spec.crop_size, resize_y=spec.crop_size, interp_type=interp, antialias=True
        )
        crop = None
    return fn.crop_mirror_normalize(
        images,
        crop=crop,
        mean=[255.0 * m for m in spec.mean],
        std=[255.0 * s for s in spec.std],
        dtype=types.DALIDataType.FLOAT,
        output_layout=spec.layout,
    )
