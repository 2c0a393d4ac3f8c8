"""Render the Triton model repository from an exported ONNX model (and nothing else).

    python -m build.render_repo --onnx artifacts/model.onnx --out model_repository

Embedded target (no GPU): the DALI pipeline on the CPU, ONNX Runtime and the top-k, all inside
Triton's Python backend. Default (fused layout): one model ``classify`` runs the three stages on each
dynamic batch; the ensemble layouts wire them as three models, preprocess -> classifier ->
postprocess, behind the ensemble ``classify`` (the GPU target's shape). Configs are built as Triton ModelConfig protobufs and written as text,
so they always parse; preprocessing parameters, classes and shapes come from the ONNX metadata.
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
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from core import protocol as P
from core.atomic_io import atomic_write_bytes, staged_directory
from core.metadata import file_sha256, read_metadata
from core.preprocess import DALI_INPUT_NAME, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, PreprocessSpec

# The committed Python-backend model code; each file becomes <model>/1/model.py of a rendered repository,
# which is generated output only (model_repository/ holds nothing committed but its README)
MODEL_CODE = Path(__file__).resolve().parent / "triton_models"
DEFAULT_REPO = Path(__file__).resolve().parent.parent / "model_repository"
PYTHON_MODELS = (P.PREPROCESS, P.CLASSIFIER, P.POSTPROCESS)
FUSED_MODEL = "fused"  # build/triton_models/fused.py: the fused layout's model.py, run beside the three stages
MANIFEST = "build.json"
# The preprocess model's pipeline: a definition DALI serializes itself (build/triton_models/dali.py), the
# one graph it imports (core/dali_graph.py) and the spec it reads, side by side in preprocess/1/
PIPELINE_FILE, GRAPH_FILE, PIPELINE_CONFIG = "dali.py", "dali_graph.py", "preprocess.json"
GRAPH_SOURCE = Path(__file__).resolve().parent.parent / "core" / GRAPH_FILE
# What Triton's DALI backend runs when a model has no serialized pipeline (dali_backend r24.10,
# src/model_provider/model_provider.h): load the file by path, serialize its one @autoserialize pipeline.
AUTOSERIALIZE = """import importlib.util, sys
from nvidia.dali._utils.autoserialize import invoke_autoserialize
spec = importlib.util.spec_from_file_location('autoserialize_mod', sys.argv[1])
head_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(head_module)
invoke_autoserialize(head_module, sys.argv[2])
"""


@dataclass(frozen=True)
class RepoSettings:
    # Defaults measured here (2 cores, wrk at 16 connections, `make compare`): instances of one thread
    # each keep both cores busy without oversubscribing them, and a short batching delay lets them take
    # turns instead of moving all requests as one convoy. Triton 2.51's batcher can miss an instance's
    # release while all are busy and sleep 500 ms (README, "Throughput"): with two fused instances that
    # hit 3 of 6 rounds of 15 s, with three none of 6, for 4% less throughput.
    max_batch_size: int = 32
    queue_delay_us: int = 200           # dynamic batcher: how long to wait to fill a batch
    preferred_batch_sizes: tuple[int, ...] = ()  # dynamic batcher: sizes to form without waiting longer
    preprocess_instances: int = 2
    classifier_instances: int = 3       # fused layout: instances of its one model
    dali_threads: int = 1
    intra_op_threads: int = 1           # ONNX Runtime threads per classifier instance (0 = one per core)
    top_k: int = 5
    max_image_pixels: int = MAX_IMAGE_PIXELS  # refused before decoding, with an error naming the limit
    max_image_bytes: int = MAX_IMAGE_BYTES
    # overload: each composing model queues at most this many requests; beyond it, and for a request
    # that waited longer than the timeout, Triton answers UNAVAILABLE (HTTP 503) at once instead of
    # letting latency grow without bound (0 = unbounded / no timeout)
    max_queue_size: int = 64
    queue_timeout_ms: int = 5000


def _tensor(name: str, dtype: int, dims: list[int], ragged: bool = False):
    return dict(name=name, data_type=dtype, dims=dims, **({"allow_ragged_batch": True} if ragged else {}))


def _python_model(name: str, s: RepoSettings, inputs: list[dict], outputs: list[dict], instances: int,
                  params: dict[str, str]) -> mc.ModelConfig:
    cfg = mc.ModelConfig(name=name, backend="python", max_batch_size=s.max_batch_size)
    cfg.input.extend(mc.ModelInput(**t) for t in inputs)
    cfg.output.extend(mc.ModelOutput(**t) for t in outputs)
    cfg.instance_group.append(mc.ModelInstanceGroup(count=instances, kind=mc.ModelInstanceGroup.KIND_CPU))
    dynamic_batching(cfg, s, [b for b in s.preferred_batch_sizes if b <= s.max_batch_size])
    for k, v in params.items():
        cfg.parameters[k].string_value = str(v)
    return cfg


def dynamic_batching(cfg: mc.ModelConfig, s: RepoSettings, preferred: list[int]) -> None:
    """The dynamic batcher with its queue policy (composing models only: an ensemble has no queue)."""
    db = cfg.dynamic_batching
    db.max_queue_delay_microseconds = s.queue_delay_us
    db.preferred_batch_size.extend(preferred)
    policy = db.default_queue_policy
    policy.max_queue_size = s.max_queue_size
    policy.default_timeout_microseconds = s.queue_timeout_ms * 1000
    policy.timeout_action = mc.ModelQueuePolicy.REJECT
    policy.allow_timeout_override = True  # a client may ask for a shorter wait (the request's `timeout`)


def embedded_configs(spec: PreprocessSpec, num_classes: int, s: RepoSettings) -> dict[str, mc.ModelConfig]:
    """The four configs of the embedded target, keyed by model name."""
    k = min(s.top_k, num_classes)
    FP32, U8, BYTES = mc.TYPE_FP32, mc.TYPE_UINT8, mc.TYPE_STRING
    pixels = _tensor(P.PIXELS, FP32, list(spec.input_shape))
    logits = _tensor(P.LOGITS, FP32, [num_classes])
    outputs = [_tensor(P.PROBABILITIES, FP32, [num_classes]), _tensor(P.LABELS, BYTES, [k]), _tensor(P.SCORES, FP32, [k])]

    configs = {
        # allow_ragged_batch: requests whose byte strings differ in length still batch together
        P.PREPROCESS: _python_model(P.PREPROCESS, s, [_tensor(P.IMAGE, U8, [-1], ragged=True)], [pixels],
                                    s.preprocess_instances, {"dali_pipeline": "model.dali", "dali_num_threads": s.dali_threads,
                                                            "max_image_pixels": s.max_image_pixels,
                                                            "max_image_bytes": s.max_image_bytes}),
        P.CLASSIFIER: _python_model(P.CLASSIFIER, s, [pixels], [logits], s.classifier_instances,
                                    {"onnx_file": "model.onnx", "intra_op_threads": s.intra_op_threads}),
        # postprocess is cheap, but with one instance and no batching its requests queue behind each other
        P.POSTPROCESS: _python_model(P.POSTPROCESS, s, [logits], outputs, 1, {"top_k": k}),
    }
    configs[P.ENSEMBLE] = ensemble(s, outputs, postprocess_steps(P.PIXELS, P.LOGITS))
    return configs


# the ensemble's first step, whatever follows: IMAGE -> PIXELS (ensemble tensor "pixels")
PREPROCESS_STEP = (P.PREPROCESS, {P.IMAGE: P.IMAGE}, {P.PIXELS: "pixels"})


def ensemble(s: RepoSettings, outputs: list[dict], steps: list[tuple[str, dict, dict]]) -> mc.ModelConfig:
    """The ensemble: IMAGE in, ``outputs`` out; ``steps`` = (model, input_map, output_map) in order, each map
    from the model's tensor names to the ensemble's."""
    ens = mc.ModelConfig(name=P.ENSEMBLE, platform="ensemble", max_batch_size=s.max_batch_size)
    ens.input.append(mc.ModelInput(**_tensor(P.IMAGE, mc.TYPE_UINT8, [-1])))
    ens.output.extend(mc.ModelOutput(**t) for t in outputs)
    for model, input_map, output_map in steps:
        ens.ensemble_scheduling.step.add(model_name=model, model_version=-1, input_map=input_map, output_map=output_map)
    return ens


def postprocess_steps(classifier_in: str, classifier_out: str) -> list[tuple[str, dict, dict]]:
    """preprocess -> classifier -> postprocess; the classifier's input and logits output as it names them."""
    return [PREPROCESS_STEP, (P.CLASSIFIER, {classifier_in: "pixels"}, {classifier_out: "logits"}),
            (P.POSTPROCESS, {P.LOGITS: "logits"}, {o: o for o in P.OUTPUTS})]


def gpu_configs(spec: PreprocessSpec, num_classes: int, s: RepoSettings, onnx_io: tuple[str, str],
                profile_opt: int) -> dict[str, mc.ModelConfig]:
    """GPU target (NGC Triton container): DALI backend -> TensorRT plan -> Python postprocess.

    The plan's tensors keep the ONNX names (``onnx_io``); the ensemble maps them. Batching prefers the
    engine's optimization-profile sizes, and the plan is warmed up at load with its opt batch.
    """
    k = min(s.top_k, num_classes)
    FP32, U8, BYTES = mc.TYPE_FP32, mc.TYPE_UINT8, mc.TYPE_STRING
    gpu = mc.ModelInstanceGroup.KIND_GPU
    outputs = [_tensor(P.PROBABILITIES, FP32, [num_classes]), _tensor(P.LABELS, BYTES, [k]), _tensor(P.SCORES, FP32, [k])]
    preferred = sorted({b for b in (*s.preferred_batch_sizes, profile_opt, s.max_batch_size) if b <= s.max_batch_size})

    # no model.dali: the backend serializes dali.py with its own DALI (see build/triton_models/dali.py)
    pre = mc.ModelConfig(name=P.PREPROCESS, backend="dali", max_batch_size=s.max_batch_size,
                         default_model_filename=PIPELINE_FILE)
    pre.parameters["num_threads"].string_value = str(s.dali_threads)
    pre.input.append(mc.ModelInput(**_tensor(P.IMAGE, U8, [-1], ragged=True)))
    pre.output.append(mc.ModelOutput(**_tensor(P.PIXELS, FP32, list(spec.input_shape))))
    pre.instance_group.append(mc.ModelInstanceGroup(count=s.preprocess_instances, kind=gpu))
    dynamic_batching(pre, s, preferred)

    cls = mc.ModelConfig(name=P.CLASSIFIER, platform="tensorrt_plan", max_batch_size=s.max_batch_size)
    cls.input.append(mc.ModelInput(**_tensor(onnx_io[0], FP32, list(spec.input_shape))))
    cls.output.append(mc.ModelOutput(**_tensor(onnx_io[1], FP32, [num_classes])))
    cls.instance_group.append(mc.ModelInstanceGroup(count=s.classifier_instances, kind=gpu))
    dynamic_batching(cls, s, preferred)
    warm = cls.model_warmup.add(name="opt_batch", batch_size=profile_opt)
    warm.inputs[onnx_io[0]].data_type = FP32
    warm.inputs[onnx_io[0]].dims.extend(spec.input_shape)
    warm.inputs[onnx_io[0]].zero_data = True

    post = _python_model(P.POSTPROCESS, s, [_tensor(P.LOGITS, FP32, [num_classes])], outputs, 1, {"top_k": k})
    return {P.PREPROCESS: pre, P.CLASSIFIER: cls, P.POSTPROCESS: post,
            P.ENSEMBLE: ensemble(s, outputs, postprocess_steps(*onnx_io))}


LAYOUTS = ("fused", "postprocess", "classification")
DEFAULT_LAYOUT = {"embedded": "fused", "gpu": "classification"}
LABELS_FILE = "labels.txt"


# the embedded target's models that run code (Python-backend stubs, per-model statistics), per layout
LAYOUT_MODELS = {"fused": (P.ENSEMBLE,), "postprocess": PYTHON_MODELS, "classification": (P.PREPROCESS, P.CLASSIFIER)}


def onnx_model_name(layout: str) -> str:
    """The model whose version folders hold model.onnx (what `make publish` adds a version to)."""
    return P.ENSEMBLE if layout == "fused" else P.CLASSIFIER


def pipeline_model(layout: str) -> str:
    """The model whose version folder holds the DALI pipeline (dali.py, and model.dali on the embedded target)."""
    return P.ENSEMBLE if layout == "fused" else P.PREPROCESS


def labels_file(repo: Path, layout: str | None = None) -> Path:
    """Where a rendered repository keeps its class names, one per line: by ``layout``, else by the one it was
    rendered with."""
    layout = layout or read_manifest(repo).get("layout", "postprocess")
    return Path(repo) / {"postprocess": Path(P.POSTPROCESS, "1"), "classification": Path(P.CLASSIFIER),
                         "fused": Path(P.ENSEMBLE, "1")}[layout] / LABELS_FILE


def fused_configs(spec: PreprocessSpec, num_classes: int, s: RepoSettings) -> dict[str, mc.ModelConfig]:
    """One Python model named like the ensemble, with the ensemble's inputs and outputs: the three stages
    on one dynamic batch, with the parameters each stage's model would have."""
    ens = embedded_configs(spec, num_classes, s)
    params = {k: v.string_value for name in PYTHON_MODELS for k, v in ens[name].parameters.items()}
    model = _python_model(P.ENSEMBLE, s, [_tensor(P.IMAGE, mc.TYPE_UINT8, [-1], ragged=True)],
                          [_tensor(t.name, t.data_type, list(t.dims)) for t in ens[P.ENSEMBLE].output],
                          s.classifier_instances, params)
    return {P.ENSEMBLE: model}


def classification_layout(configs: dict[str, mc.ModelConfig], num_classes: int, s: RepoSettings,
                          classifier_io: tuple[str, str]) -> dict[str, mc.ModelConfig]:
    """No Python model after the classifier: it also outputs the export's softmax, labelled from
    ``labels.txt`` in its model folder, and the ensemble returns those probabilities. A client asks for
    the top k with ``class_count`` (Triton's classification extension) and gets "score:index:label"
    strings; the ensemble inherits the classifier's labels. ``classifier_io``: (input, probabilities)
    names at the classifier."""
    cls = configs[P.CLASSIFIER]
    cls.output.append(mc.ModelOutput(**_tensor(classifier_io[1], mc.TYPE_FP32, [num_classes]), label_filename=LABELS_FILE))
    ens = ensemble(s, [_tensor(P.PROBABILITIES, mc.TYPE_FP32, [num_classes])],
                   [PREPROCESS_STEP, (P.CLASSIFIER, {classifier_io[0]: "pixels"}, {classifier_io[1]: P.PROBABILITIES})])
    return {P.PREPROCESS: configs[P.PREPROCESS], P.CLASSIFIER: cls, P.ENSEMBLE: ens}


def check_ensemble(configs: dict[str, mc.ModelConfig]) -> None:
    """Cross-check the wiring: every step's tensors exist, come from somewhere, and agree in type and shape."""
    ens = next((c for c in configs.values() if c.platform == "ensemble"), None)
    if ens is None:
        raise ValueError("no ensemble among the configs")
    available = {t.name: (t.data_type, list(t.dims)) for t in ens.input}  # ensemble tensor -> (dtype, dims)
    for i, step in enumerate(ens.ensemble_scheduling.step):
        where = f"ensemble step {i} ({step.model_name})"
        if step.model_name not in configs:
            raise ValueError(f"{where}: no config for model '{step.model_name}'")
        model = configs[step.model_name]
        inputs = {t.name: (t.data_type, list(t.dims)) for t in model.input}
        outputs = {t.name: (t.data_type, list(t.dims)) for t in model.output}
        if set(step.input_map) != set(inputs):
            raise ValueError(f"{where}: maps inputs {sorted(step.input_map)} but the model has {sorted(inputs)}")
        for model_in, ens_tensor in step.input_map.items():
            if ens_tensor not in available:
                raise ValueError(f"{where}: input '{model_in}' reads '{ens_tensor}', which no earlier step produces")
            if available[ens_tensor] != inputs[model_in]:
                raise ValueError(f"{where}: '{ens_tensor}' is {available[ens_tensor]} but input '{model_in}' "
                                 f"expects {inputs[model_in]} (dtype, dims)")
        if model.max_batch_size < ens.max_batch_size:
            raise ValueError(f"{where}: max_batch_size {model.max_batch_size} < ensemble's {ens.max_batch_size}")
        for model_out, ens_tensor in step.output_map.items():
            if model_out not in outputs:
                raise ValueError(f"{where}: maps output '{model_out}', which the model does not have")
            available[ens_tensor] = outputs[model_out]
    for t in ens.output:
        if available.get(t.name) != (t.data_type, list(t.dims)):
            raise ValueError(f"ensemble output '{t.name}' {(t.data_type, list(t.dims))} is produced as "
                             f"{available.get(t.name)} (dtype, dims)")


def pipeline_files(spec: PreprocessSpec, s: RepoSettings, device: str) -> dict[str, bytes]:
    """preprocess/1/'s pipeline definition: dali.py, the graph it imports, and the spec it reads."""
    config = {"spec": spec.to_dict(), "device": device, "device_id": 0 if device == "gpu" else None,
              "input_name": DALI_INPUT_NAME, "max_batch_size": s.max_batch_size, "num_threads": s.dali_threads}
    return {PIPELINE_FILE: (MODEL_CODE / PIPELINE_FILE).read_bytes(), GRAPH_FILE: GRAPH_SOURCE.read_bytes(),
            PIPELINE_CONFIG: json.dumps(config, indent=2).encode()}


def autoserialize(pipeline: dict[str, bytes], python: str = sys.executable) -> bytes:
    """The serialized pipeline, made exactly as the DALI backend makes it: the backend's command, in a
    fresh interpreter without the project on its path (so dali.py proves self-contained)."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in pipeline.items():
            (Path(tmp) / name).write_bytes(data)
        out = Path(tmp) / "model.dali"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        r = subprocess.run([python, "-c", AUTOSERIALIZE, str(Path(tmp) / PIPELINE_FILE), str(out)], cwd=tmp, env=env,
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0 or not out.is_file():
            raise RuntimeError(f"DALI could not serialize the preprocess pipeline {PIPELINE_FILE}:\n{r.stderr[-3000:]}")
        return out.read_bytes()


def config_text(cfg: mc.ModelConfig) -> str:
    return text_format.MessageToString(cfg)


def read_manifest(repo: Path) -> dict:
    path = Path(repo) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: render the repository with `make repo` first")
    manifest = json.loads(path.read_text())
    for key in ("onnx", "plan"):  # stored relative to the repository, so the two move together
        if manifest.get(key):
            manifest[key] = str((Path(repo).resolve() / manifest[key]).resolve())
    return manifest


def rendered_onnx(repo: Path) -> Path:
    """The ONNX file ``repo`` was rendered from, verified against the sha256 recorded at render time."""
    manifest = read_manifest(repo)
    onnx_path = Path(manifest["onnx"])
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{repo} was rendered from {onnx_path}, which no longer exists: run `make repo`")
    if file_sha256(onnx_path) != manifest["onnx_sha256"]:
        raise ValueError(f"{onnx_path} has changed since {repo} was rendered from it: run `make repo` again")
    return onnx_path


def settings_from_manifest(manifest: dict) -> RepoSettings:
    s = dict(manifest["settings"])
    s["preferred_batch_sizes"] = tuple(s.get("preferred_batch_sizes", ()))
    return RepoSettings(**s)


def check_float32_io(onnx_path: Path, names: tuple[str, ...]) -> None:
    """The TensorRT classifier sits between DALI (FP32 pixels) and postprocess (FP32 logits): its ONNX must
    keep FP32 inputs/outputs whatever its inner precision (AutoCast keep_io_types, Q/DQ inside)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)}
    wrong = {n: onnx.TensorProto.DataType.Name(types[n]) for n in names if n in types and types[n] != onnx.TensorProto.FLOAT}
    if wrong:
        raise ValueError(f"{onnx_path}: the GPU ensemble feeds and reads the classifier in FP32, but its "
                         f"{', '.join(f'{n} is {t}' for n, t in wrong.items())}; convert with FP32 inputs/outputs "
                         "(make quantize keeps them)")


def read_configs(repo: Path) -> dict[str, mc.ModelConfig]:
    """Parse every <model>/config.pbtxt of a repository as Triton's ModelConfig."""
    return {p.parent.name: text_format.Parse(p.read_text(), mc.ModelConfig()) for p in sorted(Path(repo).glob("*/config.pbtxt"))}


def render(onnx_path: Path, out: Path, settings: RepoSettings = RepoSettings(), target: str = "embedded",
           plan: Path | None = None, layout: str | None = None) -> dict[str, Path]:
    """Write the repository: everything is computed in memory first, then the repository is replaced as a whole.

    embedded: the ONNX runs in ONNX Runtime. gpu: ``plan`` (from build.engine, built from this very
    ONNX) runs in TensorRT; without a plan the configs are rendered and the plan is reported missing.
    """
    meta = read_metadata(Path(onnx_path))
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    classes: list[str] = meta["classes"]
    onnx_bytes = Path(onnx_path).read_bytes()
    onnx_sha = hashlib.sha256(onnx_bytes).hexdigest()
    layout = layout or DEFAULT_LAYOUT.get(target, "postprocess")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    export = meta.get("export", {})
    if layout == "fused" and target != "embedded":
        raise ValueError("the fused layout runs ONNX Runtime in the Python backend: embedded target only")
    if layout == "classification" and "probabilities" not in export:
        raise ValueError(f"{onnx_path} has no softmax output (exported before it was added): export it again "
                         "with `make onnx` (and `make quantize`) to render the classification layout")
    if target == "embedded":
        configs = embedded_configs(spec, len(classes), settings)
        if layout == "classification":
            configs = classification_layout(configs, len(classes), settings, (P.PIXELS, P.PROBABILITIES))
        elif layout == "fused":
            configs = fused_configs(spec, len(classes), settings)
        configs[onnx_model_name(layout)].parameters["onnx_sha256"].string_value = onnx_sha
        files = {Path(onnx_model_name(layout), "1", "model.onnx"): onnx_bytes}
        python_models = () if layout == "fused" else LAYOUT_MODELS[layout]  # fused: its model.py is fused.py
    elif target == "gpu":
        from build.engine import BatchProfile

        profile = BatchProfile.from_repo_settings(settings.max_batch_size, settings.preferred_batch_sizes)
        check_float32_io(onnx_path, tuple(export[k] for k in ("input", "output", "probabilities") if k in export))
        configs = gpu_configs(spec, len(classes), settings, (export["input"], export["output"]), profile.opt)
        if layout == "classification":  # no Python model at all: DALI backend -> TensorRT
            configs = classification_layout(configs, len(classes), settings, (export["input"], export["probabilities"]))
        files = {}
        if plan is not None:
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
            files[Path(P.CLASSIFIER, "1", "model.plan")] = Path(plan).read_bytes()
            files[Path(P.CLASSIFIER, "1", "model.plan.json")] = Path(f"{plan}.json").read_bytes()
        else:
            print(f"note: no TensorRT plan given: {out}/{P.CLASSIFIER}/1/model.plan is missing until you build one "
                  "with `make engine` (GPU + TensorRT) and render again with PLAN=...")
        python_models = (P.POSTPROCESS,) if layout == "postprocess" else ()
    else:
        raise ValueError(f"target must be 'embedded' or 'gpu', got {target!r}")
    if layout != "fused":
        check_ensemble(configs)
    pipeline = pipeline_files(spec, settings, "gpu" if target == "gpu" else "cpu")
    pre_dir = Path(pipeline_model(layout), "1")
    files.update({pre_dir / name: data for name, data in pipeline.items()})
    if target == "embedded":  # our Python model deserializes it; serialized by this DALI, which runs it
        files[pre_dir / "model.dali"] = autoserialize(pipeline)
    files[labels_file(Path(), layout)] = ("\n".join(classes) + "\n").encode()
    if layout == "fused":  # the stages' own files beside the model that runs them
        files[Path(P.ENSEMBLE, "1", "model.py")] = (MODEL_CODE / f"{FUSED_MODEL}.py").read_bytes()
        files.update({Path(P.ENSEMBLE, "1", f"{name}.py"): (MODEL_CODE / f"{name}.py").read_bytes() for name in PYTHON_MODELS})
    else:  # the ensemble's version folder must exist and, in object stores, hold a file
        files[Path(P.ENSEMBLE, "1", ".placeholder")] = b""
    files.update({Path(name, "config.pbtxt"): config_text(cfg).encode() for name, cfg in configs.items()})
    # what this repository was rendered from and with: read back by the tuner and the reports
    files[Path(MANIFEST)] = json.dumps({
        "target": target, "layout": layout, "onnx": os.path.relpath(Path(onnx_path).resolve(), Path(out).resolve()), "onnx_sha256": onnx_sha,
        "plan": os.path.relpath(Path(plan).resolve(), Path(out).resolve()) if plan else None,
        "precision": export.get("precision", "fp32"), "settings": asdict(settings),
        "classes": len(classes), "input_shape": list(spec.input_shape)}, indent=2).encode()
    out = Path(out)
    for name in python_models:
        files[Path(name, "1", "model.py")] = (MODEL_CODE / f"{name}.py").read_bytes()
    # the files belong together (a config names the tensors, shapes and batch sizes of its neighbours):
    # changed in a copy that replaces the repository in one rename, so that neither the server nor a
    # render killed half-way sees a mix of two renders
    with staged_directory(out) as stage:
        for rel, data in files.items():
            atomic_write_bytes(stage / rel, lambda tmp, data=data: tmp.write_bytes(data))
        if target == "gpu":  # a serialized pipeline left by an earlier render would be loaded instead of dali.py
            (stage / P.PREPROCESS / "1" / "model.dali").unlink(missing_ok=True)
        for folder in stage.iterdir():  # models of another layout, left by an earlier render
            ours = folder.name in (*PYTHON_MODELS, P.ENSEMBLE) or (folder / "config.pbtxt").is_file()
            if folder.is_dir() and ours and folder.name not in configs:
                shutil.rmtree(folder)
        for name in configs:  # files another layout left in a model folder of this one (its version 1 included)
            folder, version = stage / name, stage / name / "1"
            for stale in [*folder.iterdir(), *(version.iterdir() if version.is_dir() else ())]:
                if stale.is_file() and stale.relative_to(stage) not in files:
                    stale.unlink()
                elif stale.is_dir() and stale.parent == version:  # e.g. __pycache__
                    shutil.rmtree(stale)
    print(f"rendered {out} ({target}, {layout} layout): {', '.join(sorted(configs))} ({len(classes)} classes, input {spec.input_shape}, "
          f"max_batch_size {settings.max_batch_size})")
    return {str(rel): out / rel for rel in files}


SETTINGS_HELP = {
    "max_batch_size": "largest batch any model accepts (and the TensorRT profile's max)",
    "queue_delay_us": "dynamic batcher: microseconds to wait to fill a batch",
    "preferred_batch_sizes": "dynamic batcher: sizes to form without waiting (the largest is the TensorRT profile's opt)",
    "preprocess_instances": "DALI preprocessing model instances",
    "classifier_instances": "classifier model instances (fused layout: instances of its one model)",
    "dali_threads": "DALI CPU threads per preprocessing instance",
    "intra_op_threads": "ONNX Runtime threads per classifier instance (0 = one per core)",
    "top_k": "labels and scores returned per image",
    "max_image_pixels": "embedded target: images with more pixels are refused before decoding",
    "max_image_bytes": "embedded target: larger encoded images are refused before decoding",
    "max_queue_size": "requests each composing model queues before answering UNAVAILABLE / 503 (0 = unbounded)",
    "queue_timeout_ms": "a request queued longer is answered UNAVAILABLE / 503 (0 = no timeout)",
}


def add_settings_args(p: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """One --flag per RepoSettings field (or those in ``only``); unset flags stay None so repo_settings()
    can tell them apart."""
    g = p.add_argument_group("batching and instance settings (default: the repository's build.json, else built-in)")
    for f in fields(RepoSettings):
        if only is not None and f.name not in only:
            continue
        tuple_field = f.name == "preferred_batch_sizes"
        g.add_argument("--" + f.name.replace("_", "-"), type=int, nargs="*" if tuple_field else None, default=None,
                       help=f"{SETTINGS_HELP[f.name]} (built-in default {getattr(RepoSettings(), f.name)})")
    g.add_argument("--reset-settings", action="store_true",
                   help="ignore the settings the repository was last rendered or tuned with")


def repo_settings(args: argparse.Namespace, repo: Path | None) -> RepoSettings:
    """Explicit flags win, then the settings ``repo`` was last rendered with (e.g. by `make tune`), then defaults.

    Re-rendering a repository (a new checkpoint, another precision) so keeps its tuned batching instead
    of silently resetting it.
    """
    base, source = RepoSettings(), "built-in defaults"
    if repo is not None and (Path(repo) / MANIFEST).is_file() and not getattr(args, "reset_settings", False):
        base, source = settings_from_manifest(read_manifest(repo)), str(Path(repo) / MANIFEST)
    explicit = {f.name: getattr(args, f.name) for f in fields(RepoSettings) if getattr(args, f.name, None) is not None}
    if "preferred_batch_sizes" in explicit:
        explicit["preferred_batch_sizes"] = tuple(explicit["preferred_batch_sizes"])
    settings = replace(base, **explicit)
    kept = [f.name for f in fields(RepoSettings) if f.name not in explicit]
    if source != "built-in defaults" and kept:
        print(f"settings from {source}: " + ", ".join(f"{k}={getattr(settings, k)}" for k in kept) +
              " (override with flags, or --reset-settings / RESET_SETTINGS=1 for the defaults)")
    return settings


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Render the Triton model repository (embedded CPU or GPU target)")
    p.add_argument("--onnx", type=Path, help="ONNX exported by build.export_onnx / build.quantize "
                   "(default: the --precision artifact in --artifacts)")
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32")
    p.add_argument("--target", choices=("embedded", "gpu"), default="embedded")
    p.add_argument("--plan", type=Path, help="gpu target: the TensorRT plan built from the same ONNX")
    p.add_argument("--layout", choices=LAYOUTS, help="fused (embedded only): one Python model runs preprocess, "
                   "classifier and top-k; postprocess: the ensemble of three models, a Python model returns LABELS/SCORES; "
                   "classification: no Python model after the classifier, clients ask for top-k with class_count "
                   "(default: fused for embedded, classification for gpu)")
    p.add_argument("--out", type=Path, default=DEFAULT_REPO)
    add_settings_args(p)
    return p


def main(args: argparse.Namespace) -> dict[str, Path]:
    settings = repo_settings(args, args.out)
    layout = args.layout
    if layout is None and (Path(args.out) / MANIFEST).is_file() and not args.reset_settings:
        # like the settings: a re-render keeps the layout the repository has, for the same target
        previous = read_manifest(args.out)
        if previous.get("target") == args.target and previous.get("layout") in LAYOUTS:
            layout = previous["layout"]
            if layout != DEFAULT_LAYOUT[args.target]:
                print(f"layout from {Path(args.out) / MANIFEST}: {layout} (--layout, or RESET_SETTINGS=1 for the "
                      f"default, {DEFAULT_LAYOUT[args.target]})")
    onnx_path = args.onnx
    if onnx_path is None:
        from build.quantize import artifact_for

        onnx_path = artifact_for(args.precision, args.artifacts) if args.target == "embedded" else \
            args.artifacts / {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "int8": "model_int8.onnx"}[args.precision]
    return render(onnx_path, args.out, settings, args.target, args.plan, layout)


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
