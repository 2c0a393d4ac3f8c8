"""Real-photo variants of an image: the encodings a phone, a scanner or an editor produces.

Each variant shows the same picture as its original once decoded by the decode policy
(core.preprocess): a classifier must give it the same class, in training, in ``make eval`` and
when served. tests/test_decode.py checks exactly that.

    python -m training.photo_variants data/synthetic/val/circle/0000.jpg --out /tmp/variants
"""

from __future__ import annotations

import argparse
import io
import math
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112
# For EXIF orientation n, the stored pixels are the upright picture transformed by STORE[n]; a viewer
# (and the decode policy) undoes it. Orientation 1 is upright.
STORE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
         5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
         8: Image.Transpose.ROTATE_270}
LARGE_PIXELS = 8000 * 6000  # a 48-megapixel phone photo: under the default limit of 50


def _encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png16(rgb: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one): each 8-bit value v becomes v * 257."""
    h, w, _ = rgb.shape
    rows = (rgb.astype(">u2") * 257).reshape(h, w * 3)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def variants(upright: Image.Image, large: bool = True) -> dict[str, bytes]:
    """name -> encoded bytes, every one showing ``upright`` (an RGB image) once decoded."""
    upright = upright.convert("RGB")
    out: dict[str, bytes] = {}
    for n, op in STORE.items():
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = n
        out[f"exif_orientation_{n}"] = _encode(upright.transpose(op), quality=95, exif=exif.tobytes())
    out["grayscale_jpeg"] = _encode(upright.convert("L"), quality=95)
    out["cmyk_jpeg"] = _encode(upright.convert("CMYK"), quality=95)
    out["progressive_jpeg"] = _encode(upright, quality=95, progressive=True)
    # chroma subsampling: phones write 4:2:0, editors and "maximum quality" exports 4:4:4, some cameras 4:2:2;
    # the GPU decoder (nvJPEG) upsamples chroma with code of its own
    for name, subsampling in (("jpeg_420", 2), ("jpeg_422", 1), ("jpeg_444", 0)):
        out[name] = _encode(upright, quality=90, subsampling=subsampling)
    out["progressive_jpeg_444"] = _encode(upright, quality=90, subsampling=0, progressive=True)
    rgba = np.dstack([np.asarray(upright), np.full(upright.size[::-1], 128, np.uint8)])
    rgba[: rgba.shape[0] // 2, :, 3] = 0  # half transparent, half translucent: the stored colour still counts
    out["png_alpha"] = _encode(Image.fromarray(rgba, "RGBA"), "PNG")
    out["png_palette"] = _encode(upright.convert("P", palette=Image.Palette.ADAPTIVE, colors=256), "PNG")
    out["png_16bit"] = png16(np.asarray(upright))
    # a motion photo: the video follows the JPEG's end-of-image marker
    rng = np.random.default_rng(0)
    out["jpeg_trailing_bytes"] = _encode(upright, quality=95) + b"\x00\x00\x00\x18ftypmp42" + \
        rng.integers(0, 256, 64 * 1024, dtype=np.uint8).tobytes()
    if large:
        f = math.sqrt(LARGE_PIXELS / (upright.width * upright.height))
        big = upright.resize((int(upright.width * f), int(upright.height * f)), Image.Resampling.BICUBIC)
        out["large_48mp_jpeg"] = _encode(big, quality=85)
    return out


def reference(name: str, upright: Image.Image) -> Image.Image:
    """What a variant should decode to: the upright picture, in gray for the grayscale one."""
    return upright.convert("L").convert("RGB") if name == "grayscale_jpeg" else upright.convert("RGB")


def main() -> None:
    from core.preprocess import decode_image

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("image", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--no-large", action="store_true", help="leave out the 48-megapixel variant")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    for name, data in variants(decode_image(a.image.read_bytes()), large=not a.no_large).items():
        ext = ".png" if name.startswith("png") else ".jpg"
        (a.out / f"{a.image.stem}_{name}{ext}").write_bytes(data)
    print(f"wrote {len(list(a.out.iterdir()))} files to {a.out}")


if __name__ == "__main__":
    main()
