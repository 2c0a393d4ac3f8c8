"""Render the Triton model repository from an exported ONNX model (and nothing else).

    python -m build.render_repo --onnx artifacts/model.onnx --out model_repository

The layout (build/layouts.py) decides how the chain is cut into models and builds their configs; this
module adds the files each model needs (the ONNX or the TensorRT plan, the DALI pipeline, the labels,
the Python-backend code with the served package beside it), records what the repository
was rendered from (build.json), and replaces the repository as a whole. Preprocessing parameters,
classes and shapes come from the ONNX metadata.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from build import layouts
from build.artifacts import (
    ARTIFACT_NAMES,
    CANDIDATES,
    PRECISIONS,
    Candidate,
    artifact_for,
    candidate_name,
    current_report,
    fitted_batch,
    fitted_instances,
    served_for,
)
from build.deployment_file import (
    CONFIG_HEADER,
    DEPLOYMENT_FILE,
    DeploymentFile,
    Setting,
    Source,
    as_written,
    table,
)
from build.engine_choice import probe, why
from build.gate import DEFAULT_MIN_AGREEMENT, DEFAULT_MIN_TOP5_OVERLAP, Bounds
from build.layouts import MODEL_DALI, PIPELINE_FILE, ConfigInputs, Layout
from build.model_config import config_text
from build.settings import MANIFEST, RepoSettings, add_settings_args, read_manifest
from core import protocol as P
from core.atomic_io import atomic_write_bytes, staged_directory
from core.metadata import ArtifactMetadata, file_sha256, read_metadata
from core.preprocess import DALI_INPUT_NAME, PreprocessSpec
from served import engines
from served.engines import InferencePrecision, Precision, Target

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REPO = ROOT / "model_repository"
# The code that runs inside Triton (served/): copied as one unit, the folder served/ with its modules, into the
# version folder of every Python-backend model and of the DALI pipeline, whose files import it as ``served``
PACKAGE = "served"
SERVED = ROOT / PACKAGE
# The committed Python-backend model code; each file becomes <model>/1/model.py of a rendered repository,
# which is generated output only (model_repository/ holds nothing committed but its README)
MODEL_CODE = SERVED / "models"
# The preprocess model's pipeline: a definition DALI serializes itself (served/models/dali.py), the
# one graph it imports (served/dali_graph.py, in the package) and the spec it reads, in its version folder
GRAPH_FILE, PIPELINE_CONFIG = f"{PACKAGE}/dali_graph.py", "preprocess.json"
# What Triton's DALI backend runs when a model has no serialized pipeline (dali_backend r24.10,
# src/model_provider/model_provider.h): load the file by path, serialize its one @autoserialize pipeline.
AUTOSERIALIZE = """import importlib.util, sys
from nvidia.dali._utils.autoserialize import invoke_autoserialize
spec = importlib.util.spec_from_file_location('autoserialize_mod', sys.argv[1])
head_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(head_module)
invoke_autoserialize(head_module, sys.argv[2])
"""


def labels_file(repo: Path, layout: str | None = None) -> Path:
    """Where a rendered repository keeps its class names, one per line: by ``layout``, else by the one it was
    rendered with."""
    lay = layouts.get(layout) if layout else layouts.of_manifest(read_manifest(repo))
    return lay.labels_file(repo)


def package_files() -> dict[str, bytes]:
    """The served package as one unit, by path relative to a version folder (served/__init__.py, ...): its
    modules, not the model entry files of served/models/ (each is copied as its model's model.py)."""
    return {f"{PACKAGE}/{p.name}": p.read_bytes() for p in sorted(SERVED.glob("*.py"))}


def pipeline_files(spec: PreprocessSpec, s: RepoSettings, device: str) -> dict[str, bytes]:
    """preprocess/1/'s pipeline definition: dali.py, the package holding the graph it imports, and the spec
    it reads."""
    config = {"spec": spec.to_dict(), "device": device, "device_id": 0 if device == "gpu" else None,
              "input_name": DALI_INPUT_NAME, "max_batch_size": s.max_batch_size, "num_threads": s.dali_threads}
    return {PIPELINE_FILE: (MODEL_CODE / PIPELINE_FILE).read_bytes(), **package_files(),
            PIPELINE_CONFIG: json.dumps(config, indent=2).encode()}


def autoserialize(pipeline: dict[str, bytes], python: str = sys.executable) -> bytes:
    """The serialized pipeline, made exactly as the DALI backend makes it: the backend's command, in a
    fresh interpreter without the project on its path (so dali.py proves self-contained)."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in pipeline.items():
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / name).write_bytes(data)
        out = Path(tmp) / "model.dali"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        r = subprocess.run([python, "-c", AUTOSERIALIZE, str(Path(tmp) / PIPELINE_FILE), str(out)], cwd=tmp, env=env,
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0 or not out.is_file():
            raise RuntimeError(f"DALI could not serialize the preprocess pipeline {PIPELINE_FILE}:\n{r.stderr[-3000:]}")
        return out.read_bytes()


def check_float32_io(onnx_path: Path, names: tuple[str, ...]) -> None:
    """The TensorRT classifier sits between DALI (FP32 pixels) and postprocess (FP32 logits): its ONNX must
    keep FP32 inputs/outputs whatever its inner precision (AutoCast keep_io_types, Q/DQ inside)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)}
    wrong = {n: onnx.TensorProto.DataType.Name(types[n]) for n in names
             if n in types and types[n] != onnx.TensorProto.FLOAT}
    if wrong:
        raise ValueError(f"{onnx_path}: the GPU ensemble feeds and reads the classifier in FP32, but its "
                         f"{', '.join(f'{n} is {t}' for n, t in wrong.items())}; convert with FP32 inputs/outputs "
                         "(make quantize keeps them)")




def check_plan_stamp(plan: Path, onnx_sha: str, onnx_path: Path, settings: RepoSettings) -> None:
    stamp = json.loads(Path(f"{plan}.json").read_text())
    if stamp["onnx_sha256"] != onnx_sha:
        raise ValueError(f"{plan} was built from another ONNX (sha256 {stamp['onnx_sha256'][:12]}...), "
                         f"not {onnx_path}: rebuild it with `make engine`")
    if stamp["profile"]["max"] < settings.max_batch_size:
        # Triton would refuse the model: max_batch_size beyond the engine's optimization profile
        raise ValueError(f"{plan} accepts batches up to {stamp['profile']['max']} (its optimization profile) "
                         f"but the repository's max_batch_size is {settings.max_batch_size}: rebuild the "
                         f"engine with `make engine MAX_BATCH={settings.max_batch_size}` or render with "
                         f"MAX_BATCH={stamp['profile']['max']}")


def model_files(lay: Layout, target: str, onnx_path: Path, onnx_bytes: bytes, settings: RepoSettings,
                plan: Path | None, out: Path) -> dict[Path, bytes]:
    """What runs the classifier: the ONNX itself (embedded), else the TensorRT plan built from it."""
    onnx_sha = hashlib.sha256(onnx_bytes).hexdigest()
    if target == Target.EMBEDDED:
        return {Path(lay.onnx_model, "1", "model.onnx"): onnx_bytes}
    if plan is None:
        print(f"note: no TensorRT plan given: {out}/{P.CLASSIFIER}/1/model.plan is missing until you build one "
              "with `make engine` (GPU + TensorRT) and render again with PLAN=...")
        return {}
    check_plan_stamp(plan, onnx_sha, onnx_path, settings)
    return {Path(P.CLASSIFIER, "1", "model.plan"): Path(plan).read_bytes(),
            Path(P.CLASSIFIER, "1", "model.plan.json"): Path(f"{plan}.json").read_bytes()}


def code_files(lay: Layout, target: str) -> dict[Path, bytes]:
    """Each Python-backend model's model.py (its file of served/models/) and the served package beside it."""
    files: dict[Path, bytes] = {}
    package = package_files()
    for model, main in lay.code.get(target, {}).items():
        version = Path(model, "1")
        files[version / "model.py"] = (MODEL_CODE / f"{main}.py").read_bytes()
        files.update({version / name: data for name, data in package.items()})
    if not lay.single_model:  # the ensemble's version folder must exist and, in object stores, hold a file
        files[Path(P.ENSEMBLE, "1", ".placeholder")] = b""
    return files


def manifest(lay: Layout, target: str, onnx_path: Path, onnx_sha: str, plan: Path | None, out: Path,
             meta: ArtifactMetadata, spec: PreprocessSpec, settings: RepoSettings, served: Candidate | None,
             choice: str | None = None, deployment: DeploymentFile | None = None) -> bytes:
    """What this repository was rendered from and with: read back by the tuner and the reports. ``deployment``:
    the values its deployment file was written with, by name (a later render finds what was edited since)."""
    def rel(p: Path) -> str:
        return os.path.relpath(Path(p).resolve(), Path(out).resolve())

    return json.dumps({
        "target": target, "layout": lay.name, "onnx": rel(onnx_path), "onnx_sha256": onnx_sha,
        "plan": rel(plan) if plan else None,
        "precision": served.precision if served else meta.export.precision,
        "engine": served.engine if served else engines.default_for(Target.GPU).name,
        "inference_precision": served.inference_precision if served else None,
        "engine_choice": choice,  # why this engine and precision: what was measured, or None
        "settings": asdict(settings), "classes": len(meta.classes), "input_shape": list(spec.input_shape),
        "deployment": {n: as_written(s.value) for n, s in
                       ({**deployment.choices, **deployment.settings} if deployment else {}).items()}},
        indent=2).encode()


def deployment_of(settings: RepoSettings, target: str, layout: str, served: Candidate | None) -> DeploymentFile:
    """The deployment file of a render that was not `make repo`'s (make tune, make analyze, the reports): values
    other than the defaults are the caller's, and pinned."""
    defaults = RepoSettings()

    def entry(value: Any, default: Any) -> Setting:
        return Setting(value) if value == default else Setting(value, Source.PINNED, "set by the render's caller")

    entries = {f.name: entry(getattr(settings, f.name), getattr(defaults, f.name)) for f in fields(RepoSettings)}
    engine = served.engine if served else engines.default_for(target).name
    return DeploymentFile({}, {"target": Setting(target), "layout": entry(layout, layouts.DEFAULT_LAYOUT[target]),
                               "precision": Setting(served.precision if served else "auto"),
                               "engine": Setting(engine)}, entries)


def write_repository(out: Path, files: dict[Path, bytes], configs: dict[str, mc.ModelConfig], target: str) -> None:
    """The files belong together (a config names the tensors, shapes and batch sizes of its neighbours):
    changed in a copy that replaces the repository in one rename, so that neither the server nor a render
    killed half-way sees a mix of two renders. What an earlier render left and this one does not write goes."""
    with staged_directory(out) as stage:
        for rel, data in files.items():
            atomic_write_bytes(stage / rel, partial(Path.write_bytes, data=data))
        if target == Target.GPU:  # a serialized pipeline left by an earlier render would be loaded instead of dali.py
            (stage / P.PREPROCESS / "1" / MODEL_DALI).unlink(missing_ok=True)
        all_models = {m for lay in layouts.LAYOUTS.values() for t in lay.code.values() for m in t} | {P.ENSEMBLE}
        for folder in stage.iterdir():  # models of another layout, left by an earlier render
            ours = folder.name in all_models or (folder / "config.pbtxt").is_file()
            if folder.is_dir() and ours and folder.name not in configs:
                shutil.rmtree(folder)
        folders = {parent for rel in files for parent in rel.parents}  # those holding a file of this render
        for name in configs:  # files another layout left in a model folder of this one (its version 1 included)
            folder, version = stage / name, stage / name / "1"
            for stale in [*folder.iterdir(), *(sorted(version.rglob("*")) if version.is_dir() else ())]:
                if not stale.exists():  # in a folder removed before it
                    continue
                if stale.is_file() and stale.relative_to(stage) not in files:
                    stale.unlink()
                elif stale.is_dir() and version in stale.parents and stale.relative_to(stage) not in folders:
                    shutil.rmtree(stale)  # e.g. __pycache__, served/__pycache__


def warn_about_the_drift_reference(reference: Mapping[str, Any] | None, classes: Sequence[str],
                                   settings: RepoSettings) -> None:
    """What the drift score cannot see: no reference at all, or classes the model never answered on it (their
    bins hold only the smoothing's half answer, so a window that answers them scores higher)."""
    if settings.drift_window <= 0:
        return
    if not reference:
        print("warning: the model has no drift reference (imported with `make import`, or exported before it was "
              "recorded): image_classifier_drift_psi is not served; `make onnx` records one")
        return
    missing = [name for name, share in zip(classes, reference["classes"], strict=True) if share == 0]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        print(f"warning: the drift reference ({reference['answers']} answers on the {reference['split']} split) has "
              f"no answer of {len(missing)} of {len(classes)} classes ({shown}): traffic of those classes raises "
              "the class-mix score; a val split with images of every class makes a reference that holds them")


def check_payload_settings(s: RepoSettings, configs: dict[str, mc.ModelConfig], layout: str) -> None:
    """Payload sampling asked for is rendered, or refused with why (never silently dropped)."""
    if s.payload_upload and not (s.payload_dir and s.payload_percent > 0):
        raise ValueError("PAYLOAD_UPLOAD ships the samples that PAYLOAD_DIR stages: give PAYLOAD_DIR and "
                         "PAYLOAD_PERCENT too")
    if s.payload_percent > 0 and not s.payload_dir:
        raise ValueError("PAYLOAD_PERCENT needs PAYLOAD_DIR: the folder the samples are written to")
    if s.payload_percent > 0 and not any("payload_dir" in c.parameters for c in configs.values()):
        raise ValueError(f"payload sampling needs the fused layout (its one model holds both the image bytes and "
                         f"the answer); the {layout} layout has no such model")


def render(onnx_path: Path, out: Path, settings: RepoSettings | None = None, target: str = Target.EMBEDDED,
           plan: Path | None = None, layout: str | None = None, served: Candidate | None = None,
           choice: str | None = None, deployment: DeploymentFile | None = None) -> dict[str, Path]:
    """Write the repository: everything is computed in memory first, then the repository is replaced as a whole.

    embedded: the ONNX runs on ``served``'s engine (default: ONNX Runtime, in the file's own precision). gpu:
    ``plan`` (from build.engine, built from this very ONNX) runs in TensorRT; without a plan the configs are
    rendered and the plan is reported missing.
    """
    settings = settings or RepoSettings()
    meta = read_metadata(Path(onnx_path))
    spec, classes, export = meta.preprocess, meta.classes, meta.export
    onnx_bytes = Path(onnx_path).read_bytes()
    onnx_sha = hashlib.sha256(onnx_bytes).hexdigest()
    lay = layouts.get(layout) if layout else layouts.default_for(target)
    lay.check(target, export, Path(onnx_path))
    if export.fixed_batch is not None:  # a graph make import could not make dynamic (build.import_onnx)
        if target == Target.GPU:
            raise ValueError(f"{onnx_path}'s batch is fixed at {export.fixed_batch} inside the graph (make import "
                             "could not make it dynamic): the GPU target's TensorRT plan is built for a range of "
                             "batches; serve it on the embedded target")
        print(f"note: {onnx_path}'s batch is fixed at {export.fixed_batch} inside the graph (make import): "
              f"{engines.fixed_batch_cost(export.fixed_batch)}")
    if target == Target.EMBEDDED and served is None:
        precision = export.precision
        served = CANDIDATES[precision] if precision in CANDIDATES else CANDIDATES[Precision.FP32]
    served = served if target == Target.EMBEDDED else None
    if target == Target.GPU:
        check_float32_io(onnx_path, export.tensor_names)
    warn_about_the_drift_reference(export.reference, classes, settings)
    configs = lay.build_configs(ConfigInputs(spec, len(classes), settings, target, export))
    check_payload_settings(settings, configs, lay.name)
    if settings.response_cache_mb > 0:  # answers to requests seen before come from the server's cache
        configs[P.ENSEMBLE].response_cache.enable = True
    if served is not None:
        params = configs[lay.onnx_model].parameters
        params["onnx_sha256"].string_value = onnx_sha
        params["engine"].string_value = served.engine
        params["inference_precision"].string_value = served.inference_precision

    files = model_files(lay, target, Path(onnx_path), onnx_bytes, settings, plan, Path(out))
    pipeline = pipeline_files(spec, settings, "gpu" if target == Target.GPU else "cpu")
    pre_dir = Path(lay.pipeline_model, "1")
    files.update({pre_dir / name: data for name, data in pipeline.items()})
    if target == Target.EMBEDDED:  # our Python model deserializes it; serialized by this DALI, which runs it
        files[pre_dir / MODEL_DALI] = autoserialize(pipeline)
    files[lay.labels_file()] = ("\n".join(classes) + "\n").encode()
    files.update(code_files(lay, target))
    files.update({Path(name, "config.pbtxt"): (CONFIG_HEADER + config_text(cfg)).encode()
                  for name, cfg in configs.items()})
    deployment = replace(deployment or deployment_of(settings, target, lay.name, served),
                         model={"onnx": os.path.relpath(Path(onnx_path).resolve(), Path(out).resolve()),
                                "sha256": onnx_sha, "classes": len(classes), "input_shape": list(spec.input_shape)})
    files[Path(DEPLOYMENT_FILE)] = deployment.to_yaml().encode()
    files[Path(MANIFEST)] = manifest(lay, target, Path(onnx_path), onnx_sha, plan, Path(out), meta, spec, settings,
                                     served, choice, deployment)
    write_repository(Path(out), files, configs, target)
    engine = f", {served.engine} {served.precision}" if served else ""
    print(f"rendered {out} ({target}, {lay.name} layout{engine}): {', '.join(sorted(configs))} ({len(classes)} "
          f"classes, input {spec.input_shape}, max_batch_size {settings.max_batch_size}); "
          f"{Path(out) / DEPLOYMENT_FILE}:\n{table(deployment)}")
    return {str(rel): Path(out) / rel for rel in files}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Render the Triton model repository (embedded CPU or GPU target)")
    p.add_argument("--onnx", type=Path, help="ONNX exported by build.export_onnx / build.quantize "
                   "(default: the --precision artifact in --artifacts)")
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    p.add_argument("--precision", choices=(*map(str, PRECISIONS), "auto"),
                   help="default: what the deployment file pins, else auto. embedded: the fastest engine for it "
                        "that passed make quantize's gate (bf16 and int8 need its report; auto: the fastest "
                        "passing candidate of any precision, measured here on the FP32 file's engines when make "
                        "quantize has not run); gpu: fp32, fp16, int8 (auto: the plan's)")
    p.add_argument("--data", type=Path, help="PRECISION=auto without make quantize: the ImageFolder root whose val/ "
                                             "the engines are measured on")
    p.add_argument("--max-top1-drop", type=float,
                   help="PRECISION=auto without make quantize: allowed top-1 drop below FP32, in points (default: "
                        "make quantize's)")
    p.add_argument("--min-agreement", type=float, default=DEFAULT_MIN_AGREEMENT,
                   help="PRECISION=auto without make quantize: the least top-1 agreement with the FP32 file, in %%")
    p.add_argument("--min-top5-overlap", type=float, default=DEFAULT_MIN_TOP5_OVERLAP,
                   help="PRECISION=auto without make quantize: the least top-5 overlap with the FP32 file, in %%")
    p.add_argument("--engine", choices=engines.names(Target.EMBEDDED),
                   help="embedded: the CPU engine (default: the fastest measured by make quantize, else onnxruntime)")
    p.add_argument("--target", choices=layouts.TARGETS, default=str(Target.EMBEDDED))
    p.add_argument("--plan", type=Path, help="gpu target: the TensorRT plan built from the same ONNX")
    defaults = ", ".join(f"{name} for {target}" for target, name in layouts.DEFAULT_LAYOUT.items())
    p.add_argument("--layout", choices=tuple(layouts.LAYOUTS),
                   help=f"how the chain is cut into Triton models (build/layouts.py; default: as the repository was "
                        f"rendered, else {defaults})")
    p.add_argument("--out", type=Path, default=DEFAULT_REPO)
    p.add_argument("--host-cores", type=int, default=None,
                   help="gpu target: the serving host's CPU cores, which size the DALI threads (default: this "
                        "machine's)")
    add_settings_args(p)
    return p


def gpu_precision(args: argparse.Namespace) -> str:
    """PRECISION=auto on the GPU target: the precision of the ONNX file the plan was built from, else fp32."""
    if args.precision != "auto":
        return str(args.precision)
    if args.plan is not None and Path(f"{args.plan}.json").is_file():
        built_from = json.loads(Path(f"{args.plan}.json").read_text())["onnx_sha256"]
        for precision in engines.default_for(Target.GPU).file_precisions:
            path = Path(args.artifacts) / ARTIFACT_NAMES[precision]
            if path.is_file() and file_sha256(path) == built_from:
                return str(precision)
    return str(Precision.FP32)


def choose_engine(args: argparse.Namespace) -> None:
    """PRECISION=auto without a report measured on this model (make quantize's, or an earlier make repo's):
    measure the candidates that need no calibration (build.engine_choice), when there is a val split to
    measure on."""
    if current_report(args.artifacts) is not None:
        return
    fp32 = Path(args.artifacts) / ARTIFACT_NAMES["fp32"]
    if args.data is None or not Path(args.data).is_dir() or not fp32.is_file():
        print(f"engine: ONNX Runtime, FP32 as exported (no images at {args.data} to measure the other engines on: "
              "DATA=<an ImageFolder root, or any folder of images>)")
        return
    from training.evaluate import DEFAULT_MAX_TOP1_DROP  # torch: only when measuring

    drop = DEFAULT_MAX_TOP1_DROP if args.max_top1_drop is None else args.max_top1_drop
    try:
        probe(fp32, args.data, args.artifacts, Bounds(drop, args.min_agreement, args.min_top5_overlap))
    except ValueError as e:  # too few images: serve what needs no measurement rather than nothing
        print(f"engine: ONNX Runtime, FP32 as exported: {e}")


def served_choice(args: argparse.Namespace) -> tuple[Path, Candidate | None]:
    """(the ONNX file, how the embedded target serves it) from --onnx / --artifacts, --precision, --engine."""
    if args.target == Target.GPU:
        gpu = engines.default_for(Target.GPU)
        args.precision = gpu_precision(args)
        if args.engine or args.precision not in gpu.file_precisions:
            raise ValueError(f"the GPU target serves {gpu.title} at {', '.join(gpu.file_precisions)}: ENGINE and "
                             f"PRECISION={args.precision} are for the embedded target")
        return args.onnx or artifact_for(args.precision, args.artifacts, args.target), None
    if args.onnx is None:
        if args.precision == "auto":
            choose_engine(args)
        return served_for(args.precision, args.artifacts, args.engine)
    if not (args.engine or args.precision == Precision.BF16):
        return args.onnx, None  # as exported, on ONNX Runtime
    hint = InferencePrecision.BF16 if args.precision == Precision.BF16 else InferencePrecision.F32
    bf16 = engines.with_hint(InferencePrecision.BF16)  # the engine that computes an FP32 file in bf16
    engine = engines.get(args.engine, Target.EMBEDDED) if args.engine else bf16
    if engine is None or hint not in engine.inference_precisions:
        raise ValueError(f"{engine.title if engine else 'no engine'} has no bf16 on the CPU: PRECISION=bf16 is "
                         f"served by ENGINE={bf16.name if bf16 else None}")
    exported = read_metadata(args.onnx).export.precision
    return args.onnx, Candidate(engine.name, exported, Precision.BF16 if hint == InferencePrecision.BF16 else exported,
                                hint)


def main(args: argparse.Namespace) -> dict[str, Path]:
    """`make repo`: the choices and settings the deployment file pins (build.deployment_file), the given ones,
    the rest fitted to this model's measurements or default; rendered, and the table printed."""
    out = Path(args.out)
    previous, rendered = DeploymentFile.read(out), read_manifest(out) if (out / MANIFEST).is_file() else None
    names = [f.name for f in fields(RepoSettings)]
    given = {n: tuple(v) if isinstance(v, list) else v for n in names if (v := getattr(args, n, None)) is not None}
    given.update({n: v for n in ("layout", "precision", "engine") if (v := getattr(args, n, None)) is not None})
    pinned = pins(previous, rendered, given, args.reset_settings)
    if "layout" in pinned and args.target not in layouts.get(pinned["layout"].value).targets and "layout" not in given:
        print(f"note: the pinned layout {pinned['layout'].value} is not for the {args.target} target: its default")
        del pinned["layout"]
    args.precision = pinned["precision"].value if "precision" in pinned else "auto"
    args.engine = pinned["engine"].value if "engine" in pinned else None
    onnx_path, served = served_choice(args)
    choice = None
    if args.onnx is None and served is not None:
        report, name = current_report(args.artifacts), candidate_name(served)
        if report is not None and name is not None and name in report["artifacts"]:
            choice = f"{why(report, name, served)} ({report['path']})"
    settings = replace(RepoSettings(), **{n: s.value for n, s in pinned.items() if n in names})
    keep = frozenset(pinned) & set(names)
    fitted: dict[str, tuple[Any, str]] = {}
    if args.onnx is None and served is not None:
        fitted.update(cost_fits(settings, args.artifacts, served, keep))
    if args.target == Target.GPU:
        fitted.update(host_fits(replace(settings, **{n: v for n, (v, _) in fitted.items()}),
                                args.host_cores or os.cpu_count() or 1, keep))
    settings = replace(settings, **{n: v for n, (v, _) in fitted.items()})
    entries = {n: pinned.get(n) or (Setting(v, Source.FITTED, fitted[n][1]) if n in fitted else Setting(v))
               for n, v in ((n, getattr(settings, n)) for n in names)}
    layout = pinned["layout"].value if "layout" in pinned else layouts.DEFAULT_LAYOUT[args.target]
    engine = served.engine if served else engines.default_for(Target.GPU).name
    choices = {"target": Setting(args.target, Source.PINNED if "target" in given else Source.DEFAULT),
               "layout": pinned.get("layout") or Setting(layout),
               "precision": pinned.get("precision") or Setting("auto"),
               "engine": pinned.get("engine") or Setting(engine, Source.FITTED if choice else Source.DEFAULT,
                                                         choice or "")}
    deployment = DeploymentFile({}, choices, entries)
    return render(onnx_path, args.out, settings, args.target, args.plan, layout, served, choice, deployment)


def pins(previous: DeploymentFile | None, rendered: dict[str, Any] | None, given: dict[str, Any],
         reset: bool) -> dict[str, Setting]:
    """What this render keeps as it is, by name (settings and choices): what was ``given`` (flags, make variables
    on the command line); unless ``reset``, what the deployment file pins, and what was edited in it since the
    last render (its value differs from the one ``rendered``, build.json, records); and for a repository rendered
    before deployment files, its build.json's settings that differ from the defaults."""
    out: dict[str, Setting] = {}
    if not reset and previous is not None:
        written = (rendered or {}).get("deployment", {})
        for name, s in {**previous.choices, **previous.settings}.items():
            if s.source == Source.PINNED:
                out[name] = s
            elif name in written and as_written(s.value) != written[name]:
                out[name] = Setting(s.value, Source.PINNED, f"edited in {DEPLOYMENT_FILE}")
    elif not reset and rendered is not None and "deployment" not in rendered:  # from before deployment files
        defaults = asdict(RepoSettings())
        for name, value in rendered.get("settings", {}).items():
            if name in defaults and as_written(value) != as_written(defaults[name]):
                out[name] = Setting(tuple(value) if isinstance(value, list) else value, Source.PINNED,
                                    f"kept from {MANIFEST}, rendered before {DEPLOYMENT_FILE}")
    out.update({n: Setting(v, Source.PINNED, "given to make repo") for n, v in given.items()})
    return out


def fit_to_cost(settings: RepoSettings, artifacts: Path, served: Candidate, keep: frozenset[str] = frozenset(),
                cores: int | None = None) -> RepoSettings:
    """``settings`` with :func:`cost_fits` applied."""
    return replace(settings, **{n: v for n, (v, _) in cost_fits(settings, artifacts, served, keep, cores).items()})


def cost_fits(settings: RepoSettings, artifacts: Path, served: Candidate, keep: frozenset[str] = frozenset(),
              cores: int | None = None) -> dict[str, tuple[Any, str]]:
    """The batch size and the classifier instances the served model's measured cost calls for (build.artifacts
    fitted_batch, fitted_instances), with why, where it was measured (make quantize, or make repo's own engine
    choice) and the field is not in ``keep`` (pinned). ``cores``: the serving machine's (default: this one's).

    The fitted batch is the batcher's preferred size, not ``max_batch_size``: the largest request a server
    accepts is a contract with its clients (a client that sent 16 images in one request must not be refused
    after a re-render), so it stays as given (32 by default); under load the batcher forms batches of the
    preferred size, which is what bounds a batch's latency."""
    batch = fitted_batch(artifacts, served)
    fits = {"preferred_batch_sizes": ((batch[0],), batch[1]) if batch else None,
            "classifier_instances": fitted_instances(artifacts, served, cores or os.cpu_count() or 1)}
    return {n: fit for n, fit in fits.items() if fit is not None and n not in keep}


def fit_to_host(settings: RepoSettings, cores: int, keep: frozenset[str] = frozenset()) -> RepoSettings:
    """``settings`` with :func:`host_fits` applied."""
    return replace(settings, **{n: v for n, (v, _) in host_fits(settings, cores, keep).items()})


def host_fits(settings: RepoSettings, cores: int, keep: frozenset[str] = frozenset()) -> dict[str, tuple[Any, str]]:
    """The GPU target's DALI threads for a serving host of ``cores`` cores, with why, unless pinned (``keep``).

    The embedded target's default (1 thread per preprocessing instance) was measured on 2 cores, where the
    threads compete with inference. On a GPU host, DALI's thread pool does the host side of nvJPEG's decoding
    (Huffman decoding below the hardware decoder's size threshold, progressive JPEGs, PNG, the shape peek)
    while the GPU does the rest: one thread per instance would cap preprocessing at that many cores of a
    16-64-core host. So the instances share the host's cores."""
    if "dali_threads" in keep:
        return {}
    threads = max(1, cores // max(1, settings.preprocess_instances))
    return {"dali_threads": (threads, f"{settings.preprocess_instances} DALI instances sharing a serving host of "
                                      f"{cores} cores (HOST_CORES= for another host)")}


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
