"""A model trained elsewhere, brought in as ONNX: checked, fixed where it can be, and given the metadata contract.

    python -m build.import_onnx --onnx their_model.onnx --labels labels.txt --like timm:convnext_nano \\
        --img-size 224 --out artifacts/model.onnx [--data DATA]
    make import ONNX=their_model.onnx LABELS=labels.txt LIKE=timm:convnext_nano   # IMG_SIZE=: only to override

What is checked: one float32 image input in NCHW with 3 channels; one output of [batch, classes] with
as many classes as the labels file names. What is fixed: a fixed batch dimension is made dynamic (then
run at two batch sizes to prove it); an output that is already a softmax is turned back into logits
(log), since the served top-k takes logits; the tensors get the project's names (input, logits) and a
softmax output is added (probabilities, for the classification layout); other outputs are dropped.
The preprocessing comes from ``--like`` (a torchvision or timm model name: that library's eval
transform, training/sources.py) or from the flags. The copy carries the versioned metadata with its
provenance (imported, the source file's sha256), and from there `make quantize`, `make repo`,
`make serve` and `make publish` take it like any export; quantization scores it against the
imported FP32 model itself, as there is no PyTorch checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from core.atomic_io import atomic_write_bytes
from core.metadata import (
    INPUT_NAME,
    METADATA_KEY,
    OUTPUT_NAME,
    PROBABILITIES_NAME,
    ArtifactMetadata,
    ExportInfo,
    ImportedSource,
    file_sha256,
    library_versions,
)
from core.preprocess import INTERPOLATIONS, PreprocessSpec
from core.runners import OrtRunner

IMPORTED_ARCH = "imported"  # the metadata's arch for a model this project did not train


class ImportCheckError(ValueError):
    """What is wrong with the ONNX file, in words."""


def read_labels(path: Path) -> list[str]:
    labels = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if len(labels) < 2:
        raise ImportCheckError(f"{path}: {len(labels)} class name(s); a classifier needs at least 2, one per line")
    if len(set(labels)) != len(labels):
        raise ImportCheckError(f"{path}: class names repeat")
    return labels


def image_input(graph: gs.Graph) -> gs.Variable:
    if len(graph.inputs) != 1:
        raise ImportCheckError(f"the model has {len(graph.inputs)} inputs ({', '.join(t.name for t in graph.inputs)}); "
                           "an image classifier takes one")
    inp = graph.inputs[0]
    if inp.dtype != np.float32:
        raise ImportCheckError(f"input {inp.name!r} is {inp.dtype}, not float32 (the served preprocessing feeds "
                               "float32)")
    shape = list(inp.shape or [])
    if len(shape) != 4 or shape[1] != 3:
        raise ImportCheckError(f"input {inp.name!r} has shape {shape}: expected NCHW with 3 channels, [batch, 3, H, W]"
                           + (" (this looks like NHWC: export it channels-first)" if len(shape) == 4 and
                              shape[3] == 3 else ""))
    return inp


def classifier_output(graph: gs.Graph, num_classes: int) -> gs.Variable:
    out = graph.outputs[0]
    shape = list(out.shape or [])
    if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != num_classes):
        raise ImportCheckError(f"output {out.name!r} has shape {shape}: expected [batch, {num_classes}], one score per "
                           "class of the labels file")
    return out


def spec_for(args: argparse.Namespace, height: Any) -> PreprocessSpec:
    """The preprocessing: a library model's eval transform (--like), else the flags."""
    crop = args.img_size or (height if isinstance(height, int) else None)
    if crop is None:
        raise ImportCheckError("the input's height is not fixed: give --img-size")
    if args.like:
        from training.sources import model_spec

        spec = model_spec(args.like, None, crop)
        if spec is None:
            raise ImportCheckError(f"--like {args.like}: name a torchvision:<name> or timm:<name> model")
        return spec
    return PreprocessSpec(crop_size=crop, resize_size=args.resize_size or int(round(crop / 0.875)),
                          mean=tuple(args.mean), std=tuple(args.std), interpolation=args.interpolation)


def outputs_probabilities(original: OrtRunner, shape: tuple[int, int, int]) -> bool:
    """Whether the output is already a softmax: non-negative rows summing to 1 on random inputs."""
    x = np.random.default_rng(0).standard_normal((4, 1, *shape)).astype(np.float32)
    y = np.concatenate([original(xi) for xi in x])  # one image at a time: the original's batch may be fixed at 1
    return bool(np.all(y >= 0) and np.allclose(y.sum(1), 1.0, atol=1e-4))


def rewire(graph: gs.Graph, ir_version: int, num_classes: int,
           already_softmax: bool) -> tuple[onnx.ModelProto, dict]:
    """The checked graph with the standard names, a dynamic batch, logits out and a softmax beside them."""
    inp, out = image_input(graph), classifier_output(graph, num_classes)
    renamed: dict[str, str] = {inp.name: INPUT_NAME}
    fixes = {"dynamic_batch": not isinstance(inp.shape[0], str), "softmax_turned_to_logits": bool(already_softmax),
             "dropped_outputs": [t.name for t in graph.outputs[1:]], "renamed": renamed}
    inp.name, inp.shape = INPUT_NAME, ["batch", *inp.shape[1:]]
    for t in graph.tensors().values():  # shapes recorded inside were for the fixed batch: let ORT infer them
        if isinstance(t, gs.Variable) and t is not inp and t not in graph.outputs:
            t.shape = None
    if already_softmax:
        logits = gs.Variable(OUTPUT_NAME, dtype=np.float32, shape=["batch", num_classes])
        graph.nodes.append(gs.Node("Log", inputs=[out], outputs=[logits]))
    else:
        renamed[out.name] = OUTPUT_NAME
        out.name, out.shape, logits = OUTPUT_NAME, ["batch", num_classes], out
    probs = gs.Variable(PROBABILITIES_NAME, dtype=np.float32, shape=["batch", num_classes])
    graph.nodes.append(gs.Node("Softmax", attrs={"axis": 1}, inputs=[logits], outputs=[probs]))
    graph.outputs = [logits, probs]
    graph.cleanup().toposort()
    rewired = gs.export_onnx(graph)
    rewired.ir_version = ir_version  # gs writes its own default; ORT reads the original one
    onnx.checker.check_model(rewired)
    return rewired, fixes


def check_runs(original: OrtRunner, imported: bytes, shape: tuple[int, int, int], softmax: bool) -> float:
    """Run at batch 1 and 3 (the batch really is dynamic) and compare with the original at batch 1."""
    x = np.random.default_rng(1).standard_normal((3, *shape)).astype(np.float32)
    runner = OrtRunner(imported)
    try:
        logits, probs = runner.run(x, outputs=2)
    except Exception as e:
        raise ImportCheckError(f"the batch dimension cannot be made dynamic (the graph fixes it inside: "
                               f"{str(e)[:300]}); export the model with a dynamic batch") from e
    first = original(x[:1])
    ours = np.exp(logits[:1]) if softmax else logits[:1]
    diff = float(np.abs(ours - first).max())
    if not np.allclose(probs, np.exp(logits) / np.exp(logits).sum(1, keepdims=True), atol=1e-5) or diff > 1e-4:
        raise ImportCheckError(f"the imported graph computes other outputs than the original (max diff {diff:.3g})")
    return diff


def import_onnx(src: Path, labels_file: Path, out: Path, args: argparse.Namespace) -> dict:
    model = onnx.load(str(src))
    labels = read_labels(labels_file)
    graph = gs.import_onnx(model)
    inp = image_input(graph)
    classifier_output(graph, len(labels))
    spec = spec_for(args, inp.shape[2])
    if any(isinstance(d, int) and d != spec.crop_size for d in inp.shape[2:]):
        raise ImportCheckError(f"input {inp.name!r} is fixed at {inp.shape[2:]} but the preprocessing crops "
                           f"{spec.crop_size}: give --img-size {inp.shape[2]} (make import IMG_SIZE={inp.shape[2]}, "
                           "or leave IMG_SIZE out: the input's own size is taken)")
    original = OrtRunner(model.SerializeToString())
    softmax = outputs_probabilities(original, spec.input_shape)
    rewired, fixes = rewire(graph, model.ir_version, len(labels), softmax)
    meta = ArtifactMetadata(
        arch=IMPORTED_ARCH, arch_args={}, classes=tuple(labels), preprocess=spec, metrics={},
        source=ImportedSource(imported=str(Path(src).resolve()), imported_sha256=file_sha256(src),
                              labels_sha256=file_sha256(labels_file), preprocessing_like=args.like, fixes=fixes),
        export=ExportInfo(opset=max(o.version for o in rewired.opset_import if o.domain in ("", "ai.onnx")),
                          input=INPUT_NAME, output=OUTPUT_NAME, probabilities=PROBABILITIES_NAME,
                          precision="fp32", versions={**library_versions(), "onnx": onnx.__version__}),
        records_pretrained=False)  # an import records no fine-tuning: the key is left out
    onnx.helper.set_model_props(rewired, {METADATA_KEY: meta.to_json()})
    model_bytes = rewired.SerializeToString()
    diff = check_runs(original, model_bytes, spec.input_shape, softmax)
    report = {"fixes": fixes, "max_abs_diff_vs_original": diff, "classes": len(labels), "input": spec.input_shape}
    if args.data:
        report["val_top1"] = val_top1(model_bytes, spec, labels, Path(args.data))
    atomic_write_bytes(out, lambda tmp: tmp.write_bytes(model_bytes))
    print(f"imported {src} -> {out}: {len(labels)} classes, input {spec.input_shape}, {spec.interpolation} resize "
          f"to {spec.resize_size}; fixes: {json.dumps(fixes)}"
          + (f"; val top-1 {report['val_top1']:.2f}%" if "val_top1" in report else ""))
    return report


def val_top1(model_bytes: bytes, spec: PreprocessSpec, classes: list[str], data: Path) -> float:
    from core.preprocess import DaliPreprocessor
    from training.data import list_images

    val = list_images(data / "val", classes)
    if not val:
        raise ImportCheckError(f"no val images under {data}/val for the classes of the labels file")
    run = OrtRunner(model_bytes)
    logits = np.concatenate([run(x) for x in DaliPreprocessor(spec).iter_files([p for p, _ in val])])
    return float(100 * np.mean(logits.argmax(1) == np.array([y for _, y in val])))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Import a classifier trained elsewhere (ONNX) into the chain")
    p.add_argument("--onnx", type=Path, required=True, help="the model to import")
    p.add_argument("--labels", type=Path, required=True, help="class names, one per line, in output order")
    p.add_argument("--out", type=Path, default=Path("artifacts/model.onnx"))
    p.add_argument("--like", help="take the preprocessing from this model's library eval transform "
                   "(torchvision:<name> or timm:<name>)")
    p.add_argument("--img-size", type=int, help="crop size (default: the input's fixed height)")
    p.add_argument("--resize-size", type=int, help="without --like: shorter side before the crop (default crop/0.875)")
    p.add_argument("--interpolation", choices=INTERPOLATIONS, default="linear", help="without --like")
    p.add_argument("--mean", type=float, nargs=3, default=[0.485, 0.456, 0.406], help="without --like (0..1 scale)")
    p.add_argument("--std", type=float, nargs=3, default=[0.229, 0.224, 0.225], help="without --like (0..1 scale)")
    p.add_argument("--data", type=Path, help="ImageFolder root: report val top-1 of the imported model")
    return p


def main(args: argparse.Namespace) -> dict:
    return import_onnx(args.onnx, args.labels, args.out, args)


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (ValueError, FileNotFoundError, onnx.checker.ValidationError) as e:
        raise SystemExit(f"import failed: {e}") from e
