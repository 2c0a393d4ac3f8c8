"""The served layouts, as a registry: how the preprocess -> classifier -> top-k chain is cut into Triton models.

One :class:`Layout` per way of serving, read by rendering (build.render_repo), live publishing
(serve.publish), the tuner, Model Analyzer and the report (perf/). Adding a layout is one entry in
:data:`LAYOUTS` (its configs and which models run which code) plus its model file in served/models/.

- ``fused`` (embedded default): one Python model named like the ensemble runs the three stages on each
  dynamic batch; the batch never leaves the process.
- ``postprocess``: the ensemble of three models, preprocess -> classifier -> postprocess (a Python model
  returns LABELS/SCORES); on the GPU target the DALI backend and TensorRT run the first two.
- ``classification`` (GPU default): no Python model after the classifier; clients ask for the top k
  with ``class_count`` (Triton's classification extension) and get "score:index:label" strings.

On the GPU target both ensembles begin with the guard (served/models/guard.py): the decode policy's checks
before Triton's DALI backend, which cannot refuse one image of a batch and has no size limit.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from build.model_config import (
    FP32,
    U8,
    Step,
    check_ensemble,
    dynamic_batching,
    ensemble,
    ensemble_outputs,
    image_input,
    python_model,
    tensor,
)
from build.settings import BatchProfile, RepoSettings
from core import protocol as P
from core.metadata import ExportInfo
from core.preprocess import PreprocessSpec

TARGETS = ("embedded", "gpu")
LABELS_FILE = "labels.txt"
PIPELINE_FILE = "dali.py"  # the preprocess model's pipeline definition (served/models/dali.py)
MODEL_DALI = "model.dali"  # its serialization, made by `make repo` for the embedded target


@dataclass(frozen=True)
class ConfigInputs:
    """What a layout's configs are built from: the model's metadata and the repository's settings."""

    spec: PreprocessSpec
    num_classes: int
    settings: RepoSettings
    target: str
    export: ExportInfo  # the ONNX tensor names: input, output (logits), probabilities (if exported); reference

    @property
    def top_k(self) -> int:
        return min(self.settings.top_k, self.num_classes)

    def classifier_io(self, output: str) -> tuple[str, str]:
        """(input, ``output``) tensor names at the classifier: the Python model's on the embedded target,
        the ONNX (and so the TensorRT plan's) names on the GPU target."""
        if self.target == "embedded":
            return P.PIXELS, {"output": P.LOGITS, "probabilities": P.PROBABILITIES}[output]
        name = {"output": self.export.output, "probabilities": self.export.probabilities}[output]
        if name is None:
            raise ValueError("the ONNX file has no softmax output (exported before it was added)")
        return self.export.input, name


@dataclass(frozen=True)
class Layout:
    name: str
    targets: tuple[str, ...]  # the targets it can be rendered for
    onnx_model: str           # the model whose version folders hold model.onnx (what `make publish` versions)
    pipeline_model: str       # the model whose version folder holds the DALI pipeline
    labels_dir: str           # the folder, relative to the repository, that holds labels.txt
    # per target: the Python-backend models, each with the file of served/models/ that is its model.py (the
    # served package goes beside it, build.render_repo)
    code: dict[str, dict[str, str]]
    configs: Callable[[ConfigInputs], dict[str, mc.ModelConfig]]
    single_model: bool = False        # one model serves the whole chain (no ensemble to profile or wire)
    needs_probabilities: bool = False  # reads the export's softmax output

    def python_models(self, target: str = "embedded") -> tuple[str, ...]:
        """The models that run Python code on ``target`` (the embedded target's stubs: per-model statistics)."""
        return tuple(self.code.get(target, {}))

    def labels_file(self, repo: Path = Path()) -> Path:
        return Path(repo) / self.labels_dir / LABELS_FILE

    def check(self, target: str, export: ExportInfo, source: Path) -> None:
        """Refuse what this layout cannot serve, saying why."""
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if target not in self.targets:
            raise ValueError(f"the {self.name} layout is for the {' and '.join(self.targets)} target"
                             f"{'s' if len(self.targets) > 1 else ''} only, not {target}")
        if self.needs_probabilities and export.probabilities is None:
            raise ValueError(f"{source} has no softmax output (exported before it was added): export it again "
                             f"with `make onnx` (and `make quantize`) to render the {self.name} layout")

    def build_configs(self, inputs: ConfigInputs) -> dict[str, mc.ModelConfig]:
        configs = self.configs(inputs)
        if not self.single_model:
            check_ensemble(configs)
        return configs


# --------------------------------------------------------------------------------------------
# The stages' configs, per target
# --------------------------------------------------------------------------------------------

PREPROCESS_STEP: Step = (P.PREPROCESS, {P.IMAGE: P.IMAGE}, {P.PIXELS: "pixels"})  # IMAGE -> ensemble "pixels"
# the GPU target: the guard's checks first (served/models/guard.py), then DALI on the bytes it passed on
GUARDED_STEPS: list[Step] = [(P.GUARD, {P.IMAGE: P.IMAGE}, {P.CHECKED: "checked"}),
                             (P.PREPROCESS, {P.IMAGE: "checked"}, {P.PIXELS: "pixels"})]


def front_steps(target: str) -> list[Step]:
    """The ensemble's steps from IMAGE to its "pixels", on ``target``."""
    return [PREPROCESS_STEP] if target == "embedded" else list(GUARDED_STEPS)


def stage_parameters(s: RepoSettings, c: ConfigInputs) -> dict[str, dict[str, Any]]:
    """The Python-backend stages' parameters, by model (the fused model takes all of them). The drift
    reference is the exported model's answers on its val split (build.export_onnx), when it has one."""
    metrics = {"served_metrics": s.served_metrics, "served_metrics_interval_ms": s.served_metrics_interval_ms}
    reference = c.export.reference
    drift = {"drift_window": s.drift_window, "drift_reference": json.dumps(reference)} if reference else {}
    limits = {"max_image_pixels": s.max_image_pixels, "max_image_bytes": s.max_image_bytes}
    return {P.PREPROCESS: {"dali_pipeline": MODEL_DALI, "dali_num_threads": s.dali_threads, **limits, **metrics},
            P.CLASSIFIER: {"onnx_file": "model.onnx", "intra_op_threads": s.intra_op_threads, **metrics, **drift},
            P.POSTPROCESS: {"top_k": c.top_k, **metrics, **drift},
            P.GUARD: {**limits, **metrics}}


def _embedded_stages(c: ConfigInputs) -> dict[str, mc.ModelConfig]:
    s, params = c.settings, stage_parameters(c.settings, c)
    pixels = tensor(P.PIXELS, FP32, list(c.spec.input_shape))
    logits = tensor(P.LOGITS, FP32, [c.num_classes])
    return {
        P.PREPROCESS: python_model(P.PREPROCESS, s, [image_input()], [pixels], s.preprocess_instances,
                                   params[P.PREPROCESS]),
        P.CLASSIFIER: python_model(P.CLASSIFIER, s, [pixels], [logits], s.classifier_instances, params[P.CLASSIFIER]),
        # postprocess is cheap, but with one instance and no batching its requests queue behind each other
        P.POSTPROCESS: python_model(P.POSTPROCESS, s, [logits], ensemble_outputs(c.num_classes, c.top_k), 1,
                                    params[P.POSTPROCESS]),
    }


def _gpu_stages(c: ConfigInputs) -> dict[str, mc.ModelConfig]:
    """DALI backend -> TensorRT plan -> Python postprocess. The plan's tensors keep the ONNX names; batching
    prefers the engine's optimization-profile sizes, and the plan is warmed up at load with its opt batch."""
    s, gpu = c.settings, mc.ModelInstanceGroup.KIND_GPU
    opt = BatchProfile.of(s).opt
    preferred = sorted({b for b in (*s.preferred_batch_sizes, opt, s.max_batch_size) if b <= s.max_batch_size})
    onnx_in, onnx_out = c.export.input, c.export.output

    # no model.dali: the backend serializes dali.py with its own DALI (see served/models/dali.py)
    pre = mc.ModelConfig(name=P.PREPROCESS, backend="dali", max_batch_size=s.max_batch_size,
                         default_model_filename=PIPELINE_FILE)
    pre.parameters["num_threads"].string_value = str(s.dali_threads)
    pre.input.append(mc.ModelInput(**image_input()))
    pre.output.append(mc.ModelOutput(**tensor(P.PIXELS, FP32, list(c.spec.input_shape))))
    pre.instance_group.append(mc.ModelInstanceGroup(count=s.preprocess_instances, kind=gpu))
    dynamic_batching(pre, s, preferred)

    cls = mc.ModelConfig(name=P.CLASSIFIER, platform="tensorrt_plan", max_batch_size=s.max_batch_size)
    cls.input.append(mc.ModelInput(**tensor(onnx_in, FP32, list(c.spec.input_shape))))
    cls.output.append(mc.ModelOutput(**tensor(onnx_out, FP32, [c.num_classes])))
    cls.instance_group.append(mc.ModelInstanceGroup(count=s.classifier_instances, kind=gpu))
    dynamic_batching(cls, s, preferred)
    warm = cls.model_warmup.add(name="opt_batch", batch_size=opt)
    warm.inputs[onnx_in].data_type = FP32
    warm.inputs[onnx_in].dims.extend(c.spec.input_shape)
    warm.inputs[onnx_in].zero_data = True

    params = stage_parameters(s, c)
    guard = python_model(P.GUARD, s, [image_input()], [tensor(P.CHECKED, U8, [-1])], s.preprocess_instances,
                         params[P.GUARD])
    post = python_model(P.POSTPROCESS, s, [tensor(P.LOGITS, FP32, [c.num_classes])],
                        ensemble_outputs(c.num_classes, c.top_k), 1, params[P.POSTPROCESS])
    return {P.GUARD: guard, P.PREPROCESS: pre, P.CLASSIFIER: cls, P.POSTPROCESS: post}


def _stages(c: ConfigInputs) -> dict[str, mc.ModelConfig]:
    return _embedded_stages(c) if c.target == "embedded" else _gpu_stages(c)


# --------------------------------------------------------------------------------------------
# The layouts
# --------------------------------------------------------------------------------------------

def postprocess_configs(c: ConfigInputs) -> dict[str, mc.ModelConfig]:
    """preprocess -> classifier -> postprocess behind the ensemble."""
    configs = _stages(c)
    cls_in, cls_out = c.classifier_io("output")
    steps = [*front_steps(c.target), (P.CLASSIFIER, {cls_in: "pixels"}, {cls_out: "logits"}),
             (P.POSTPROCESS, {P.LOGITS: "logits"}, {o: o for o in P.OUTPUTS})]
    configs[P.ENSEMBLE] = ensemble(c.settings, ensemble_outputs(c.num_classes, c.top_k), steps)
    return configs


def classification_configs(c: ConfigInputs) -> dict[str, mc.ModelConfig]:
    """No Python model after the classifier: it also outputs the export's softmax, labelled from labels.txt in
    its model folder, and the ensemble returns those probabilities (and inherits the labels)."""
    stages = _stages(c)
    cls_in, cls_probs = c.classifier_io("probabilities")
    cls = stages[P.CLASSIFIER]
    cls.output.append(mc.ModelOutput(**tensor(cls_probs, FP32, [c.num_classes]), label_filename=LABELS_FILE))
    ens = ensemble(c.settings, [tensor(P.PROBABILITIES, FP32, [c.num_classes])],
                   [*front_steps(c.target), (P.CLASSIFIER, {cls_in: "pixels"}, {cls_probs: P.PROBABILITIES})])
    return {**{m: stages[m] for m in (P.GUARD, P.PREPROCESS) if m in stages}, P.CLASSIFIER: cls, P.ENSEMBLE: ens}


def fused_configs(c: ConfigInputs) -> dict[str, mc.ModelConfig]:
    """One Python model named like the ensemble, with the ensemble's inputs and outputs: the three stages
    on one dynamic batch, with the parameters each stage's model would have."""
    s = c.settings
    params = {k: v for stage in stage_parameters(s, c).values() for k, v in stage.items()}
    if s.payload_percent > 0 and s.payload_dir:  # payload sampling: this model holds the bytes and the answer
        params.update(payload_percent=s.payload_percent, payload_dir=s.payload_dir, payload_max_kb=s.payload_max_kb,
                      payload_images=s.payload_images)
    model = python_model(P.ENSEMBLE, s, [image_input()], ensemble_outputs(c.num_classes, c.top_k),
                         s.classifier_instances, params)
    return {P.ENSEMBLE: model}


STAGE_CODE = (P.PREPROCESS, P.CLASSIFIER, P.POSTPROCESS)  # served/models/<stage>.py, one per stage model

LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (
    Layout("fused", targets=("embedded",), onnx_model=P.ENSEMBLE, pipeline_model=P.ENSEMBLE,
           labels_dir=f"{P.ENSEMBLE}/1", code={"embedded": {P.ENSEMBLE: "fused"}},
           configs=fused_configs, single_model=True),
    Layout("postprocess", targets=TARGETS, onnx_model=P.CLASSIFIER, pipeline_model=P.PREPROCESS,
           labels_dir=f"{P.POSTPROCESS}/1",
           code={"embedded": {m: m for m in STAGE_CODE}, "gpu": {m: m for m in (P.GUARD, P.POSTPROCESS)}},
           configs=postprocess_configs),
    Layout("classification", targets=TARGETS, onnx_model=P.CLASSIFIER, pipeline_model=P.PREPROCESS,
           labels_dir=P.CLASSIFIER, code={"embedded": {m: m for m in (P.PREPROCESS, P.CLASSIFIER)},
                                          "gpu": {P.GUARD: P.GUARD}},
           configs=classification_configs, needs_probabilities=True),
)}
DEFAULT_LAYOUT = {"embedded": "fused", "gpu": "classification"}
# what a manifest without a "layout" key was rendered as (repositories from before layouts were recorded)
UNRECORDED_LAYOUT = "postprocess"


def get(name: str) -> Layout:
    if name not in LAYOUTS:
        raise ValueError(f"layout must be one of {tuple(LAYOUTS)}, got {name!r}")
    return LAYOUTS[name]


def of_manifest(manifest: dict[str, Any]) -> Layout:
    """The layout a repository was rendered with (its build.json)."""
    return get(manifest.get("layout", UNRECORDED_LAYOUT))


def default_for(target: str) -> Layout:
    return get(DEFAULT_LAYOUT.get(target, UNRECORDED_LAYOUT))
