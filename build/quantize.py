"""FP16 and calibrated INT8 ONNX artifacts, each scored on the val split and gated on accuracy.

    python -m build.quantize --onnx artifacts/model.onnx --data data/synthetic --out artifacts

Conversions (a registry, one function each; every result is checked before it is written):
  fp16      ModelOpt AutoCast: FP16 inside, sensitive ops kept in FP32, FP32 inputs/outputs
  int8      ModelOpt ONNX PTQ: explicit Q/DQ placed for TensorRT, calibrated on real training images
  int8_ort  ONNX Runtime quantize_static (QDQ, per channel): the INT8 candidate for the CPU target

Calibration uses N training images through the serving preprocess, saved as calib.npy with
calib_sources.txt, so a build is reproducible. Every way the CPU target can serve (build/artifacts.py
CANDIDATES: each artifact on ONNX Runtime, and on OpenVINO at f32, at bf16 and from the Q/DQ files) gets
top-1, top-1 agreement with PyTorch, max logit difference, size and latency at batch 1 and at its best
batch, measured as served; a candidate whose top-1 drops more than --max-top1-drop points below FP32
fails the build and is never served (an artifact file failing on ONNX Runtime is not written). The
report, with the CPU features the engines used, goes to build_report.json and build_report.md; `make
repo` serves from it the fastest passing candidate for the precision asked for.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
from tqdm import tqdm

from build.artifacts import ARTIFACT_NAMES, CANDIDATES, ENGINE_MARGIN, PRECISIONS, REPORT, Candidate, fastest
from build.gate import (
    DEFAULT_MIN_AGREEMENT,
    DEFAULT_MIN_TOP5_OVERLAP,
    REFERENCE_ROW,
    Bounds,
    GateImages,
    accuracy,
    describe,
    gate_images,
    reasons,
)
from build.gate import failures as gate_failures
from core.atomic_io import atomic_write_bytes
from core.metadata import (
    INPUT_NAME,
    METADATA_KEY,
    OUTPUT_NAME,
    ArtifactMetadata,
    has_checkpoint,
    parameter_count,
    read_metadata,
    rebase_metadata,
    source_checkpoint,
)
from core.preprocess import DaliPreprocessor
from core.runners import Runner, isolated, latency, openvino_capabilities, score_isolated
from served import engines as registry
from served.engines import EngineName, Target, ort_session
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.evaluate import DEFAULT_MAX_TOP1_DROP, logits_for_inputs, stream_logits

T = TypeVar("T")

CALIB_METHODS = ("max", "entropy")
ENGINE_MARGIN_TEXT = f"{round(100 * (ENGINE_MARGIN - 1))}%"
# Defaults of the CLI, `make quantize` and `make gpu-check` (the Makefile passes only what is set).
# Max calibration is the default because it measured better here: on the test suite's tiny model
# entropy clipped most ReLU ranges to half their max and cost both INT8 models 2.5-3.75 points of top-1
# (max: none), and on the demo model its largest logit error was 2.57 against max's 0.20 at equal top-1.
DEFAULT_CALIB_METHOD = "max"
DEFAULT_CALIB_SIZE = 128


class AccuracyGateError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------
# calibration data
# ------------------------------------------------------------------------------------------------

def step(what: str) -> None:
    """A long step's first line, always (a log, a pipe); the bar beside it only on a terminal (:func:`progress`)."""
    print(f"{what} ...", flush=True)


def progress(items: Iterable[T], desc: str, unit: str, total: int | None = None) -> Iterable[T]:
    """tqdm's bar over ``items`` on a terminal (stderr), nothing elsewhere."""
    return tqdm(items, desc=desc, unit=unit, total=total, leave=False, disable=not sys.stderr.isatty())


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save to exactly ``path`` (np.save given a name would append .npy to a temporary's name)."""
    with open(path, "wb") as f:
        np.save(f, array)


def write_blob(path: Path, blob: bytes) -> None:
    atomic_write_bytes(path, lambda tmp: tmp.write_bytes(blob))


def write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda tmp: tmp.write_text(text))


def calibration_batch(meta: ArtifactMetadata, images: Sequence[Path], data: Path, n: int, out_dir: Path) -> np.ndarray:
    """N of ``images`` (the train split, or an unlabelled folder's images not held out), spread evenly over
    them, through the serving preprocess. Calibration needs no labels."""
    if n <= 0:
        raise ValueError(f"--calib-size must be positive, got {n}")
    idx = np.linspace(0, len(images) - 1, num=min(n, len(images))).round().astype(int)
    paths = [images[i] for i in sorted(set(idx.tolist()))]
    batch = DaliPreprocessor(meta.preprocess).files(paths)
    calib_dir = out_dir / "calib"
    atomic_write_bytes(calib_dir / "calib.npy", lambda tmp: save_npy(tmp, batch))
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(data)}" for p in paths]
    write_text(calib_dir / "calib_sources.txt", "\n".join(lines) + "\n")
    return batch


# ------------------------------------------------------------------------------------------------
# conversions: fp32 ONNX path + calibration batch -> ModelProto
# ------------------------------------------------------------------------------------------------

def to_fp16(onnx_path: Path, calib: np.ndarray, method: str, keep: Sequence[str] = ()) -> onnx.ModelProto:
    from modelopt.onnx.autocast import convert_to_mixed_precision

    # FP32 I/O: the Triton configs and clients stay the same for every precision
    return convert_to_mixed_precision(onnx_path=str(onnx_path), low_precision_type="fp16", keep_io_types=True,
                                      nodes_to_exclude=[re.escape(n) + "$" for n in keep] or None)


@contextmanager
def private_copy(onnx_path: Path) -> Iterator[Path]:
    """A copy of the model for the converters: ModelOpt's INT8 quantizer runs onnx's infer_shapes_path on the
    path it is given, which writes the shape-inferred model back over it (a timm ConvNeXt's model.onnx came
    out changed, and its build report no longer matched the file it was made from)."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / Path(onnx_path).name
        shutil.copyfile(onnx_path, copy)
        yield copy


@contextmanager
def onnxruntime_quantization_restored():
    """Put ONNX Runtime's quantization back as it was after the block.

    ModelOpt's ONNX PTQ monkey-patches ONNX Runtime's calibrators and quantizers and edits its op
    registries for the whole process (modelopt/onnx/quantization/ort_utils.py configure_ort); after
    that, ONNX Runtime's own static quantization fails ("Quantization parameters are not specified").
    """
    import importlib

    # import_module, not attribute access: onnxruntime.quantization.quantize is also a function's name
    base_quantizer, calibrate, qdq_quantizer, quantize, registry = (
        importlib.import_module(f"onnxruntime.quantization.{m}")
        for m in ("base_quantizer", "calibrate", "qdq_quantizer", "quantize", "registry"))
    namespaces = [calibrate, quantize, calibrate.CalibraterBase, calibrate.MinMaxCalibrater,
                  calibrate.HistogramCalibrater, calibrate.HistogramCollector, base_quantizer.BaseQuantizer,
                  qdq_quantizer.QDQQuantizer]
    registries = [getattr(registry, n) for n in ("QDQRegistry", "QLinearOpsRegistry", "IntegerOpsRegistry")]
    saved = [(ns, dict(vars(ns))) for ns in namespaces]
    saved_registries = [(r, dict(r)) for r in registries]
    try:
        yield
    finally:
        for ns, attrs in saved:
            for name, value in attrs.items():
                if vars(ns).get(name) is not value:
                    setattr(ns, name, value)
        for r, content in saved_registries:
            r.clear()
            r.update(content)


def to_int8_modelopt(onnx_path: Path, calib: np.ndarray, method: str, keep: Sequence[str] = ()) -> onnx.ModelProto:
    """``keep``: nodes left in FP32 (ModelOpt matches its exclusions as patterns: the names are escaped)."""
    from modelopt.onnx.quantization import quantize

    with tempfile.TemporaryDirectory() as tmp, onnxruntime_quantization_restored():
        out = Path(tmp) / "int8.onnx"
        quantize(onnx_path=str(onnx_path), quantize_mode="int8", calibration_data=calib, calibration_method=method,
                 calibration_eps=["cpu"], high_precision_dtype="fp32", output_path=str(out), log_level="WARNING",
                 nodes_to_exclude=[re.escape(n) + "$" for n in keep] or None)
        return onnx.load(str(out))


def float_outputs(onnx_path: Path) -> tuple[list[str], list[str]]:
    """(op types whose outputs stay float, nodes left unquantized) for ONNX Runtime's quantize_static.

    The logits are the answer: quantized to uint8 (256 steps over their range) they tied the top two
    classes in 88 of 200 val images of the demo model and doubled the largest logit error, so the ops
    that produce graph outputs keep a float output (a consumer inside the graph would still quantize it).
    The softmax over the logits (the second output) stays float too: as a quantized consumer it would
    quantize the logits it reads.
    """
    graph = onnx.load(str(onnx_path)).graph
    graph_outputs = {o.name for o in graph.output}
    output_ops = sorted({n.op_type for n in graph.node if set(n.output) & graph_outputs})
    on_outputs = [n.name for n in graph.node if set(n.input) & graph_outputs]
    return output_ops, on_outputs


def ort_method(method: str) -> Any:
    """ONNX Runtime's CalibrationMethod for one of CALIB_METHODS."""
    from onnxruntime.quantization import CalibrationMethod

    return CalibrationMethod.Entropy if method == "entropy" else CalibrationMethod.MinMax


def ort_ranges(onnx_path: Path, calib: np.ndarray, method: str, tmp: Path) -> Path:
    """ONNX Runtime's calibrated activation ranges for the model, written to a file in ``tmp``."""
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    # a graph whose batch is fixed inside (build.import_onnx's fallback) takes batches of that size only
    dim = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    fixed = dim.dim_value  # 0: the batch varies
    step, end = (fixed, len(calib) - len(calib) % fixed) if fixed else (16, len(calib))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calib[i:i + step] for i in range(0, end, step))

        def get_next(self):
            b = next(self.batches, None)
            return None if b is None else {INPUT_NAME: b}

    ranges = tmp / f"ranges_{method}.json"
    # quantize_static's entropy calibration histograms 128 bins for 128 quantized bins, so the KL search
    # can only return the full range (measured: scales identical to max). Calibrate here with 2048 bins,
    # as TensorRT's entropy calibrator does, and hand quantize_static the ranges.
    calibrator = create_calibrator(onnx_path, augmented_model_path=str(tmp / "augmented.onnx"),
                                   calibrate_method=ort_method(method),
                                   extra_options={"num_bins": 2048, "num_quantized_bins": 128})
    calibrator.collect_data(Reader())
    save_tensors_data(calibrator.compute_data(), ranges)
    return ranges


def to_int8_ort(onnx_path: Path, calib: np.ndarray, method: str, keep: Sequence[str] = (),
                ranges: Path | None = None, only: Sequence[str] = ()) -> onnx.ModelProto:
    """``keep``: nodes left in FP32 besides those on the outputs (:func:`float_outputs`); ``ranges``: the
    calibrated ranges (:func:`ort_ranges`), computed here when not given; ``only``: quantize these nodes
    alone."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "int8_ort.onnx"
        ranges = ranges or ort_ranges(onnx_path, calib, method, Path(tmp))
        output_ops, on_outputs = float_outputs(onnx_path)
        # U8S8 (uint8 activations, int8 weights): ONNX Runtime's fast path on x86. Measured on this
        # project's AVX2 machine: S8S8 QDQ ran at 0.6x FP32, U8S8 QDQ at 1.4x FP32 (resnet_tiny, 64 px).
        quantize_static(str(onnx_path), str(out), None, calibration_cache_path=ranges, quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=ort_method(method),
                        nodes_to_exclude=on_outputs + list(keep), nodes_to_quantize=list(only) or None,
                        extra_options={"OpTypesToExcludeOutputQuantization": output_ops})
        return onnx.load(str(out))


CONVERSIONS: dict[str, Callable[[Path, np.ndarray, str, Sequence[str]], onnx.ModelProto]] = {
    "fp16": to_fp16, "int8_ort": to_int8_ort, "int8": to_int8_modelopt,
}


# ------------------------------------------------------------------------------------------------
# INT8 recovery: what the field tries before it gives up on an INT8 artifact that fails the gate
# ------------------------------------------------------------------------------------------------
#
# Weights are already per channel in both quantizers (ModelOpt's default, per_channel=True for ONNX
# Runtime). When an INT8 artifact still fails the gate, the build tries, in order: the other calibration
# method, then keeping the layers that cost most accuracy in INT8 in FP32 (1, 2, 4, ... of them, at most
# MAX_KEPT_FRACTION of the quantized ones), and stops at the first that passes. The cap is generous
# because speed is judged anyway: a file with many layers in FP32 passes the gate but is served only if it
# is measured faster than the other candidates. The ranking is the field's
# layer-wise sensitivity analysis, measured once with ONNX Runtime's quantizer: the model with one layer
# alone quantized (the same calibrated ranges each time, so no recalibration), its logits on calibration
# images against FP32's; the layer whose INT8 alone costs the logits' signal-to-noise ratio most ranks
# first. One layer quantized at a time, not one left in FP32 at a time: with several layers each enough
# to ruin the logits, leaving any one of them in FP32 changes nothing, and that ranking is flat. Per-tensor
# statistics (ONNX Runtime's qdq_loss_debug) were tried first and missed an outlier channel, which leaves
# a tensor's overall ratio high while nearly all its other channels round to zero.
MAX_KEPT_FRACTION = 0.5
SENSITIVITY_IMAGES = 32  # calibration images the ranking runs
# Not ranked (they stay quantized in every recovery try): ops that only
# move data. In Q/DQ form they pass their input's scale through, so quantizing one alone rounds the same
# tensor its producer's or consumer's ranking already rounds; ranking them repeated that cost. A ViT-S/16
# has 429 quantized nodes, 173 of them these (each single-node quantization about 2 s here).
DATA_MOVEMENT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Shape", "Gather",
                               "Concat", "Flatten", "Split", "Expand", "Identity"})


def logits_sqnr_db(reference: np.ndarray, other: np.ndarray) -> float:
    """20 log10(|x| / |x - y|) over the whole batch of logits, in dB."""
    from onnxruntime.quantization.qdq_loss_debug import compute_signal_to_quantization_noice_ratio

    return float(compute_signal_to_quantization_noice_ratio(reference, other))


def quantized_nodes(qdq: bytes, skip: frozenset[str] = frozenset()) -> list[str]:
    """The nodes of a Q/DQ graph (named as in the FP32 graph) that read an activation or weight through a
    DequantizeLinear, but for those whose op type is in ``skip``."""
    graph = onnx.load_from_string(qdq).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear", *skip)
            and any(i in dequantized for i in n.input)]


def sensitivity(onnx_path: Path, calib: np.ndarray, method: str) -> list[tuple[str, float]]:
    """The layers ONNX Runtime quantizes (but for DATA_MOVEMENT_OPS), most sensitive first, each with the
    logits' SQNR (dB) when it alone is quantized."""
    sample = calib[:SENSITIVITY_IMAGES]
    fp32 = ort_session(Path(onnx_path).read_bytes(), intra_op_threads=0)
    reference = fp32.run([OUTPUT_NAME], {INPUT_NAME: sample})[0]
    with tempfile.TemporaryDirectory() as tmp:
        ranges = ort_ranges(Path(onnx_path), calib, method, Path(tmp))

        def sqnr(only: Sequence[str]) -> float:
            qdq = to_int8_ort(Path(onnx_path), calib, method, (), ranges, only).SerializeToString()
            logits = ort_session(qdq, intra_op_threads=0).run([OUTPUT_NAME], {INPUT_NAME: sample})[0]
            return logits_sqnr_db(reference, logits)

        every = quantized_nodes(to_int8_ort(Path(onnx_path), calib, method, (), ranges).SerializeToString(),
                                DATA_MOVEMENT_OPS)
        step(f"sensitivity: {len(every)} layers, each quantized alone, on {len(sample)} images")
        ranked = [(name, sqnr([name])) for name in progress(every, "sensitivity", "layer")]
    return sorted(ranked, key=lambda r: r[1])


def recovery_plan(calib_method: str, ranked: list[tuple[str, float]]) -> list[tuple[str, list[str]]]:
    """The tries, in order: (calibration method, nodes kept in FP32)."""
    other = next(m for m in CALIB_METHODS if m != calib_method)
    plan: list[tuple[str, list[str]]] = [(other, [])]
    limit, k = max(1, int(MAX_KEPT_FRACTION * len(ranked))), 1
    while k <= limit:
        plan.append((calib_method, [name for name, _ in ranked[:k]]))
        k *= 2
    return plan


def recover_int8(name: str, onnx_path: Path, meta: ArtifactMetadata, calib: np.ndarray, calib_method: str,
                 out_dir: Path, produced: dict[str, bytes], results: dict[str, dict], extra: dict, rescore: Callable,
                 bounds: Bounds, ranked: list[tuple[str, float]]) -> dict:
    """Retry a failing INT8 artifact by :func:`recovery_plan` until its ONNX Runtime candidate passes the gate.
    On success ``produced`` and ``results`` hold the recovered artifact; returns what was tried. ``ranked``:
    :func:`sensitivity`, computed once for both INT8 files (it is a property of the model's layers)."""
    base = results[REFERENCE_ROW]["top1"]

    def tried(method: str, keep: list[str], r: dict, passed: bool) -> dict:
        return {"calibration": method, "kept_fp32": keep, "top1": r["top1"],
                "agreement": r["agreement_with_pytorch"], "passed": passed}

    tries = [tried(calib_method, [], results[name], False)]
    for method, keep in recovery_plan(calib_method, ranked):
        with private_copy(onnx_path) as source:
            model = CONVERSIONS[name](source, calib, method, keep)
        onnx.checker.check_model(model)
        blob = stamp(model, rebase_metadata(meta, Path(onnx_path).parent, out_dir), "int8",
                     {**extra, "calibration_method": method, "kept_fp32": keep}).SerializeToString()
        scored = rescore({name: blob})
        passed = not reasons(scored[name], base, bounds)
        tries.append(tried(method, keep, scored[name], passed))
        print(f"{name}: recovery with {method} calibration, {len(keep)} node(s) in FP32: {scores_text(scored[name])} "
              f"({'passes' if passed else 'fails'} the gate)")
        if passed:
            produced[name] = blob
            results.update(scored)
            break
    return {"tries": tries, "recovered": tries[-1]["passed"],
            "sensitivity_db": {n: round(db, 1) for n, db in ranked[:12]}}


def stamp(model: onnx.ModelProto, meta: ArtifactMetadata, precision: str, extra: dict) -> onnx.ModelProto:
    """Carry the metadata contract into the new artifact, recording what it was made from."""
    m = replace(meta, export=meta.export.updated(precision=precision, **extra))
    onnx.helper.set_model_props(model, {METADATA_KEY: m.to_json()})
    return model


# ------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------

def percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def scores_text(r: dict) -> str:
    return (f"top1 {percent(r['top1'])}%  agreement {r['agreement_with_pytorch']:.2f}%  "
            f"top-5 overlap {r.get('top5_overlap', 100.0):.2f}%")


def artifact_row(name: str, r: dict, failed: bool) -> str:
    lat = r["latency"]
    return (f"| {name} | {r.get('engine', EngineName.ONNXRUNTIME)} | {r.get('precision', name)} | {r['file']} | "
            f"{r['size_bytes'] / 2 ** 20:.2f} MiB | {percent(r['top1'])} | {r['agreement_with_pytorch']:.2f} | "
            f"{percent(r.get('top5_overlap'))} | {r['max_abs_logit_diff']:.3g} | {lat['batch1_ms']:.2f} | "
            f"{lat['best_batch']} | {lat['best_images_per_s']:.0f} | {'FAIL' if failed else 'pass'} |")


def pruned_lines(pruned: dict) -> list[str]:
    """The rows `make prune` (perf.ab.pruned) added for this same FP32 model."""
    lines = ["", "## Pruned", "",
             "Served by the real server side by side with the unpruned model, perf_analyzer at one "
             "concurrency, alternating rounds; ratio = pruned / unpruned in the same round, median (min–max).", "",
             "| artifact | file | parameters | FLOPs | size | top-1 % | agreement with unpruned % | "
             "served vs unpruned, JPEG | served vs unpruned, tensors |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in pruned.items():
        u, ratio = r["unpruned"], r["served_vs_unpruned"]
        served = " | ".join(f"{ratio[s]['median']:.2f}× ({ratio[s]['min']:.2f}–{ratio[s]['max']:.2f})"
                            for s in ("jpeg", "tensors"))
        lines.append(f"| {name} | {r['file']} | {r['params'] / 1e3:.0f}K ({r['params'] / u['params']:.2f}) | "
                     f"{r['flops'] / 1e6:.1f}M ({r['flops'] / u['flops']:.2f}) | {r['size_bytes'] / 2 ** 20:.2f} MiB | "
                     f"{r['top1']:.2f} (unpruned {u['top1']:.2f}) | {r['agreement_with_unpruned']:.2f} | "
                     + served + " |")
    return lines


def markdown(report: dict) -> str:
    calibration = report["calibration"]
    judged = report.get("judged_on", f"the val split `{report['data']}/val`")
    gate_text = report.get("gate", f"top-1 may drop at most {report['max_top1_drop']} points below FP32")
    lines = [f"# Build report: {report['source_onnx']}", "",
             f"Judged on {judged}: {report['val_images']} images; calibration: "
             f"{calibration['images']} images, method `{calibration['method']}` "
             f"(`calib/calib.npy`, `calib/calib_sources.txt`). Gate: {gate_text}.", "",
             f"Model: {report.get('model', {}).get('arch', '?')}, "
             f"{report.get('model', {}).get('parameters', 0) / 1e6:.2f}M parameters.", "",
             f"| candidate | engine | precision | file | size | top-1 % | agreement with "
             f"{report.get('reference', 'PyTorch')} % | top-5 overlap % | max logit diff | ms at batch 1 | best batch "
             "| img/s at best | gate |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [artifact_row(name, r, name in report["gate_failures"]) for name, r in report["artifacts"].items()]
    lines += [f"| {name} | {u['engine']} | {u['precision']} | {u['file']} | – | – | – | – | – | – | – | – | "
              f"cannot run: {u['error'][-200:]} |" for name, u in report.get("unsupported", {}).items()]
    serving = ", ".join(f"{p} → **{name}**" for p, name in report.get("serving", {}).items())
    lines += ["", f"Embedded (CPU, ONNX Runtime) INT8 choice: **{report['embedded_int8']}** — "
              f"{report['embedded_int8_reason']}.",
              f"Fastest candidate on this CPU that passes the gate: **{report['fastest_passing']}**.",
              f"`make repo` serves, by PRECISION (the fastest passing; another engine than ONNX Runtime only when "
              f"{ENGINE_MARGIN_TEXT} faster): {serving}.", "", cpu_text(report.get("cpu", {})), "",
              "Latencies are measured on this machine's CPU as served (one thread per core, in this process); "
              "TensorRT engines are measured by `make gpu-check`."]
    if report.get("int8_recovery"):
        lines += ["", "## INT8 recovery", "",
                  "Weights are per channel in both INT8 files. A file that failed the gate was retried with the "
                  "other calibration method, then with its most sensitive layers kept in FP32:", "",
                  "| file | calibration | layers kept in FP32 | top-1 % | agreement % | gate |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, r in report["int8_recovery"].items():
            lines += [f"| {ARTIFACT_NAMES[name]} | {t['calibration']} | {', '.join(t['kept_fp32']) or 'none'} | "
                      f"{percent(t['top1'])} | {percent(t.get('agreement'))} | {'pass' if t['passed'] else 'FAIL'} |"
                      for t in r["tries"]]
    if report.get("pruned"):  # rows added by `make prune` (perf.ab.pruned) for this same FP32 model
        lines += pruned_lines(report["pruned"])
    return "\n".join(lines) + "\n"


def load_judged(meta: ArtifactMetadata, images: GateImages, bounds: Bounds
                ) -> tuple[DaliPreprocessor, np.ndarray]:
    """(the streaming preprocess of the judged images, a first batch for the latencies); warn when one image is
    worth more than a bound allows."""
    pre = DaliPreprocessor(meta.preprocess, batch_size=32)  # the images are streamed: any number fits in memory
    sample = next(pre.iter_files(images.judge[:32]))
    one = 100 / max(1, len(images.judge))
    if images.labelled and one > bounds.max_top1_drop:
        print(f"warning: {len(images.judge)} images are judged, so one image is {one:.2f} points of top-1, more than "
              f"the allowed drop of {bounds.max_top1_drop}: a single changed prediction fails the gate")
    if one > 100 - bounds.min_agreement:
        print(f"warning: {len(images.judge)} images are judged, so one changed answer is {one:.2f}% of agreement, "
              f"more than the {100 - bounds.min_agreement:.2f}% MIN_AGREEMENT={bounds.min_agreement} allows")
    return pre, sample


def convert(onnx_path: Path, meta: ArtifactMetadata, calib: np.ndarray, calib_method: str, out_dir: Path,
            precisions: Collection[str]) -> tuple[dict[str, bytes], dict]:
    """The FP32 bytes and every requested conversion (checked and stamped, in CONVERSIONS order), with the
    provenance stamped into each: (name -> serialized model, provenance)."""
    fp32_bytes = Path(onnx_path).read_bytes()
    produced = {"fp32": fp32_bytes}
    extra = {"derived_from_sha256": hashlib.sha256(fp32_bytes).hexdigest(), "calibration_images": len(calib),
             "calibration_method": calib_method}
    for name in [n for n in CONVERSIONS if n in precisions]:
        step(f"converting {name}")
        with private_copy(onnx_path) as source:
            model = CONVERSIONS[name](source, calib, calib_method, ())
        onnx.checker.check_model(model)
        produced[name] = stamp(model, rebase_metadata(meta, Path(onnx_path).parent, out_dir),
                               "int8" if name.startswith("int8") else name, extra).SerializeToString()
        print(f"converted {name}")
    return produced, extra


def candidates_for(produced: Collection[str], engines: Collection[str] | None = None) -> dict[str, Candidate]:
    """The CANDIDATES whose artifact was produced, on the engines asked for (None: every engine of the
    embedded target; its default, ONNX Runtime, always: the gate's FP32 reference row and the files' own
    check)."""
    default = registry.default_for(Target.EMBEDDED).name
    return {n: c for n, c in CANDIDATES.items() if c.artifact in produced and
            (c.engine == default or engines is None or c.engine in engines)}


def score(produced: dict[str, bytes], ckpt: dict | None, pre: DaliPreprocessor, paths: list[Path],
          labels: np.ndarray | None, sample: np.ndarray, engines: Collection[str] | None = None,
          unsupported: dict[str, dict] | None = None, reference: dict[str, np.ndarray] | None = None
          ) -> dict[str, dict]:
    """Every candidate's accuracy against the labels (None: none) and the reference (one streamed pass), size and
    latency.
    The reference is PyTorch, or for an imported model (no checkpoint) the imported FP32 ONNX itself.
    ``reference``: its logits are kept there under "logits" and reused when already there (a rescore).

    Each candidate runs on its engine's scoring runner (served/engines.py). ONNX Runtime's candidates run here;
    those of an engine whose record says ``isolated`` (OpenVINO) in a process of their own
    (core.runners.isolated: loaded here it corrupted this process's heap), on the same images, each timed
    there as ONNX Runtime's are here (every core, same batches). A candidate whose engine cannot compile its
    file goes into ``unsupported`` with the engine's error, and is never served."""
    unsupported = {} if unsupported is None else unsupported
    candidates = candidates_for(produced, engines)
    here = {n: registry.get(c.engine).measuring(produced[c.artifact], c.inference_precision)
            for n, c in candidates.items() if not registry.get(c.engine).isolated}
    others = {n: (c.engine, produced[c.artifact], c.inference_precision) for n, c in candidates.items()
              if registry.get(c.engine).isolated}
    reference = {} if reference is None else reference
    runs: dict[str, Runner] = dict(here)
    if "logits" not in reference:
        runs["reference"] = (partial(logits_for_inputs, model_from_checkpoint(ckpt)) if ckpt is not None
                             else here["fp32"])
    step(f"scoring {', '.join(runs)} on {len(paths)} val images")
    batches = progress(pre.iter_files(paths), "scoring", "batch", total=-(-len(paths) // pre.batch_size))
    logits = stream_logits(runs, batches)
    if "reference" in logits:
        reference["logits"] = logits.pop("reference")
    reference_logits = reference["logits"]
    step(f"timing {', '.join(here)} at batches 1, 8, 16, 32")
    timed = {name: latency(here.pop(name), sample) for name in list(here)}
    if others:
        step(f"scoring and timing {', '.join(others)} in a process of their own (their engine's record: isolated)")
        measured = isolated(score_isolated, others, pre.spec.to_dict(), [str(p) for p in paths], sample)
        for name, m in measured.items():
            if "error" in m:
                c = candidates[name]
                unsupported[name] = {"engine": c.engine, "precision": c.precision, "file": ARTIFACT_NAMES[c.artifact],
                                     "error": m["error"].replace("|", "/")}
                print(f"{name:17s} {c.engine} cannot run {ARTIFACT_NAMES[c.artifact]}: {m['error']}")
            else:
                logits[name], timed[name] = m["logits"], m["latency"]
    results = {}
    for name, c in candidates.items():
        if name not in timed:
            continue
        results[name] = {"engine": c.engine, "precision": c.precision, "file": ARTIFACT_NAMES[c.artifact],
                         **accuracy(logits[name], labels, reference_logits), "size_bytes": len(produced[c.artifact]),
                         "latency": timed[name]}
        r = results[name]
        print(f"{name:17s} {scores_text(r)}  max|diff| {r['max_abs_logit_diff']:.3g}  "
              f"{r['latency']['best_images_per_s']:.0f} img/s (batch {r['latency']['best_batch']})")
    return results


def cpu_features() -> dict:
    """The CPU's instruction sets that the engines' fast paths use, and OpenVINO's view of them."""
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        line = next((ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("flags")), "")
        flags = set(line.split(":", 1)[-1].split())
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
    info: dict = {"flags": [f for f in wanted if f in flags], "cores": os.cpu_count() or 1}  # what the timings used
    info["openvino"] = isolated(openvino_capabilities)  # not loaded here: see score()
    return info


def cpu_text(cpu: dict) -> str:
    """What the engines used on this CPU, and what a CPU without those units gets."""
    if not cpu:
        return ""
    flags = cpu.get("flags", [])
    bf16 = "amx_bf16" in flags or "avx512_bf16" in flags
    return (f"CPU features: {', '.join(flags) or 'none of AVX2/AVX-512/VNNI/AMX'} (OpenVINO: "
            f"{', '.join(cpu.get('openvino', [])) or 'not installed'}). "
            + ("bf16 ran on this CPU's AMX / AVX-512 BF16 units; " if bf16 else
               "This CPU has no bf16 units: OpenVINO computed the bf16 candidate in f32; ")
            + "a CPU without them runs bf16 as f32 (no speed-up), and INT8 without VNNI/AMX runs on AVX2 "
              "or AVX-512 at a fraction of the speed measured here: measure on the serving CPU.")


def images_per_s(result: dict) -> float:
    return result["latency"]["best_images_per_s"]


def serving(report: dict) -> dict[str, str]:
    """By PRECISION (and auto): the candidate `make repo` serves, the fastest that passes the gate."""
    passing = [n for n in report["artifacts"] if n not in report["gate_failures"]]
    by_precision = {str(p): [n for n in passing if CANDIDATES[n].precision == p] for p in PRECISIONS}
    choice = {p: fastest(report, names) for p, names in by_precision.items() if names}
    return {**choice, "auto": fastest(report, passing)} if passing else choice


def embedded_int8(results: dict[str, dict], failures: list[str]) -> tuple[str | None, str]:
    """The INT8 artifact the CPU target serves (the faster of those that pass the gate) and why."""
    int8s = [n for n in ("int8", "int8_ort") if n in results and n not in failures]
    if not int8s:
        return None, "no INT8 artifact passed the gate"
    embedded = max(int8s, key=lambda n: images_per_s(results[n]))
    speed, fp32_speed = images_per_s(results[embedded]), images_per_s(results["fp32"])
    verdict = "faster" if speed > fp32_speed else "NOT faster than FP32, so FP32 stays the recommended CPU precision"
    return embedded, f"{speed:.0f} img/s against FP32's {fp32_speed:.0f} img/s on ONNX Runtime: {verdict}"


def write_artifacts(produced: dict[str, bytes], failures: list[str], out_dir: Path) -> None:
    """Only what passed the gate is written; an older one that did not is removed."""
    for name, blob in produced.items():
        if name != "fp32" and name not in failures:
            write_blob(out_dir / ARTIFACT_NAMES[name], blob)
        elif name in failures:
            (Path(out_dir) / ARTIFACT_NAMES[name]).unlink(missing_ok=True)


def write_report(report: dict, out_dir: Path, fp32_sha256: str) -> None:
    """build_report.json and .md, keeping the pruned rows that were measured against this same FP32 model."""
    previous = Path(out_dir) / REPORT
    if previous.is_file():
        pruned = {name: row for name, row in json.loads(previous.read_text()).get("pruned", {}).items()
                  if row.get("unpruned_onnx_sha256") == fp32_sha256}
        if pruned:
            report["pruned"] = pruned
    write_text(out_dir / REPORT, json.dumps(report, indent=2))
    write_text(out_dir / "build_report.md", markdown(report))
    print(f"wrote {out_dir / REPORT} and build_report.md")


def gate_error(results: dict[str, dict], failures: list[str], calib_method: str, calib_images: int,
               bounds: Bounds, recovery: dict | None = None) -> AccuracyGateError:
    """The error that fails the build: why each failing artifact fails, what recovery tried, and what is left to
    try for INT8."""
    tried = "; ".join(f"{name} recovery tried {len(r['tries']) - 1} ways (other calibration, up to "
                      f"{max(len(t['kept_fp32']) for t in r['tries'])} layers in FP32; build_report.md)"
                      for name, r in (recovery or {}).items() if not r["recovered"])
    hint = (f"; for INT8 try more calibration images (CALIB_SIZE, now {calib_images})"
            if any(n.startswith("int8") for n in failures) else "") + (f"; {tried}" if tried else "")
    base = results[REFERENCE_ROW]["top1"]
    why = ", ".join(f"{n}: {' and '.join(reasons(results[n], base, bounds))}" for n in failures)
    return AccuracyGateError(f"accuracy gate failed: {why}; not written" + hint)


def build(onnx_path: Path, data: Path, out_dir: Path, calib_size: int = DEFAULT_CALIB_SIZE,
          calib_method: str = DEFAULT_CALIB_METHOD, max_top1_drop: float = DEFAULT_MAX_TOP1_DROP,
          precisions: Collection[str] = ("fp16", "int8", "int8_ort"),
          engines: Collection[str] | None = None, min_agreement: float = DEFAULT_MIN_AGREEMENT,
          min_top5_overlap: float = DEFAULT_MIN_TOP5_OVERLAP) -> dict:
    """Calibrate, convert, score every candidate (artifact x engine) on the judged images (build.gate: a
    labelled val split, or a held-out part of an unlabelled folder), gate, write what passed and the report."""
    if calib_method not in CALIB_METHODS:
        raise ValueError(f"calibration method must be one of {', '.join(CALIB_METHODS)}, got {calib_method!r}")
    bounds = Bounds(max_top1_drop, min_agreement, min_top5_overlap)
    meta = read_metadata(onnx_path)
    ckpt = load_checkpoint(source_checkpoint(onnx_path, meta)) if has_checkpoint(meta) else None
    images = gate_images(Path(data), meta.classes)
    paths, labels = images.judge, images.labels
    pre, sample = load_judged(meta, images, bounds)
    calib = calibration_batch(meta, images.calibrate, Path(data), calib_size, out_dir)
    print(f"calibration: {len(calib)} images ({calib_method}) -> {out_dir / 'calib' / 'calib.npy'}; judged on "
          f"{images.source}")

    produced, extra = convert(onnx_path, meta, calib, calib_method, out_dir, precisions)
    unsupported: dict[str, dict] = {}
    reference: dict[str, np.ndarray] = {}
    results = score(produced, ckpt, pre, paths, labels, sample, engines, unsupported, reference)
    failures = gate_failures(results, bounds)
    rescore = partial(score, ckpt=ckpt, pre=pre, paths=paths, labels=labels, sample=sample, engines=engines,
                      unsupported=unsupported, reference=reference)
    failing = [name for name in ("int8_ort", "int8") if name in failures]
    ranked: list[tuple[str, float]] = []
    if failing:
        with private_copy(onnx_path) as source:
            ranked = sensitivity(source, calib, calib_method)
    recovery = {name: recover_int8(name, onnx_path, meta, calib, calib_method, out_dir, produced, results, extra,
                                   rescore, bounds, ranked) for name in failing}
    failures = gate_failures(results, bounds)
    embedded, reason = embedded_int8(results, failures)
    passing = [n for n in results if n not in failures]
    report = {"source_onnx": str(onnx_path), "data": str(data), "val_images": len(paths),
              "judged_on": images.source, "labelled": images.labelled, "gate": describe(bounds, images.labelled),
              "max_top1_drop": max_top1_drop, "min_agreement": min_agreement, "min_top5_overlap": min_top5_overlap,
              "calibration": {"images": len(calib), "method": calib_method},
              "artifacts": results, "gate_failures": failures, "embedded_int8": embedded,
              "embedded_int8_reason": reason,
              "fastest_passing": max(passing, key=lambda n: images_per_s(results[n])),
              "reference": "PyTorch" if ckpt is not None else "the imported FP32 ONNX",
              "model": {"arch": meta.arch, "parameters": parameter_count(onnx_path)},
              "fp32_sha256": extra["derived_from_sha256"], "cpu": cpu_features(), "unsupported": unsupported,
              "int8_recovery": recovery}
    report["serving"] = serving(report)
    write_artifacts(produced, failures, out_dir)
    write_report(report, out_dir, extra["derived_from_sha256"])
    if failures:
        raise gate_error(results, failures, calib_method, len(calib), bounds, recovery)
    return report


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="FP16 / INT8 ONNX artifacts with an accuracy gate and a build report")
    p.add_argument("--onnx", type=Path, default=Path("artifacts/model.onnx"),
                   help="the FP32 ONNX from build.export_onnx")
    p.add_argument("--data", type=Path, required=True,
                   help="ImageFolder root (train/ calibrates, val/ is scored), or any folder of images without "
                        "labels (a quarter held out to judge on agreement, the rest calibrates)")
    p.add_argument("--out", type=Path, default=Path("artifacts"))
    p.add_argument("--calib-size", type=int, default=DEFAULT_CALIB_SIZE,
                   help="training images used for INT8 calibration")
    p.add_argument("--calib-method", choices=CALIB_METHODS, default=DEFAULT_CALIB_METHOD,
                   help="max: full observed range; entropy: KL-optimal clipping (TensorRT's entropy calibrator)")
    p.add_argument("--max-top1-drop", type=float, default=DEFAULT_MAX_TOP1_DROP,
                   help="allowed top-1 drop below FP32, in points (labelled data)")
    p.add_argument("--min-agreement", type=float, default=DEFAULT_MIN_AGREEMENT,
                   help="the least top-1 agreement with the reference (PyTorch, or the FP32 file), in %%")
    p.add_argument("--min-top5-overlap", type=float, default=DEFAULT_MIN_TOP5_OVERLAP,
                   help="the least mean share of the reference's top 5 in a candidate's top 5, in %%")
    p.add_argument("--precisions", nargs="*", default=list(CONVERSIONS), choices=list(CONVERSIONS))
    # (run in CONVERSIONS order whatever the order given)
    p.add_argument("--engines", nargs="+", default=list(registry.names(Target.EMBEDDED)),
                   choices=list(registry.names(Target.EMBEDDED)),
                   help="the CPU engines each artifact is scored and timed on (ONNX Runtime always)")
    return p


if __name__ == "__main__":
    a = get_args_parser().parse_args()
    try:
        build(a.onnx, a.data, a.out, a.calib_size, a.calib_method, a.max_top1_drop, tuple(a.precisions),
              tuple(a.engines), a.min_agreement, a.min_top5_overlap)
    except (AccuracyGateError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
