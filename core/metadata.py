"""The artifact metadata contract: what an exported ONNX file says about itself, versioned.

``build.export_onnx`` embeds it under :data:`METADATA_KEY` in the ONNX metadata_props; every later
stage (quantization, engines, the model repository, the reports, the peers) reads it with
:func:`read_metadata` as a frozen :class:`ArtifactMetadata`, whose ``from_dict`` upgrades an older
schema version in one place (:data:`UPGRADERS`) and refuses a newer or unknown one by name instead of
misreading it. Paths in it are relative to the artifact, and the checkpoint it came from is verified by
sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from core.preprocess import PreprocessSpec

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

# The dict of each older schema version is turned into the next version's by UPGRADERS[version], applied in
# sequence up to SCHEMA_VERSION before ArtifactMetadata.from_dict reads it: the one place an older
# version is upgraded (Triton Model Navigator's Status.from_dict pattern). There is none yet: version 1 is
# the first versioned schema. The unversioned 'platform' metadata before it is refused by name, not
# upgraded (read_metadata): its checkpoint path is absolute and its graph has no softmax output, which
# no change to the metadata can add. Within version 1, the keys later writers added are optional
# (ArtifactMetadata.pretrained, ExportInfo.probabilities, .reference, .fixed_batch): an older file reads back
# as it is.
Upgrader = Callable[[dict[str, Any]], dict[str, Any]]
UPGRADERS: dict[int, Upgrader] = {}


class MetadataError(ValueError):
    """Metadata this code cannot read: no metadata, another schema version, or a key missing."""


def _json_copy(value: Any) -> Any:
    """A deep copy of JSON data (the dicts a dataclass hands out are never its own)."""
    return json.loads(json.dumps(value))


def _extra(d: Mapping[str, Any], known: Iterable[str]) -> dict[str, Any]:
    """The keys of ``d`` this code does not know: kept, and written back after the known ones."""
    names = set(known)
    return {k: v for k, v in d.items() if k not in names}


@dataclass(frozen=True)
class CheckpointSource:
    """An artifact exported from a checkpoint of this project (build.export_onnx)."""

    checkpoint: str  # the checkpoint's path, relative to the artifact's folder
    checkpoint_sha256: str
    training_provenance: Mapping[str, Any]  # the checkpoint's "provenance" (data set, seed, versions, commit)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CheckpointSource:
        return cls(checkpoint=d["checkpoint"], checkpoint_sha256=d["checkpoint_sha256"],
                   training_provenance=d["training_provenance"],
                   extra=_extra(d, ("checkpoint", "checkpoint_sha256", "training_provenance")))

    def to_dict(self) -> dict[str, Any]:
        d = {"checkpoint": self.checkpoint, "checkpoint_sha256": self.checkpoint_sha256,
             "training_provenance": self.training_provenance, **self.extra}
        return dict(_json_copy(d))


@dataclass(frozen=True)
class ImportedSource:
    """An artifact imported from an ONNX file trained elsewhere (build.import_onnx): no checkpoint."""

    imported: str  # the absolute path of the file imported
    imported_sha256: str
    labels_sha256: str
    preprocessing_like: str | None  # the torchvision/timm model whose eval transform was taken, else None
    fixes: Mapping[str, Any]  # what the import fixed in the graph
    extra: Mapping[str, Any] = field(default_factory=dict)

    checkpoint: ClassVar[None] = None  # written as null: the key says there is no checkpoint

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImportedSource:
        return cls(imported=d["imported"], imported_sha256=d["imported_sha256"], labels_sha256=d["labels_sha256"],
                   preprocessing_like=d["preprocessing_like"], fixes=d["fixes"],
                   extra=_extra(d, ("checkpoint", "imported", "imported_sha256", "labels_sha256",
                                    "preprocessing_like", "fixes")))

    def to_dict(self) -> dict[str, Any]:
        d = {"checkpoint": None, "imported": self.imported, "imported_sha256": self.imported_sha256,
             "labels_sha256": self.labels_sha256, "preprocessing_like": self.preprocessing_like,
             "fixes": self.fixes, **self.extra}
        return dict(_json_copy(d))


Source = CheckpointSource | ImportedSource


def source_from_dict(d: Mapping[str, Any]) -> Source:
    return ImportedSource.from_dict(d) if d.get("checkpoint") is None else CheckpointSource.from_dict(d)


# ExportInfo's optional keys, in the order the writers append them; None = not written
_EXPORT_OPTIONAL = ("reference", "derived_from_sha256", "calibration_images", "calibration_method", "kept_fp32",
                    "fixed_batch")
_EXPORT_KNOWN = ("opset", "input", "output", "probabilities", "precision", "versions", *_EXPORT_OPTIONAL)


@dataclass(frozen=True)
class ExportInfo:
    """How the artifact was written: its graph's tensor names, its precision, and for a converted file
    (build.quantize) what it was derived from and calibrated on."""

    opset: int
    input: str
    output: str  # the logits
    precision: str  # fp32 | fp16 | int8
    versions: Mapping[str, str]  # the libraries that wrote it
    probabilities: str | None = None  # the softmax output; None: exported before it was added
    # the exported model's answers on its val split (served.stages.answer_distribution): the drift reference
    reference: Mapping[str, Any] | None = None
    derived_from_sha256: str | None = None  # a converted file: the FP32 ONNX's sha256
    calibration_images: int | None = None
    calibration_method: str | None = None
    kept_fp32: tuple[str, ...] | None = None  # an INT8 file's nodes kept in FP32 by the recovery
    # the batch the graph is fixed at, where build.import_onnx could not make it dynamic: served in calls of
    # that many images (served.engines.in_fixed_batches); None: the batch varies
    fixed_batch: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """The graph's output-side tensor names, as exported: input, logits, the softmax if there is one."""
        return (self.input, self.output) + ((self.probabilities,) if self.probabilities is not None else ())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExportInfo:
        kept = d.get("kept_fp32")
        return cls(opset=d["opset"], input=d["input"], output=d["output"], precision=d["precision"],
                   versions=d["versions"], probabilities=d.get("probabilities"), reference=d.get("reference"),
                   derived_from_sha256=d.get("derived_from_sha256"), calibration_images=d.get("calibration_images"),
                   calibration_method=d.get("calibration_method"),
                   kept_fp32=None if kept is None else tuple(kept), fixed_batch=d.get("fixed_batch"),
                   extra=_extra(d, _EXPORT_KNOWN))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"opset": self.opset, "input": self.input, "output": self.output}
        if self.probabilities is not None:
            d["probabilities"] = self.probabilities
        d.update(precision=self.precision, versions=self.versions)
        for name in _EXPORT_OPTIONAL:
            value = getattr(self, name)
            if value is not None:
                d[name] = list(value) if name == "kept_fp32" else value
        d.update(self.extra)
        return dict(_json_copy(d))

    def updated(self, **changes: Any) -> ExportInfo:
        """A copy with ``changes`` applied as the dict writers did (``{**export, **changes}``): known keys
        replaced, unknown ones kept among the extra keys."""
        return ExportInfo.from_dict({**self.to_dict(), **changes})


_TOP_KNOWN = ("schema_version", "arch", "arch_args", "classes", "pretrained", "preprocess", "metrics", "source",
              "export")


@dataclass(frozen=True)
class ArtifactMetadata:
    """The metadata contract of an artifact (schema :data:`SCHEMA_VERSION`): what every stage after export
    reads. ``to_dict`` writes exactly the dict it was read from (keys in the writers' order), so a file
    stamped again (quantization, a moved artifact) keeps what it did not change byte for byte."""

    arch: str  # training.models.build_model's name ("imported" for a model trained elsewhere)
    arch_args: Mapping[str, Any]
    classes: tuple[str, ...]  # index order = logit order
    preprocess: PreprocessSpec
    metrics: Mapping[str, Any]  # what the checkpoint reached on val (top1, top5, loss, epoch); {} if imported
    source: Source
    export: ExportInfo
    # the weights fine-tuning started from (training.sources), None if trained from scratch
    pretrained: Mapping[str, Any] | None = None
    # whether the writer recorded "pretrained" at all: an import, and an export older than fine-tuning, did not
    records_pretrained: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)  # keys of the same version this code does not know

    def __post_init__(self) -> None:
        if self.pretrained is not None and not self.records_pretrained:
            raise ValueError("pretrained weights are recorded only with records_pretrained=True")

    @property
    def schema_version(self) -> int:
        return SCHEMA_VERSION

    @property
    def has_checkpoint(self) -> bool:
        """Whether the artifact was exported from a PyTorch checkpoint of this project (not imported)."""
        return isinstance(self.source, CheckpointSource)

    @property
    def pretrained_weights(self) -> str | None:
        """The name of the weights fine-tuning started from, None if there were none."""
        weights = (self.pretrained or {}).get("weights")
        return None if weights is None else str(weights)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ArtifactMetadata:
        """Metadata of any schema version this code reads: upgraded to :data:`SCHEMA_VERSION` first
        (:func:`upgrade`); :class:`MetadataError` for a newer or unknown version or a missing key."""
        d = upgrade(_json_copy(d))  # its own copy: nothing the caller holds is shared
        try:
            return cls(arch=d["arch"], arch_args=d["arch_args"], classes=tuple(d["classes"]),
                       preprocess=PreprocessSpec.from_dict(d["preprocess"]), metrics=d["metrics"],
                       source=source_from_dict(d["source"]), export=ExportInfo.from_dict(d["export"]),
                       pretrained=d.get("pretrained"), records_pretrained="pretrained" in d,
                       extra=_extra(d, _TOP_KNOWN))
        except KeyError as e:
            raise MetadataError(f"ONNX metadata (schema version {SCHEMA_VERSION}) has no {e.args[0]!r} key: export "
                                f"it again with `make onnx`") from None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "arch": self.arch, "arch_args": self.arch_args,
                             "classes": list(self.classes)}
        if self.records_pretrained:
            d["pretrained"] = self.pretrained
        d.update(preprocess=self.preprocess.to_dict(), metrics=self.metrics, source=self.source.to_dict(),
                 export=self.export.to_dict(), **self.extra)
        return dict(_json_copy(d))

    def to_json(self) -> str:
        """What the ONNX file's metadata_props hold under :data:`METADATA_KEY`."""
        return json.dumps(self.to_dict())


def upgrade(d: Mapping[str, Any]) -> dict[str, Any]:
    """``d`` turned into the current schema version by :data:`UPGRADERS`, one version at a time. A version
    newer than this code, or one with no upgrade, is refused by name instead of misread."""
    out = dict(d)
    while (version := out.get("schema_version")) != SCHEMA_VERSION:
        if not (isinstance(version, int) and version < SCHEMA_VERSION and version in UPGRADERS):
            newer = " (newer than this code: update it)" if isinstance(version, int) and version > SCHEMA_VERSION \
                else ""
            raise MetadataError(f"ONNX metadata schema version {version!r}{newer}, this code reads version "
                                f"{SCHEMA_VERSION}: export it again with `make onnx`")
        out = UPGRADERS[version](out)
        if out.get("schema_version") != version + 1:
            raise AssertionError(f"the upgrade from schema version {version} wrote version "
                                 f"{out.get('schema_version')}, not {version + 1}")
    return out


def read_metadata(model: onnx.ModelProto | Path | str) -> ArtifactMetadata:
    """The metadata contract embedded by ``build.export_onnx`` (classes, preprocess, arch, provenance)."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        old = " (it has the unversioned 'platform' metadata of an older export)" if "platform" in props else ""
        raise MetadataError(f"ONNX model has no '{METADATA_KEY}' metadata{old}: export it with `make onnx` "
                            f"(build.export_onnx), or bring a model trained elsewhere in with `make import "
                            f"ONNX=<file> LABELS=<class names>`")
    return ArtifactMetadata.from_dict(json.loads(props[METADATA_KEY]))


def rebase_metadata(meta: ArtifactMetadata, from_dir: Path, to_dir: Path) -> ArtifactMetadata:
    """``meta`` for an artifact written to ``to_dir`` (paths in it are relative to the artifact)."""
    if not isinstance(meta.source, CheckpointSource):  # an imported model has no checkpoint
        return meta
    ckpt = Path(from_dir).resolve() / meta.source.checkpoint
    return replace(meta, source=replace(meta.source, checkpoint=os.path.relpath(ckpt, Path(to_dir).resolve())))


def source_checkpoint(onnx_path: Path, meta: ArtifactMetadata | None = None) -> Path:
    """The checkpoint an ONNX artifact was exported from: found relative to the artifact (so artifacts
    move together, into a container or to another machine) and verified by its sha256, so a retrained
    checkpoint is never taken as the reference for an older ONNX."""
    meta = meta if meta is not None else read_metadata(onnx_path)
    src = meta.source
    if isinstance(src, ImportedSource):
        raise ValueError(f"{onnx_path} was imported from {src.imported} (make import), not exported from a "
                         "checkpoint of this project: there is no PyTorch model to compare with or to serve naively")
    path = Path(onnx_path).resolve().parent / src.checkpoint
    if not path.is_file():
        raise FileNotFoundError(f"{onnx_path} was exported from {src.checkpoint} (relative to the ONNX file), "
                                f"which is not at {path}")
    digest = file_sha256(path)
    if digest != src.checkpoint_sha256:
        raise ValueError(f"{path} is not the checkpoint {onnx_path} was exported from (sha256 {digest[:12]}..., "
                         f"expected {src.checkpoint_sha256[:12]}...): it was retrained or replaced; "
                         f"export again with `make onnx`")
    return path


def parameter_count(path: Path) -> int:
    """The weights of an ONNX graph (its initializers' elements): the parameter count reports name."""
    import onnx

    return sum(math.prod(t.dims) for t in onnx.load(str(path)).graph.initializer)


def has_checkpoint(meta: ArtifactMetadata) -> bool:
    """Whether an artifact was exported from a PyTorch checkpoint of this project (not imported)."""
    return meta.has_checkpoint


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
