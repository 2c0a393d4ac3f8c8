"""A model trained elsewhere, brought in as ONNX: checked, fixed where it can be, and given the metadata contract.

    python -m build.import_onnx --onnx their_model.onnx --labels labels.txt --like timm:convnext_nano \\
        --img-size 224 --out artifacts/model.onnx [--data DATA]
    make import ONNX=their_model.onnx LABELS=labels.txt LIKE=timm:convnext_nano   # IMG_SIZE=: only to override

What is checked: one float32 image input in NCHW with 3 channels; one output of [batch, classes] with
as many classes as the labels file names. What is fixed: a fixed batch dimension is made dynamic, with each
Reshape that writes the fixed batch where the graph shows it is the batch rewritten to follow it
(build.graph_cleanup.unfix_batch), and proved by running it at batch 1 and 3 against the original run one
image at a time; where the proof fails (the graph fixes its batch in a way not rewritten), the model is
imported with its batch fixed, recorded in its metadata, and served one image per inference call
(served.engines.in_fixed_batches), which is printed with its cost. An output that is already a softmax is
turned back into logits (log), since the served top-k takes logits; the tensors get the project's names
(input, logits) and a softmax output is added (probabilities, for the classification layout); other outputs
are dropped.
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

from build.graph_cleanup import BATCH_DIM, unfix_batch
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
from served.engines import fixed_batch, fixed_batch_cost

IMPORTED_ARCH = "imported"  # the metadata's arch for a model this project did not train
PROOF_BATCH = 3  # the batch the imported graph is proved at, besides 1
TOLERANCE = 1e-4  # the largest difference from the original's outputs taken as equal (float32 rounding)


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


def alone(original: OrtRunner, x: np.ndarray, batch: int) -> np.ndarray:
    """The original's output for each image of ``x`` run alone (where its batch is fixed above 1: among copies
    of itself): the reference every imported graph is proved against."""
    return np.concatenate([original(np.repeat(xi[None], batch, axis=0))[:1] for xi in x])


def outputs_probabilities(original: OrtRunner, shape: tuple[int, int, int], batch: int) -> bool:
    """Whether the output is already a softmax: non-negative rows summing to 1 on random inputs."""
    y = alone(original, np.random.default_rng(0).standard_normal((4, *shape)).astype(np.float32), batch)
    return bool(np.all(y >= 0) and np.allclose(y.sum(1), 1.0, atol=1e-4))


def rewire(model: onnx.ModelProto, num_classes: int, already_softmax: bool,
           batch: int | str) -> tuple[onnx.ModelProto, dict]:
    """The checked graph with the standard names, the input's ``batch`` (a number: fixed; else the symbol),
    logits out and a softmax beside them; and what was changed."""
    graph = gs.import_onnx(model)
    inp, out = image_input(graph), classifier_output(graph, num_classes)
    renamed: dict[str, str] = {inp.name: INPUT_NAME}
    fixes = {"softmax_turned_to_logits": bool(already_softmax), "dropped_outputs": [t.name for t in graph.outputs[1:]],
             "renamed": renamed}
    inp.name, inp.shape = INPUT_NAME, [batch, *inp.shape[1:]]
    for t in graph.tensors().values():  # shapes recorded inside may be for another batch: let ORT infer them
        if isinstance(t, gs.Variable) and t is not inp and t not in graph.outputs:
            t.shape = None
    if already_softmax:
        logits = gs.Variable(OUTPUT_NAME, dtype=np.float32, shape=[batch, num_classes])
        graph.nodes.append(gs.Node("Log", inputs=[out], outputs=[logits]))
    else:
        renamed[out.name] = OUTPUT_NAME
        out.name, out.shape, logits = OUTPUT_NAME, [batch, num_classes], out
    probs = gs.Variable(PROBABILITIES_NAME, dtype=np.float32, shape=[batch, num_classes])
    graph.nodes.append(gs.Node("Softmax", attrs={"axis": 1}, inputs=[logits], outputs=[probs]))
    graph.outputs = [logits, probs]
    graph.cleanup().toposort()
    rewired = gs.export_onnx(graph)
    rewired.ir_version = model.ir_version  # gs writes its own default; ORT reads the original one
    onnx.checker.check_model(rewired)
    return rewired, fixes


def prove(imported: bytes, x: np.ndarray, expected: np.ndarray, softmax: bool) -> float:
    """The largest difference of the imported graph's outputs, run as served (a fixed batch in calls of that
    batch), at batch 1 and ``len(x)``, from the original's for each image alone (``expected``); an
    ImportCheckError saying where they part."""
    def refusal(e: Exception) -> str:  # ONNX Runtime refuses a graph or a batch in its own words and types
        return " ".join(str(e).split())[:300]

    try:
        runner = OrtRunner(imported)
    except Exception as e:
        raise ImportCheckError(f"ONNX Runtime cannot load it: {refusal(e)}") from e
    diff = 0.0
    for n in (1, len(x)):
        try:
            logits, probs = runner.run(x[:n], outputs=2)
        except Exception as e:
            raise ImportCheckError(f"at batch {n}: {refusal(e)}") from e
        ours = np.exp(logits) if softmax else logits
        if ours.shape != expected[:n].shape:
            raise ImportCheckError(f"at batch {n} the output has shape {list(ours.shape)}, not "
                                   f"{list(expected[:n].shape)}")
        diff = max(diff, float(np.abs(ours - expected[:n]).max()))
        if diff > TOLERANCE:
            raise ImportCheckError(f"at batch {n} the outputs differ from the original's, one image at a time, by "
                                   f"up to {diff:.3g}")
        if not np.allclose(probs, np.exp(logits) / np.exp(logits).sum(1, keepdims=True), atol=1e-5):
            raise ImportCheckError(f"at batch {n} the added softmax does not match the logits")
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
    in_input = fixed_batch(inp.shape[0])
    batch = in_input or 1  # what the file runs at (a symbolic batch may be fixed inside)
    softmax = outputs_probabilities(original, spec.input_shape, batch)
    x = np.random.default_rng(1).standard_normal((PROOF_BATCH, *spec.input_shape)).astype(np.float32)
    expected = alone(original, x, batch)

    def written(graph_model: onnx.ModelProto, served_batch: int | str, batch_fixes: dict) -> tuple[bytes, dict]:
        """The file to write for ``graph_model`` served at ``served_batch``, and the fixes it records."""
        rewired, fixes = rewire(graph_model, len(labels), softmax, served_batch)
        fixes = {**batch_fixes, **fixes}
        meta = ArtifactMetadata(
            arch=IMPORTED_ARCH, arch_args={}, classes=tuple(labels), preprocess=spec, metrics={},
            source=ImportedSource(imported=str(Path(src).resolve()), imported_sha256=file_sha256(src),
                                  labels_sha256=file_sha256(labels_file), preprocessing_like=args.like, fixes=fixes),
            export=ExportInfo(opset=max(o.version for o in rewired.opset_import if o.domain in ("", "ai.onnx")),
                              input=INPUT_NAME, output=OUTPUT_NAME, probabilities=PROBABILITIES_NAME,
                              precision="fp32", versions={**library_versions(), "onnx": onnx.__version__},
                              fixed_batch=served_batch if isinstance(served_batch, int) else None),
            records_pretrained=False)  # an import records no fine-tuning: the key is left out
        onnx.helper.set_model_props(rewired, {METADATA_KEY: meta.to_json()})
        return rewired.SerializeToString(), fixes

    unfixed, reshapes = unfix_batch(model, batch)
    served_fixed: int | None = None
    try:
        model_bytes, fixes = written(unfixed, BATCH_DIM, {
            "dynamic_batch": bool(in_input or reshapes),
            **({"reshapes_following_the_batch": reshapes} if reshapes else {})})
        diff = prove(model_bytes, x, expected, softmax)
        places = ((["its input"] if in_input else [])
                  + ([f"{len(reshapes)} Reshape(s), now following it ({', '.join(reshapes)})"] if reshapes else []))
        how = (f"batch: made dynamic (the file fixed it at {batch} in {' and in '.join(places)})" if places
               else "batch: dynamic, as in the file")
        how += (f"; proved: at batch 1 and {PROOF_BATCH} the outputs equal the original's, one image at a time "
                f"(max diff {diff:.2g})")
    except (ImportCheckError, onnx.checker.ValidationError) as e:
        why = f"the batch could not be made dynamic: {e}"
        model_bytes, fixes = written(model, batch, {"dynamic_batch": False, "batch_kept_fixed": why})
        try:
            diff = prove(model_bytes, x, expected, softmax)
        except ImportCheckError as refused:
            raise ImportCheckError(f"the imported graph computes other outputs than the original ({refused})") \
                from refused
        served_fixed = batch
        how = f"batch: fixed at {batch} inside the graph; {why}; {fixed_batch_cost(batch)}"
    report = {"fixes": fixes, "max_abs_diff_vs_original": diff, "classes": len(labels), "input": spec.input_shape,
              "fixed_batch": served_fixed, "batch": how}
    if args.data:
        report["val_top1"] = val_top1(model_bytes, spec, labels, Path(args.data))
    atomic_write_bytes(out, lambda tmp: tmp.write_bytes(model_bytes))
    print(f"imported {src} -> {out}: {len(labels)} classes, input {spec.input_shape}, {spec.interpolation} resize "
          f"to {spec.resize_size}; fixes: {json.dumps(fixes)}"
          + (f"; val top-1 {report['val_top1']:.2f}%" if "val_top1" in report else ""))
    print(how)
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
