"""The artifact metadata contract: what an exported ONNX file says about itself, versioned.

``build.export_onnx`` embeds it under :data:`METADATA_KEY` in the ONNX metadata_props; every later
stage (quantization, engines, the model repository, the reports, the peers) reads it with
:func:`read_metadata`, which refuses any other schema version by name instead of misreading it.
Paths in it are relative to the artifact, and the checkpoint it came from is verified by sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx

# The metadata contract's own key in the ONNX metadata_props ("platform" is a word Triton uses for
# backends) and its version: a reader refuses any other version instead of misreading it.
METADATA_KEY = "image_platform.metadata"
SCHEMA_VERSION = 1
# The exported graph's tensor names (build.export_onnx writes them; the metadata's "export" records them)
INPUT_NAME, OUTPUT_NAME = "input", "logits"
# A second output, the softmax of the logits: a server answers top-k labels from it with Triton's
# classification extension (label_filename + class_count), with no Python model on the request path
PROBABILITIES_NAME = "probabilities"


def read_metadata(model: onnx.ModelProto | Path | str) -> dict[str, Any]:
    """The metadata contract embedded by ``build.export_onnx`` (classes, preprocess, arch, provenance)."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        old = " (it has the unversioned 'platform' metadata of an older export)" if "platform" in props else ""
        raise ValueError(f"ONNX model has no '{METADATA_KEY}' metadata{old}: export it with `make onnx` "
                         f"(build.export_onnx)")
    meta: dict[str, Any] = json.loads(props[METADATA_KEY])
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"ONNX metadata schema version {meta.get('schema_version')}, this code reads version "
                         f"{SCHEMA_VERSION}: export it again with `make onnx`")
    return meta


def rebase_metadata(meta: dict[str, Any], from_dir: Path, to_dir: Path) -> dict[str, Any]:
    """A copy of ``meta`` for an artifact written to ``to_dir`` (paths in it are relative to the artifact)."""
    m: dict[str, Any] = json.loads(json.dumps(meta))
    if m["source"].get("checkpoint") is not None:  # an imported model has none
        ckpt = Path(from_dir).resolve() / m["source"]["checkpoint"]
        m["source"]["checkpoint"] = os.path.relpath(ckpt, Path(to_dir).resolve())
    return m


def source_checkpoint(onnx_path: Path, meta: dict[str, Any] | None = None) -> Path:
    """The checkpoint an ONNX artifact was exported from: found relative to the artifact (so artifacts
    move together, into a container or to another machine) and verified by its sha256, so a retrained
    checkpoint is never taken as the reference for an older ONNX."""
    meta = meta if meta is not None else read_metadata(onnx_path)
    src = meta["source"]
    if src.get("checkpoint") is None:
        raise ValueError(f"{onnx_path} was imported from {src.get('imported')} (make import), not exported from a "
                         "checkpoint of this project: there is no PyTorch model to compare with or to serve naively")
    path = Path(onnx_path).resolve().parent / src["checkpoint"]
    if not path.is_file():
        raise FileNotFoundError(f"{onnx_path} was exported from {src['checkpoint']} (relative to the ONNX file), "
                                f"which is not at {path}")
    digest = file_sha256(path)
    if digest != src["checkpoint_sha256"]:
        raise ValueError(f"{path} is not the checkpoint {onnx_path} was exported from (sha256 {digest[:12]}..., "
                         f"expected {src['checkpoint_sha256'][:12]}...): it was retrained or replaced; "
                         f"export again with `make onnx`")
    return path


def parameter_count(path: Path) -> int:
    """The weights of an ONNX graph (its initializers' elements): the parameter count reports name."""
    import onnx

    return sum(math.prod(t.dims) for t in onnx.load(str(path)).graph.initializer)


def has_checkpoint(meta: dict[str, Any]) -> bool:
    """Whether an artifact was exported from a PyTorch checkpoint of this project (not imported)."""
    return meta["source"].get("checkpoint") is not None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    """The versions of what made an artifact (those installed; torch and DALI only where present)."""
    import numpy
    import PIL

    versions = {"python": sys.version.split()[0], "numpy": numpy.__version__, "pillow": PIL.__version__}
    for name, module in (("torch", "torch"), ("nvidia-dali", "nvidia.dali")):
        with contextlib.suppress(ImportError):
            versions[name] = str(__import__(module, fromlist=["__version__"]).__version__)  # a plain str
    return versions


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
