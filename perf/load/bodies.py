"""What a load sends: real JPEGs from an ImageFolder split, and one encoded image as each server takes it
(a KServe v2 binary-tensor request for Triton, the raw bytes, a multipart file upload).

The wrk driver (wrk.py), the peers' readiness probe (perf/reference/peers/launch.py) and the fuzzer
(perf/checks/reliability.py) build their requests here.
"""

from __future__ import annotations

import json
from pathlib import Path

from core import protocol as P


def sample_images(image_dir: Path, limit: int = 64) -> list[tuple[str, bytes]]:
    """Real JPEGs for the load: ``limit`` files spread over the classes of an ImageFolder split."""
    files = sorted(p for p in Path(image_dir).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise FileNotFoundError(f"no JPEGs under {image_dir}")
    step = max(1, len(files) // limit)
    return [(str(p), p.read_bytes()) for p in files[::step][:limit]]


MULTIPART_BOUNDARY = "fair-harness-boundary-7d1c"


def kserve_request(inputs: list[tuple[str, str, list[int], bytes]]) -> tuple[bytes, dict[str, str]]:
    """A KServe v2 binary-tensor request body: JSON header, then each input's raw bytes."""
    header = json.dumps({"inputs": [{"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": len(b)}}
                                    for n, d, s, b in inputs]}).encode()
    return header + b"".join(b for *_, b in inputs), {"Inference-Header-Content-Length": str(len(header)),
                                                      "Content-Type": "application/octet-stream"}


def image_request(blob: bytes) -> tuple[bytes, dict[str, str]]:
    return kserve_request([(P.IMAGE, "UINT8", [1, len(blob)], blob)])


def request_body(blob: bytes, kind: str) -> tuple[bytes, dict[str, str]]:
    """The body and headers that send one encoded image as ``kind``."""
    if kind == "kserve":
        body, headers = kserve_request([(P.IMAGE, "UINT8", [1, len(blob)], blob)])
        return body, {"Content-Type": "application/octet-stream", **headers}
    if kind == "raw":
        return blob, {"Content-Type": "application/octet-stream"}
    if kind == "multipart":
        head = (f"--{MULTIPART_BOUNDARY}\r\n"
                "Content-Disposition: form-data; name=\"images\"; filename=\"image.jpg\"\r\n"
                "Content-Type: image/jpeg\r\n\r\n").encode()
        return head + blob + f"\r\n--{MULTIPART_BOUNDARY}--\r\n".encode(), \
            {"Content-Type": f"multipart/form-data; boundary={MULTIPART_BOUNDARY}"}
    raise ValueError(f"kind must be 'kserve', 'raw' or 'multipart', got {kind!r}")
