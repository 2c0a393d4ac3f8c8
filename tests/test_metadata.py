"""The artifact metadata contract as a typed, versioned dataclass (core.metadata.ArtifactMetadata): every
shape a writer of schema 1 wrote reads back to the same bytes, the writers write what they wrote as
dicts, an older version is upgraded through UPGRADERS in sequence, and a newer version or a missing key
is refused by name. No server, no training."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from core import metadata
from core.metadata import (
    METADATA_KEY,
    ArtifactMetadata,
    CheckpointSource,
    ImportedSource,
    MetadataError,
    read_metadata,
    rebase_metadata,
)
from core.preprocess import PreprocessSpec

VERSIONS = {"python": "3.11.7", "numpy": "1.26.4", "pillow": "13.0.0", "torch": "2.14.1+cu130", "onnx": "1.22.0"}
PREPROCESS = {"crop_size": 32, "resize_size": 37, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
              "resize_policy": "shorter_center_crop", "interpolation": "linear", "color": "RGB", "layout": "CHW"}
CHECKPOINT_SOURCE = {"checkpoint": "ckpt/best.pt", "checkpoint_sha256": "7f" * 32,
                     "training_provenance": {"data": "/data", "data_sha256": "89" * 32, "seed": 0, "world_size": 1,
                                             "device": "cpu", "versions": VERSIONS, "git_commit": "ea" * 20}}
REFERENCE = {"split": "val", "answers": 80, "confidence": [0.0, 0.075, 0.925], "classes": [0.0, 0.0625, 0.9375]}

# build.export_onnx as it writes today (a sample of a real file, abridged): pretrained, softmax output, drift reference
EXPORTED = {
    "schema_version": 1, "arch": "resnet_tiny", "arch_args": {"num_classes": 3}, "classes": ["a", "b", "c"],
    "pretrained": None, "preprocess": PREPROCESS,
    "metrics": {"epoch": 1, "top1": 11.25, "top5": 62.5, "loss": 4.168064594268799},
    "source": CHECKPOINT_SOURCE,
    "export": {"opset": 18, "input": "input", "output": "logits", "probabilities": "probabilities",
               "precision": "fp32", "versions": VERSIONS, "reference": REFERENCE},
}
# the same, fine-tuned from pretrained weights (training.sources)
FINETUNED = {**EXPORTED, "arch": "timm:convnext_nano",
             "pretrained": {"weights": "convnext_nano.in12k", "library": "timm", "version": "1.0", "head": ["head.fc"]}}
# build.quantize's stamp of an INT8 file that needed recovery (derived from the FP32 file above)
QUANTIZED = {**EXPORTED, "source": {**CHECKPOINT_SOURCE, "checkpoint": "../ckpt/best.pt"},
             "export": {**EXPORTED["export"], "precision": "int8", "derived_from_sha256": "ab" * 32,
                        "calibration_images": 128, "calibration_method": "entropy", "kept_fp32": ["/conv1/Conv"]}}
# build.import_onnx: no checkpoint, no "pretrained" key
IMPORTED = {
    "schema_version": 1, "arch": "imported", "arch_args": {}, "classes": ["a", "b", "c"], "preprocess": PREPROCESS,
    "metrics": {},
    "source": {"checkpoint": None, "imported": "/models/theirs.onnx", "imported_sha256": "cd" * 32,
               "labels_sha256": "ef" * 32, "preprocessing_like": None,
               "fixes": {"dynamic_batch": True, "softmax_turned_to_logits": False, "renamed": {"x": "input"}}},
    "export": {"opset": 17, "input": "input", "output": "logits", "probabilities": "probabilities",
               "precision": "fp32", "versions": VERSIONS},
}
# schema 1 as its first writer wrote it (20b56e8): no "pretrained", no softmax output, no drift reference
FIRST_V1 = {k: v for k, v in EXPORTED.items() if k != "pretrained"}
FIRST_V1["export"] = {"opset": 18, "input": "input", "output": "logits", "precision": "fp32", "versions": VERSIONS}
# after the softmax output (ed28823), before fine-tuning (a8516fd) and the drift reference (c4a0817)
SOFTMAX_V1 = {**FIRST_V1, "export": {"opset": 18, "input": "input", "output": "logits",
                                     "probabilities": "probabilities", "precision": "fp32", "versions": VERSIONS}}

SAMPLES = {"exported": EXPORTED, "finetuned": FINETUNED, "quantized": QUANTIZED, "imported": IMPORTED,
           "first_v1": FIRST_V1, "softmax_v1": SOFTMAX_V1}


def model_with(props: dict[str, str]) -> onnx.ModelProto:
    model = onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], []))
    onnx.helper.set_model_props(model, props)
    return model


@pytest.mark.parametrize("name", SAMPLES)
def test_round_trip_is_byte_identical(name):
    raw = SAMPLES[name]
    meta = ArtifactMetadata.from_dict(copy.deepcopy(raw))
    assert meta.to_dict() == raw
    assert meta.to_json() == json.dumps(raw)  # the same key order: the same bytes in the ONNX file
    assert read_metadata(model_with({METADATA_KEY: json.dumps(raw)})) == meta
    assert ArtifactMetadata.from_dict(meta.to_dict()) == meta


def test_fields_are_typed():
    meta = ArtifactMetadata.from_dict(QUANTIZED)
    assert meta.classes == ("a", "b", "c")
    assert meta.schema_version == metadata.SCHEMA_VERSION
    assert meta.preprocess == PreprocessSpec.from_dict(PREPROCESS)
    assert isinstance(meta.source, CheckpointSource)
    assert meta.has_checkpoint
    assert meta.export.kept_fp32 == ("/conv1/Conv",)
    assert meta.export.calibration_images == 128
    assert meta.export.reference == REFERENCE
    assert meta.export.tensor_names == ("input", "logits", "probabilities")
    assert ArtifactMetadata.from_dict(FINETUNED).pretrained_weights == "convnext_nano.in12k"
    assert meta.pretrained_weights is None
    imported = ArtifactMetadata.from_dict(IMPORTED)
    assert isinstance(imported.source, ImportedSource)
    assert not imported.has_checkpoint
    assert imported.source.checkpoint is None
    assert not imported.records_pretrained
    old = ArtifactMetadata.from_dict(FIRST_V1)
    assert old.export.probabilities is None
    assert old.export.reference is None
    assert old.export.tensor_names == ("input", "logits")
    with pytest.raises(AttributeError):
        meta.arch = "other"  # type: ignore[misc]


def test_unknown_keys_of_the_same_version_are_kept():
    raw = {**EXPORTED, "notes": {"by": "someone"}, "source": {**CHECKPOINT_SOURCE, "mirror": "s3://x"},
           "export": {**EXPORTED["export"], "tool": "other"}}
    meta = ArtifactMetadata.from_dict(raw)
    assert meta.extra == {"notes": {"by": "someone"}}
    assert meta.export.extra == {"tool": "other"}
    assert meta.to_dict() == raw
    # a stamp keeps them, as the dict writers did ({**export, **changes})
    stamped = meta.export.updated(precision="fp16", calibration_method="max", other="x")
    assert stamped.to_dict() == {**raw["export"], "precision": "fp16", "calibration_method": "max", "other": "x"}


def test_to_dict_hands_out_copies():
    meta = ArtifactMetadata.from_dict(copy.deepcopy(EXPORTED))
    d = meta.to_dict()
    d["export"]["versions"]["onnx"] = "0"
    d["source"]["training_provenance"]["seed"] = 1
    assert meta.to_dict() == EXPORTED


def test_writers_write_what_the_dict_writers_wrote(tmp_path):
    """build.export_onnx, its drift reference, build.quantize's stamp and rebase: the bytes of the code they
    replaced (the dict expressions below are that code, verbatim)."""
    from build import export_onnx, quantize
    from core.metadata import file_sha256, library_versions
    from served.stages import answer_distribution

    ckpt_path, out = tmp_path / "ckpt" / "best.pt", tmp_path / "artifacts" / "model.onnx"
    ckpt_path.parent.mkdir()
    ckpt_path.write_bytes(b"weights")
    for pretrained in (None, FINETUNED["pretrained"]):
        ckpt = {"arch": "resnet_tiny", "arch_args": {"num_classes": 3}, "classes": ["a", "b", "c"],
                "pretrained": pretrained, "preprocess": PREPROCESS, "metrics": {"top1": 50.0},
                "provenance": {"seed": 0}}
        old = {
            "schema_version": 1,
            "arch": ckpt["arch"], "arch_args": ckpt["arch_args"], "classes": ckpt["classes"],
            "pretrained": ckpt.get("pretrained"),
            "preprocess": ckpt["preprocess"], "metrics": ckpt.get("metrics", {}),
            "source": {"checkpoint": os.path.relpath(Path(ckpt_path).resolve(), Path(out).resolve().parent),
                       "checkpoint_sha256": file_sha256(ckpt_path),
                       "training_provenance": ckpt.get("provenance", {})},
            "export": {"opset": export_onnx.OPSET, "input": "input", "output": "logits",
                       "probabilities": "probabilities", "precision": "fp32",
                       "versions": {**library_versions(), "onnx": onnx.__version__}},
        }
        assert export_onnx.export_metadata(ckpt, ckpt_path, out).to_json() == json.dumps(old)

    probs = np.random.default_rng(0).dirichlet(np.ones(3), size=20).astype(np.float32)
    model = model_with({"other": "kept", METADATA_KEY: json.dumps(EXPORTED)})
    labels = np.arange(20) % 2  # the sample's classes: two of the three
    written = onnx.load_from_string(export_onnx.with_reference(model.SerializeToString(), probs, "val", labels))
    old = copy.deepcopy(EXPORTED)
    old["export"]["reference"] = {"split": "val", **answer_distribution(probs), "split_classes_covered": 2}
    assert {p.key: p.value for p in written.metadata_props} == {"other": "kept", METADATA_KEY: json.dumps(old)}

    for raw in (EXPORTED, IMPORTED, FIRST_V1):
        meta = read_metadata(model_with({METADATA_KEY: json.dumps(raw)}))
        from_dir, to_dir = tmp_path / "artifacts", tmp_path / "artifacts" / "int8"
        m = copy.deepcopy(raw)  # the old rebase_metadata
        if m["source"].get("checkpoint") is not None:
            m["source"]["checkpoint"] = os.path.relpath(from_dir.resolve() / m["source"]["checkpoint"],
                                                        to_dir.resolve())
        assert rebase_metadata(meta, from_dir, to_dir).to_json() == json.dumps(m)
        extra = {"derived_from_sha256": "ab" * 32, "calibration_images": 128, "calibration_method": "max"}
        for precision, more in (("fp16", {}), ("int8", {"calibration_method": "entropy", "kept_fp32": ["/a", "/b"]})):
            stamped = quantize.stamp(model_with({}), rebase_metadata(meta, from_dir, to_dir), precision,
                                     {**extra, **more})
            m2 = json.loads(json.dumps(m))  # the old stamp
            m2["export"] = {**m2.get("export", {}), "precision": precision, **{**extra, **more}}
            assert {p.key: p.value for p in stamped.metadata_props} == {METADATA_KEY: json.dumps(m2)}


def test_older_versions_are_upgraded_in_sequence(monkeypatch):
    """UPGRADERS[v] turns version v into v + 1; from_dict applies them in order up to SCHEMA_VERSION. (Schema 1
    is the first versioned one, so the chain is exercised here with a made-up version 2 and 3.)"""
    calls = []

    def v1_to_v2(d):
        calls.append(1)
        return {**d, "schema_version": 2, "labels": d["classes"]}

    def v2_to_v3(d):
        calls.append(2)
        d = {k: v for k, v in d.items() if k != "labels"}
        return {**d, "schema_version": 3, "classes": [c.upper() for c in d["classes"]]}

    monkeypatch.setattr(metadata, "SCHEMA_VERSION", 3)
    monkeypatch.setattr(metadata, "UPGRADERS", {1: v1_to_v2, 2: v2_to_v3})
    meta = ArtifactMetadata.from_dict(EXPORTED)
    assert calls == [1, 2]
    assert meta.classes == ("A", "B", "C")
    assert meta.to_dict()["schema_version"] == 3
    assert ArtifactMetadata.from_dict(meta.to_dict()) == meta
    assert calls == [1, 2]  # the current version: as is
    monkeypatch.setattr(metadata, "UPGRADERS", {1: lambda d: {**d, "schema_version": 3}})
    with pytest.raises(AssertionError, match="upgrade from schema version 1 wrote version 3, not 2"):
        ArtifactMetadata.from_dict(EXPORTED)


def test_today_there_is_no_older_version_to_upgrade():
    assert metadata.SCHEMA_VERSION == 1
    assert metadata.UPGRADERS == {}
    # the unversioned metadata before schema 1 is refused by name, not upgraded
    old = {k: v for k, v in FIRST_V1.items() if k != "schema_version"}
    old["source"] = {**CHECKPOINT_SOURCE, "checkpoint": "/abs/artifacts/best.pt"}
    with pytest.raises(MetadataError, match="unversioned 'platform' metadata of an older export"):
        read_metadata(model_with({"platform": json.dumps(old)}))
    with pytest.raises(ValueError, match="has no 'image_platform.metadata' metadata: export it with `make onnx`"):
        read_metadata(model_with({}))
    with pytest.raises(ValueError, match="trained elsewhere in with `make import ONNX=<file> LABELS=<class names>`"):
        read_metadata(model_with({}))


@pytest.mark.parametrize("version,message", [
    (2, "schema version 2 \\(newer than this code: update it\\), this code reads version 1"),
    (99, "schema version 99 \\(newer"),
    (0, "schema version 0, this code reads version 1: export it again"),
    (None, "schema version None, this code reads version 1"),
    ("1", "schema version '1', this code reads version 1"),  # a string is not the version
])
def test_other_versions_are_refused_by_name(version, message):
    raw = {**EXPORTED, "schema_version": version}
    if version is None:
        del raw["schema_version"]
    with pytest.raises(MetadataError, match=message):
        ArtifactMetadata.from_dict(raw)
    with pytest.raises(ValueError, match=message):  # MetadataError is a ValueError, as read_metadata raised
        read_metadata(model_with({METADATA_KEY: json.dumps(raw)}))


@pytest.mark.parametrize("drop", [("classes",), ("preprocess",), ("export", "input"), ("source", "checkpoint_sha256"),
                                  ("source", "training_provenance")])
def test_a_missing_key_is_named(drop):
    raw = copy.deepcopy(EXPORTED)
    del (raw if len(drop) == 1 else raw[drop[0]])[drop[-1]]
    with pytest.raises(MetadataError, match=f"has no '{drop[-1]}' key: export it again with `make onnx`"):
        ArtifactMetadata.from_dict(raw)
