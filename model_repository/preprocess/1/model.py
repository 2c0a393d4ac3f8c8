"""Triton Python-backend model: encoded image bytes -> normalized CHW float, with DALI on the CPU.

Runs the serialized DALI pipeline ``model.dali`` written by ``build.render_repo`` from the same
definition the training package evaluates with (training/preprocess.py). The GPU target runs the
same pipeline in Triton's DALI backend instead.

Bad images never take the server or other requests down: every image is checked, a failed DALI
batch is retried image by image (DALI invalidates a pipeline after an error, so it is rebuilt), and
only the requests holding a bad image get an INVALID_ARG error naming the image's index.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from nvidia.dali import Pipeline

SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"))


def strip_padding(row: np.ndarray) -> bytes:
    """Rows of a batch are zero-padded to a common length. A JPEG ends with FFD9 and a PNG with
    IEND's fixed CRC (AE426082), so trailing zero bytes are always padding."""
    data = row.tobytes()
    return data.rstrip(b"\x00") if data.endswith(b"\x00") else data


def check_image(data: bytes) -> str | None:
    """A reason the bytes cannot be an image we decode, or None."""
    if not data:
        return "empty input: 0 bytes"
    kind = next((name for magic, name in SIGNATURES if data.startswith(magic)), None)
    if kind is None:
        return f"not a JPEG or PNG image (starts with {data[:8].hex(' ')})"
    if kind == "JPEG" and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return f"truncated JPEG: {len(data)} bytes and no end-of-image marker"
    return None


def dali_reason(err: Exception) -> str:
    """DALI's error text holds the pipeline definition's traceback; keep only what the decoder said."""
    text = str(err)
    tail = text.split("encountered:", 1)[1] if "encountered:" in text else text
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip() and "no longer valid" not in ln]
    return lines[-1] if lines else type(err).__name__


class TritonPythonModel:
    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in self.model_config.get("parameters", {}).items()}
        self.max_batch = max(1, int(self.model_config["max_batch_size"]))
        self.num_threads = int(params.get("dali_num_threads", "2"))
        here = Path(args["model_repository"]) / args["model_version"]
        self.serialized = (here / params.get("dali_pipeline", "model.dali")).read_bytes()
        # tensor names come from the rendered config; the DALI external source has the input's name
        self.in_name = self.model_config["input"][0]["name"]
        out = self.model_config["output"][0]
        self.out_name = out["name"]
        self.out_dtype = pb_utils.triton_string_to_numpy(out["data_type"])
        self.pipe = self._build()

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
        """Per image: its array, or an error string. One DALI run for the whole batch when all decode."""
        try:
            return self._run(images)
        except Exception:
            self.pipe = self._build()
        results = []
        for data in images:
            try:
                results.append(self._run([data])[0])
            except Exception as e:
                self.pipe = self._build()
                results.append(f"could not decode the image data, corrupt or unsupported encoding ({dali_reason(e)})")
        return results

    def execute(self, requests):
        # Gather every image of every request, with a reason for those rejected up front.
        per_request, good = [], []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, self.in_name)
            rows = tensor.as_numpy()
            rows = rows.reshape(1, -1) if rows.ndim == 1 else rows
            slots = []
            for row in rows:
                data = strip_padding(row)
                reason = check_image(data)
                if reason is None:
                    slots.append(len(good))
                    good.append(data)
                else:
                    slots.append(reason)
            per_request.append(slots)

        results = self._run_isolating(good) if good else []

        responses = []
        for slots in per_request:
            resolved = [results[s] if isinstance(s, int) else s for s in slots]
            errors = [f"image {i} of {len(resolved)}: {r}" for i, r in enumerate(resolved) if isinstance(r, str)]
            if errors:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError("; ".join(errors), pb_utils.TritonError.INVALID_ARG)))
            else:
                pixels = np.stack(resolved).astype(self.out_dtype, copy=False)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.out_name, pixels)]))
        return responses
