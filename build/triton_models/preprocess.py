"""Triton Python-backend model: encoded image bytes -> normalized CHW float, with DALI on the CPU.

Runs the serialized DALI pipeline ``model.dali``, which ``build.render_repo`` serializes from
``dali.py`` beside it: the graph the training package evaluates with (core/dali_graph.py). The
GPU target's DALI backend serializes the same ``dali.py`` itself, with its own DALI.

Bad images never take the server or other requests down: every image's header is read first (format,
size limits, truncation), a DALI batch that fails to decode is retried image by image (DALI
invalidates a pipeline after an error, so it is rebuilt), and only the requests holding a bad image
get an INVALID_ARG error naming the image's index. A failure that is not the image's fault (out of
memory, a broken pipeline) is INTERNAL for the requests of that batch, is logged, and is not retried
image by image. Bytes after a JPEG's end-of-image marker (motion photos) are ignored, as DALI's and
Pillow's decoders do, so serving agrees with training (core/preprocess.py: the decode policy).
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from nvidia.dali import Pipeline

SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"))
# JPEG start-of-frame markers (they carry the image size): C0-CF except DHT (C4), JPG (C8), DAC (CC)
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class Rejected(ValueError):
    """The image's own fault: answered INVALID_ARG with this message."""


def jpeg_extent(data: bytes) -> tuple[int, int, int]:
    """(width, height, end) of a baseline or progressive JPEG; ``end`` is just past its end-of-image
    marker. Walks the marker segments and the entropy-coded data (cheap: bytes.find), so a file cut
    short is caught here with a clear message, and trailing bytes are located, not guessed at."""
    n, pos, size = len(data), 2, None
    truncated = Rejected(f"truncated JPEG: {n} bytes and no end-of-image marker")
    while True:
        if pos >= n:
            raise truncated
        if data[pos] != 0xFF:
            raise Rejected(f"corrupt JPEG: expected a marker at byte {pos}")
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            raise truncated
        marker, pos = data[pos], pos + 1
        if marker == 0xD9:  # end of image
            if size is None:
                raise Rejected("corrupt JPEG: no frame header before the end-of-image marker")
            return size[0], size[1], pos
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            continue
        if pos + 2 > n:
            raise truncated
        end = pos + int.from_bytes(data[pos:pos + 2], "big")
        if end > n:
            raise truncated
        if marker in SOF_MARKERS and end - pos >= 7:
            if data[pos + 2] != 8:  # DALI (and Pillow, which training decodes with) read 8-bit samples only
                raise Rejected(f"unsupported JPEG: {data[pos + 2]}-bit samples (8-bit JPEGs are served)")
            size = (int.from_bytes(data[pos + 5:pos + 7], "big"), int.from_bytes(data[pos + 3:pos + 5], "big"))
        pos = end
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next marker
            if size is None:
                raise Rejected("corrupt JPEG: scan data before a frame header")
            while True:
                j = data.find(b"\xff", pos)
                if j < 0 or j + 1 >= n:
                    raise truncated
                following = data[j + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7:  # stuffed byte, restart marker
                    pos = j + 2
                elif following == 0xFF:  # fill byte before a marker
                    pos = j + 1
                else:
                    pos = j
                    break


def png_extent(data: bytes) -> tuple[int, int, int]:
    """(width, height, end) of a PNG; ``end`` is just past its IEND chunk."""
    n, pos, size = len(data), 8, None
    while True:
        if pos + 8 > n:
            raise Rejected(f"truncated PNG: {n} bytes and no IEND chunk")
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        if kind == b"IHDR" and length >= 8 and pos + 16 <= n:
            size = (int.from_bytes(data[pos + 8:pos + 12], "big"), int.from_bytes(data[pos + 12:pos + 16], "big"))
        pos += 12 + length
        if kind == b"IEND":
            if pos > n:
                raise Rejected(f"truncated PNG: {n} bytes, IEND cut short")
            if size is None:
                raise Rejected("corrupt PNG: no IHDR chunk")
            return size[0], size[1], pos


def strip_padding(row: np.ndarray) -> bytes:
    """Rows of a batch are zero-padded to a common length. A JPEG ends with FFD9 and a PNG with
    IEND's fixed CRC (AE426082), so trailing zero bytes are always padding."""
    data = row.tobytes()
    return data.rstrip(b"\x00") if data.endswith(b"\x00") else data


def check_image(data: bytes, max_pixels: int, max_bytes: int) -> bytes:
    """The encoded image without trailing bytes, ready for DALI; raises Rejected saying why not."""
    if not data:
        raise Rejected("empty input: 0 bytes")
    if len(data) > max_bytes:
        raise Rejected(f"image is {len(data)} bytes, over the limit of {max_bytes} bytes")
    kind = next((name for magic, name in SIGNATURES if data.startswith(magic)), None)
    if kind is None:
        raise Rejected(f"not a JPEG or PNG image (starts with {data[:8].hex(' ')})")
    width, height, end = (jpeg_extent if kind == "JPEG" else png_extent)(data)
    if width * height > max_pixels:
        raise Rejected(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} pixels")
    if width == 0 or height == 0:
        raise Rejected(f"corrupt {kind}: {width}x{height} pixels")
    return data[:end]


def is_decode_failure(err: Exception) -> bool:
    """Whether DALI failed on the image data (its fault) rather than on resources or itself (ours)."""
    text = str(err)
    if isinstance(err, MemoryError) or any(s in text for s in ("bad_alloc", "out of memory", "Out of memory")):
        return False
    return any(s in text for s in ("Failed to decode", "Could not decode", "nvImageCodec", "Unsupported"))


def dali_reason(err: Exception) -> str:
    """DALI's error text holds the pipeline definition's traceback; keep only what the decoder said."""
    text = str(err)
    tail = text.split("encountered:", 1)[1] if "encountered:" in text else text
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip() and "no longer valid" not in ln]
    return lines[-1] if lines else type(err).__name__


class Preprocessor:
    """The stage without Triton's request objects (also run by the fused model, build/triton_models/fused.py):
    per request, its rows of encoded images in; its pixels, or why its images were refused, out."""

    def __init__(self, serialized: bytes, in_name: str, max_batch: int, num_threads: int, max_pixels: int,
                 max_bytes: int):
        self.serialized, self.in_name, self.max_batch = serialized, in_name, max(1, max_batch)
        self.num_threads, self.max_pixels, self.max_bytes = num_threads, max_pixels, max_bytes
        self.pipe = self._build()

    @classmethod
    def from_config(cls, config: dict, here: Path) -> "Preprocessor":
        """From a rendered config's parameters; ``here``: the version folder holding the serialized pipeline."""
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        # the DALI external source has the model's input name
        return cls((here / params.get("dali_pipeline", "model.dali")).read_bytes(), config["input"][0]["name"],
                   int(config["max_batch_size"]), int(params.get("dali_num_threads", "1")),
                   int(params["max_image_pixels"]), int(params["max_image_bytes"]))

    def _build(self):
        pipe = Pipeline.deserialize(serialized_pipeline=self.serialized, batch_size=self.max_batch,
                                    num_threads=self.num_threads, device_id=None, prefetch_queue_depth=1,
                                    exec_async=False, exec_pipelined=False)
        pipe.build()
        return pipe

    def _run(self, images: list) -> list:
        outs = []
        for i in range(0, len(images), self.max_batch):
            self.pipe.feed_input(self.in_name, [np.frombuffer(b, np.uint8) for b in images[i:i + self.max_batch]])
            (batch,) = self.pipe.run()
            outs.extend(batch.as_array())
        return outs

    def _run_isolating(self, images: list) -> list:
        """Per image: its array, or a Rejected. One DALI run for the whole batch when all decode.

        A failure that is not a decode failure propagates (INTERNAL): retrying image by image would
        only repeat it, once per image."""
        try:
            return self._run(images)
        except Exception as e:
            self.pipe = self._build()
            if not is_decode_failure(e):
                raise
        results = []
        for data in images:
            try:
                results.append(self._run([data])[0])
            except Exception as e:
                self.pipe = self._build()
                if not is_decode_failure(e):
                    raise
                results.append(Rejected(f"could not decode the image data, corrupt or unsupported encoding "
                                        f"({dali_reason(e)})"))
        return results

    def decode(self, per_request: list) -> list:
        """Per request (an array of rows, or one row): its pixels (N, C, H, W) float32, or a Rejected naming
        each bad image by its index. Raises on a failure that is not the images' fault."""
        slots_per_request, good = [], []
        for rows in per_request:  # gather every image of every request, refusing bad ones up front
            rows = rows.reshape(1, -1) if rows.ndim == 1 else rows
            slots = []
            for row in rows:
                try:
                    good.append(check_image(strip_padding(row), self.max_pixels, self.max_bytes))
                    slots.append(len(good) - 1)
                except Rejected as e:
                    slots.append(e)
            slots_per_request.append(slots)
        results = self._run_isolating(good) if good else []
        out = []
        for slots in slots_per_request:
            resolved = [results[s] if isinstance(s, int) else s for s in slots]
            errors = [f"image {i} of {len(resolved)}: {r}" for i, r in enumerate(resolved) if isinstance(r, Rejected)]
            out.append(Rejected("; ".join(errors)) if errors else np.stack(resolved))
        return out


def internal_error(stage: str, err: Exception):
    """Not the images' fault: every request of the batch fails with this, and it is logged."""
    message = f"{stage} failed internally ({type(err).__name__}: {dali_reason(err)})"
    pb_utils.Logger.log_error(message)
    return pb_utils.TritonError(message, pb_utils.TritonError.INTERNAL)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.stage = Preprocessor.from_config(config, Path(args["model_repository"]) / args["model_version"])
        out = config["output"][0]  # tensor names come from the rendered config
        self.out_name, self.out_dtype = out["name"], pb_utils.triton_string_to_numpy(out["data_type"])

    def execute(self, requests):
        try:
            decoded = self.stage.decode([pb_utils.get_input_tensor_by_name(r, self.stage.in_name).as_numpy()
                                         for r in requests])
        except Exception as e:
            error = internal_error("preprocess", e)
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        return [pb_utils.InferenceResponse(error=pb_utils.TritonError(str(d), pb_utils.TritonError.INVALID_ARG))
                if isinstance(d, Rejected) else
                pb_utils.InferenceResponse([pb_utils.Tensor(self.out_name, d.astype(self.out_dtype, copy=False))])
                for d in decoded]
