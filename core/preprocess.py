"""The one preprocessing definition: training's eval transform *is* the serving preprocess.

A :class:`PreprocessSpec` travels in every checkpoint and ONNX file. The DALI pipeline below is
built from it for evaluation during training, for ONNX validation, and serialized into the Triton
model repository (CPU device for the embedded target, ``mixed``/GPU for the GPU target). Because
every consumer runs the same decoder and the same resize, the server's inputs equal the inputs the
checkpoint was scored on, by construction.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from core import protocol
from served.stages import Rejected, check_limits

if TYPE_CHECKING:
    from PIL import Image

# ImageNet statistics, the usual default for photos; a checkpoint records whichever it used.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RESIZE_POLICIES = ("shorter_center_crop", "stretch")
# How each consumer resamples: DALI's interp types (antialiased when shrinking), Pillow's filters
INTERPOLATIONS = ("nearest", "linear", "cubic")
COLORS = ("RGB", "BGR")    # channel order of the model input
LAYOUTS = ("CHW", "HWC")   # dimension order of the model input (without the batch)

# The DALI external source is named after the model input: Triton's DALI backend binds them by name.
DALI_INPUT_NAME = protocol.IMAGE

# Inputs refused before decoding (training, evaluation and the served preprocess model alike): a
# 50-megapixel image decodes to 150 MB of RGB, more than any classifier input needs; 32 MiB of
# encoded bytes is more than any camera writes for one photo. Rendered into the served config.
MAX_IMAGE_PIXELS = 50_000_000
MAX_IMAGE_BYTES = 32 * 1024 * 1024
IMAGE_FORMATS = ("JPEG", "PNG")  # what the served ensemble decodes


@dataclass(frozen=True)
class PreprocessSpec:
    """How encoded image bytes become the model's CHW float input.

    ``shorter_center_crop``: resize the shorter side to ``resize_size`` (aspect kept), then take the
    central ``crop_size`` square (the torchvision/ImageNet eval policy). ``stretch``: resize straight
    to ``crop_size`` x ``crop_size``. ``interpolation`` is the resampling of that resize. Mean/std are in
    the 0..1 pixel scale, per channel in ``color`` order; ``layout`` is the input's dimension order. Every
    field is applied alike by the DALI graph (serving, evaluation), the training transform and the
    Pillow path of the baseline (:func:`pillow_preprocess`).
    """

    crop_size: int
    resize_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_policy: str = "shorter_center_crop"
    interpolation: str = "linear"
    color: str = "RGB"
    layout: str = "CHW"

    def __post_init__(self) -> None:
        if self.resize_policy not in RESIZE_POLICIES:
            raise ValueError(f"resize_policy must be one of {RESIZE_POLICIES}, got {self.resize_policy!r}")
        for name, value, allowed in (("interpolation", self.interpolation, INTERPOLATIONS),
                                     ("color", self.color, COLORS), ("layout", self.layout, LAYOUTS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.crop_size <= 0 or self.resize_size < self.crop_size:
            raise ValueError(
                f"need 0 < crop_size <= resize_size, got crop_size={self.crop_size}, resize_size={self.resize_size}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean/std must be 3 values with std > 0, got mean={self.mean}, std={self.std}")

    @classmethod
    def for_size(cls, crop_size: int, **kw: Any) -> PreprocessSpec:
        """The default policy for a crop size: resize the shorter side to crop/0.875 (ImageNet's 224/256)."""
        return cls(crop_size=crop_size, resize_size=int(round(crop_size / 0.875)), **kw)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c = self.crop_size
        return (3, c, c) if self.layout == "CHW" else (c, c, 3)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessSpec:
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


# --------------------------------------------------------------------------------------------
# The decode policy: what every consumer sees for a file
# --------------------------------------------------------------------------------------------
#
# Serving decodes with DALI; training augments with Pillow. Pillow below is made to give DALI's
# pixels exactly (tests/test_decode.py checks it on every variant), so that what training sees is
# what serving computes:
#   * EXIF orientation is applied (a phone photo is upright, as DALI shows it);
#   * grayscale, CMYK, palette and 16-bit images become 8-bit RGB (16-bit: value / 257, rounded);
#   * alpha is dropped: the stored colour is used, not composited on a background;
#   * bytes after a JPEG's end-of-image marker (motion photos) are ignored;
#   * more than MAX_IMAGE_PIXELS pixels or MAX_IMAGE_BYTES bytes is refused before decoding.

# Refused inputs raise the served stages' own exception, with the same messages (served/stages.py).
ImageRejected = Rejected


def open_image(fp: Path | str | BinaryIO, num_bytes: int, max_pixels: int = MAX_IMAGE_PIXELS,
               max_bytes: int = MAX_IMAGE_BYTES) -> Image.Image:
    """Open a JPEG/PNG lazily (header only) and apply the policy's checks: format and size limits.

    ``fp``: a path or a binary file object; ``num_bytes``: its encoded size. Raises ImageRejected."""
    from PIL import Image

    try:
        img = Image.open(fp)
    except Exception as e:
        raise ImageRejected(f"not a decodable JPEG or PNG image ({type(e).__name__}: {e})") from e
    if img.format not in IMAGE_FORMATS:
        img.close()
        raise ImageRejected(f"is {img.format}, not JPEG or PNG")
    try:
        check_limits(num_bytes, *img.size, max_pixels, max_bytes)
    except ImageRejected:
        img.close()
        raise
    return img


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, max_bytes: int = MAX_IMAGE_BYTES) -> Image.Image:
    """Encoded JPEG/PNG bytes -> an RGB ``PIL.Image`` with the serving decoder's pixels."""
    import io

    from PIL import Image, ImageOps

    img = open_image(io.BytesIO(data), len(data), max_pixels, max_bytes)
    img.load()
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit gray: Pillow's convert would clip at 255
        img = Image.fromarray(np.clip(np.round(np.asarray(img, np.float64) / 257), 0, 255).astype(np.uint8))
    return img.convert("RGB")


# --------------------------------------------------------------------------------------------
# The same spec in Pillow and NumPy: the training transform's and the baseline's resize and normalize
# --------------------------------------------------------------------------------------------

def pillow_filter(interpolation: str) -> int:
    """Pillow's resampling filter for a spec's interpolation (its resize is antialiased, as DALI's is)."""
    from PIL import Image

    return {"nearest": Image.Resampling.NEAREST, "linear": Image.Resampling.BILINEAR,
            "cubic": Image.Resampling.BICUBIC}[interpolation]


def library_geometry(height: int, width: int, resize: int, crop: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((height, width) after the shorter side is resized to ``resize``, (top, left) of the centre ``crop``),
    as torchvision's ``Resize`` + ``CenterCrop`` compute them: the long side truncated, the offset rounded
    half to even. The DALI graph computes the same in its own operators (served/dali_graph.py)."""
    if height > width:
        new_h, new_w = int(resize * height / width), resize
    else:
        new_h, new_w = resize, int(resize * width / height)
    return (new_h, new_w), (int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0)))


def to_model_input(rgb: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """An RGB image, HWC float32 in 0..1, as the model takes it: channel order, mean/std, layout."""
    x = rgb[..., ::-1] if spec.color == "BGR" else rgb
    x = (x - np.array(spec.mean, np.float32)) / np.array(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1) if spec.layout == "CHW" else x, dtype=np.float32)


def pillow_preprocess(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    """The naive way: Pillow decode (the decode policy) + resize by the spec's policy and interpolation +
    crop, NumPy normalize, one image at a time (what the baseline server does)."""
    img = decode_image(data)
    resample = pillow_filter(spec.interpolation)
    if spec.resize_policy == "stretch":
        img = img.resize((spec.crop_size, spec.crop_size), resample)
    else:
        (new_h, new_w), (top, left) = library_geometry(img.height, img.width, spec.resize_size, spec.crop_size)
        img = img.resize((new_w, new_h), resample)
        img = img.crop((left, top, left + spec.crop_size, top + spec.crop_size))
    return to_model_input(np.asarray(img, np.float32) / 255.0, spec)


# --------------------------------------------------------------------------------------------
# DALI: one graph, two devices (the graph itself is served/dali_graph.py, which the GPU server's
# DALI backend also imports: see served/models/dali.py)
# --------------------------------------------------------------------------------------------

def build_dali_pipeline(spec: PreprocessSpec, batch_size: int, device: str = "cpu", num_threads: int = 2,
                        device_id: int = 0, build: bool = False) -> Any:
    """A DALI pipeline whose single input is the external source ``IMAGE`` (encoded bytes, uint8); ``build``:
    built, ready to run."""
    from nvidia.dali import pipeline_def

    from served.dali_graph import preprocess_graph

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id if device == "gpu" else None,  # type: ignore[arg-type]  # None = CPU only
        prefetch_queue_depth=1,
        exec_async=False,
        exec_pipelined=False,
    )
    def preprocess() -> Any:
        return preprocess_graph(spec, device, DALI_INPUT_NAME)

    pipe = preprocess()
    if build:
        pipe.build()
    return pipe


class DaliPreprocessor:
    """Runs the CPU pipeline on lists of encoded images: the training package's eval transform."""

    def __init__(self, spec: PreprocessSpec, batch_size: int = 64, num_threads: int = 2):
        self.spec = spec
        self.batch_size = batch_size
        self.pipe = build_dali_pipeline(spec, batch_size, device="cpu", num_threads=num_threads, build=True)

    def __call__(self, encoded: Sequence[bytes]) -> np.ndarray:
        """Encoded images (any count) -> float32 array [N, 3, H, W]."""
        out = []
        for i in range(0, len(encoded), self.batch_size):
            chunk = [np.frombuffer(b, dtype=np.uint8) for b in encoded[i:i + self.batch_size]]
            self.pipe.feed_input(DALI_INPUT_NAME, chunk)
            (batch,) = self.pipe.run()
            out.append(batch.as_array())
        if not out:
            return np.zeros((0, *self.spec.input_shape), np.float32)
        return np.concatenate(out)

    def files(self, paths: Iterable[Path]) -> np.ndarray:
        """Every file's input at once: for small sets; large ones go through :meth:`iter_files`."""
        return self([Path(p).read_bytes() for p in paths])

    def iter_files(self, paths: Sequence[Path]) -> Iterator[np.ndarray]:
        """One batch of inputs at a time, reading only that batch's files: memory stays flat whatever
        the number of images."""
        for i in range(0, len(paths), self.batch_size):
            yield self([Path(p).read_bytes() for p in paths[i:i + self.batch_size]])
