"""Checkpoint -> ONNX with a dynamic batch dimension, validated against PyTorch with ONNX Runtime.

    python -m build.export_onnx --ckpt artifacts/best.pt --data data/synthetic --out artifacts/model.onnx

The checkpoint's metadata (classes, preprocess spec, arch, metrics) is embedded in the ONNX file's
metadata_props (core.metadata: METADATA_KEY, an ArtifactMetadata), with the checkpoint's sha256, so later
stages read the ONNX alone. The file is written only after validation passes: on failure nothing is left behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch

from build.graph_cleanup import clean
from core.atomic_io import atomic_write_bytes
from core.metadata import (
    INPUT_NAME,
    METADATA_KEY,
    OUTPUT_NAME,
    PROBABILITIES_NAME,
    ArtifactMetadata,
    CheckpointSource,
    ExportInfo,
    file_sha256,
    library_versions,
    read_metadata,
)
from core.preprocess import DaliPreprocessor, PreprocessSpec
from core.runners import OrtRunner
from served.stages import answer_distribution
from training.checkpoint import load_checkpoint, model_from_checkpoint, spec_from_checkpoint
from training.data import image_files, list_images, stratified
from training.evaluate import logits_for_inputs

OPSET = 18
# The drift reference's size: the live window's score (PSI over B bins) has a noise floor of about
# (B - 1) * (1 / window + 1 / reference) on in-distribution traffic; 2,000 answers keep the reference's share
# of it at a fifth of a 500-answer window's, and cost ONNX Runtime seconds (the whole split when smaller)
REFERENCE_IMAGES = 2000


class ValidationError(RuntimeError):
    pass


class LogitsAndProbabilities(torch.nn.Module):
    """The classifier's logits (what every fidelity check compares) and their softmax, in FP32."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, torch.softmax(logits.float(), dim=1)


def to_onnx(model: torch.nn.Module, input_shape: tuple[int, ...]) -> onnx.ModelProto:
    """Export with the dynamo exporter; batch is dynamic, everything else fixed. Outputs: logits, probabilities."""
    example = torch.zeros(2, *input_shape)
    model = LogitsAndProbabilities(model).eval()
    # the exporter logs one warning per torchvision op it cannot register; this project has no torchvision
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME, PROBABILITIES_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},), opset_version=OPSET, verbose=False,
        )
    if program is None:  # only the legacy exporter (dynamo=False) returns None
        raise RuntimeError("torch.onnx.export returned no ONNX program")
    return program.model_proto


def ort_outputs(model_bytes: bytes, inputs: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(logits, probabilities) from ONNX Runtime (the serving session options), in batches of ``batch_size``."""
    logits, probs = OrtRunner(model_bytes).run(inputs, outputs=2, batch_size=batch_size)
    return logits, probs


def validate(model_bytes: bytes, torch_model: torch.nn.Module, inputs: np.ndarray,
             tolerance: float) -> tuple[dict, np.ndarray]:
    """Compare ONNX Runtime with PyTorch on real inputs, at batch 1 and batched; raise beyond tolerance.
    The softmax output must be the softmax of the logits beside it. (The report, ONNX Runtime's
    probabilities on the inputs.)"""
    ref = logits_for_inputs(torch_model, inputs)
    got, probs = ort_outputs(model_bytes, inputs)
    got_b1 = ort_outputs(model_bytes, inputs[:4], batch_size=1)[0]  # the dynamic batch really is dynamic
    diff = float(max(np.abs(got - ref).max(), np.abs(got_b1 - ref[:4]).max()))
    expected = np.exp(got - got.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    if not np.allclose(probs, expected, atol=1e-4):
        raise ValidationError(f"the exported softmax output disagrees with softmax(logits): max diff "
                              f"{np.abs(probs - expected).max():.3g}")
    report = {"images": len(inputs), "max_abs_logit_diff": diff, "tolerance": tolerance,
              "top1_agreement": float(np.mean(got.argmax(1) == ref.argmax(1)))}
    if not np.isfinite(diff) or diff > tolerance:
        raise ValidationError(f"ONNX Runtime and PyTorch disagree: max |logit diff| {diff:.3g} "
                              f"> tolerance {tolerance:g}")
    return report, probs


def export_metadata(ckpt: dict, ckpt_path: Path, out: Path) -> ArtifactMetadata:
    """The metadata contract embedded in the ONNX: the checkpoint's metadata, its source and the export's."""
    return ArtifactMetadata(
        arch=ckpt["arch"], arch_args=ckpt["arch_args"], classes=tuple(ckpt["classes"]),
        pretrained=ckpt.get("pretrained"),
        preprocess=spec_from_checkpoint(ckpt), metrics=ckpt.get("metrics", {}),
        source=CheckpointSource(checkpoint=os.path.relpath(Path(ckpt_path).resolve(), Path(out).resolve().parent),
                                checkpoint_sha256=file_sha256(ckpt_path),
                                training_provenance=ckpt.get("provenance", {})),
        export=ExportInfo(opset=OPSET, input=INPUT_NAME, output=OUTPUT_NAME, probabilities=PROBABILITIES_NAME,
                          precision="fp32", versions={**library_versions(), "onnx": onnx.__version__}),
    )


def cleaned_graph(proto: onnx.ModelProto) -> tuple[bytes, dict]:
    """The checked model cleaned up with onnx-graphsurgeon and checked again: (its bytes, node counts)."""
    onnx.checker.check_model(proto)
    cleaned, counts = clean(proto)
    onnx.checker.check_model(cleaned)
    print(f"graph clean-up (onnx-graphsurgeon): {counts['nodes_before']} -> {counts['nodes_after']} nodes "
          f"({counts['identities_removed']} identities removed, constants folded, dead nodes dropped)")
    return cleaned.SerializeToString(), counts


def check_cleanup(model_bytes: bytes, proto: onnx.ModelProto, inputs: np.ndarray, tolerance: float) -> float:
    """Max |logit difference| the clean-up made on real inputs; ValidationError beyond tolerance."""
    cleaned_logits = ort_outputs(model_bytes, inputs)[0]
    cleanup_diff = float(np.abs(cleaned_logits - ort_outputs(proto.SerializeToString(), inputs)[0]).max())
    if cleanup_diff > tolerance:
        raise ValidationError(f"graph clean-up changed the outputs: max |logit diff| {cleanup_diff:.3g} "
                              f"> {tolerance:g}")
    return cleanup_diff


def reference_probabilities(model_bytes: bytes, spec: PreprocessSpec, paths: list[Path], known: np.ndarray,
                            batch_size: int = 64) -> np.ndarray:
    """ONNX Runtime's probabilities on every image of ``paths``; the first ``len(known)`` are ``known`` (the
    validation sample's, already computed). The rest is streamed one batch at a time: memory stays flat."""
    runner, parts = OrtRunner(model_bytes), [known]
    for batch in DaliPreprocessor(spec, batch_size=batch_size).iter_files(paths[len(known):]):
        parts.append(runner.run(batch, outputs=2)[1])
    return np.concatenate(parts)


def with_reference(model_bytes: bytes, probs: np.ndarray, split: str, labels: np.ndarray) -> bytes:
    """The model with its answers on ``split`` in its metadata (export.reference: served.stages.answer_distribution),
    the reference the served model's drift score compares live answers with; ``labels``: the images' classes,
    of which the reference records how many it covers."""
    model = onnx.load_from_string(model_bytes)
    meta = read_metadata(model)
    covered = int(len(np.unique(labels[labels >= 0])))  # -1: unlabelled images
    reference = {"split": split, **answer_distribution(probs), "split_classes_covered": covered}
    meta = replace(meta, export=replace(meta.export, reference=reference))
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                        METADATA_KEY: meta.to_json()})
    return model.SerializeToString()


def validation_images(data: Path, split: str, classes: list[str]) -> tuple[list[tuple[Path, int]], str]:
    """(the images to validate on and record the reference from, labelled; what they are): ``data/split/<class>/``
    where every class has its folder, else every image under ``data``, unlabelled (label -1): a pretrained
    ImageNet model has 1,000 classes and its user a folder of photographs."""
    split_dir = data / split
    if split_dir.is_dir() and all((split_dir / c).is_dir() for c in classes):
        return list_images(split_dir, classes), split
    files = image_files(data)
    if not files:
        raise FileNotFoundError(f"no images under {data} to validate the export on (an ImageFolder with "
                                f"{split}/<class>/, or any folder of images)")
    print(f"{data} has no {split}/<class>/ folder for each of the model's {len(classes)} classes: validating on its "
          f"{len(files)} images, unlabelled")
    return [(p, -1) for p in files], "unlabelled"


def export(ckpt_path: Path, data: Path, out: Path, split: str = "val", tolerance: float = 1e-3,
           max_images: int = 256, reference_images: int | None = REFERENCE_IMAGES) -> dict:
    """Export, validate on a stratified sample of ``max_images`` images of ``split`` (PyTorch is slow), and embed
    the drift reference: the answers on ``reference_images`` of them (stratified; None: the whole split)."""
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt)
    spec = spec_from_checkpoint(ckpt)
    proto = to_onnx(model, spec.input_shape)
    onnx.helper.set_model_props(proto, {METADATA_KEY: export_metadata(ckpt, ckpt_path, out).to_json()})
    model_bytes, counts = cleaned_graph(proto)

    samples, split = validation_images(Path(data), split, ckpt["classes"])
    samples = stratified(samples, reference_images)
    paths = [p for p, _ in samples]
    inputs = DaliPreprocessor(spec).files(paths[:max_images])
    cleanup_diff = check_cleanup(model_bytes, proto, inputs, tolerance)
    report, probs = validate(model_bytes, model, inputs, tolerance)
    report.update(counts, cleanup_max_abs_diff=cleanup_diff)
    probs = reference_probabilities(model_bytes, spec, paths, probs)
    model_bytes = with_reference(model_bytes, probs, split, np.array([y for _, y in samples]))
    atomic_write_bytes(out, lambda tmp: tmp.write_bytes(model_bytes))
    print(f"exported {out}: {report['images']} {split} images, max |logit diff| {report['max_abs_logit_diff']:.2e} "
          f"(tolerance {tolerance:g}), top-1 agreement {100 * report['top1_agreement']:.2f}%; drift reference: "
          f"the answers on {len(probs)} {split} images")
    return report


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a checkpoint to ONNX and validate it with ONNX Runtime")
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="ImageFolder root; validation uses its images")
    p.add_argument("--split", default="val")
    p.add_argument("--out", type=Path, default=Path("artifacts/model.onnx"))
    p.add_argument("--tolerance", type=float, default=1e-3, help="max absolute logit difference allowed")
    p.add_argument("--max-images", type=int, default=256,
                   help="validation against PyTorch on this many images (stratified: every class in proportion)")
    p.add_argument("--reference-images", type=int, default=REFERENCE_IMAGES,
                   help="the drift reference: the model's answers on this many images (stratified; 0 = all)")
    return p


def main(args: argparse.Namespace) -> dict:
    return export(args.ckpt, args.data, args.out, args.split, args.tolerance, args.max_images,
                  args.reference_images or None)


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (ValidationError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"export failed: {e}") from e
