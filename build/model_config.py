"""Triton model configs as ModelConfig protobufs: the pieces every layout builds with, and the ensemble's check.

Configs are built as protobufs and written as text, so they always parse.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from build.settings import RepoSettings
from core import protocol as P

FP32, U8, BYTES = mc.TYPE_FP32, mc.TYPE_UINT8, mc.TYPE_STRING
# an ensemble step: (model, input_map, output_map), each map from the model's tensor names to the ensemble's
Step = tuple[str, dict[str, str], dict[str, str]]


def tensor(name: str, dtype: int, dims: list[int], ragged: bool = False) -> dict[str, Any]:
    return dict(name=name, data_type=dtype, dims=dims, **({"allow_ragged_batch": True} if ragged else {}))


def image_input() -> dict[str, Any]:
    """IMAGE: encoded bytes; allow_ragged_batch: requests whose byte strings differ in length still batch together."""
    return tensor(P.IMAGE, U8, [-1], ragged=True)


def ensemble_outputs(num_classes: int, k: int) -> list[dict[str, Any]]:
    """PROBABILITIES, LABELS, SCORES: what a postprocess-style model (or the fused one) returns."""
    return [tensor(P.PROBABILITIES, FP32, [num_classes]), tensor(P.LABELS, BYTES, [k]), tensor(P.SCORES, FP32, [k])]


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


def python_model(name: str, s: RepoSettings, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]],
                 instances: int, params: dict[str, Any]) -> mc.ModelConfig:
    cfg = mc.ModelConfig(name=name, backend="python", max_batch_size=s.max_batch_size)
    cfg.input.extend(mc.ModelInput(**t) for t in inputs)
    cfg.output.extend(mc.ModelOutput(**t) for t in outputs)
    cfg.instance_group.append(mc.ModelInstanceGroup(count=instances, kind=mc.ModelInstanceGroup.KIND_CPU))
    dynamic_batching(cfg, s, [b for b in s.preferred_batch_sizes if b <= s.max_batch_size])
    for k, v in params.items():
        cfg.parameters[k].string_value = str(v)
    return cfg


def ensemble(s: RepoSettings, outputs: list[dict[str, Any]], steps: list[Step]) -> mc.ModelConfig:
    """The ensemble: IMAGE in, ``outputs`` out, ``steps`` in order."""
    ens = mc.ModelConfig(name=P.ENSEMBLE, platform="ensemble", max_batch_size=s.max_batch_size)
    ens.input.append(mc.ModelInput(**tensor(P.IMAGE, U8, [-1])))
    ens.output.extend(mc.ModelOutput(**t) for t in outputs)
    for model, input_map, output_map in steps:
        ens.ensemble_scheduling.step.add(model_name=model, model_version=-1, input_map=input_map, output_map=output_map)
    return ens


def _signature(t: Any) -> tuple[int, list[int]]:
    return (t.data_type, list(t.dims))


def _check_step(i: int, step: Any, configs: dict[str, mc.ModelConfig], ens: mc.ModelConfig,
                available: dict[str, tuple[int, list[int]]]) -> None:
    where = f"ensemble step {i} ({step.model_name})"
    if step.model_name not in configs:
        raise ValueError(f"{where}: no config for model '{step.model_name}'")
    model = configs[step.model_name]
    inputs = {t.name: _signature(t) for t in model.input}
    outputs = {t.name: _signature(t) for t in model.output}
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


def check_ensemble(configs: dict[str, mc.ModelConfig]) -> None:
    """Cross-check the wiring: every step's tensors exist, come from somewhere, and agree in type and shape."""
    ens = next((c for c in configs.values() if c.platform == "ensemble"), None)
    if ens is None:
        raise ValueError("no ensemble among the configs")
    available = {t.name: _signature(t) for t in ens.input}  # ensemble tensor -> (dtype, dims)
    for i, step in enumerate(ens.ensemble_scheduling.step):
        _check_step(i, step, configs, ens, available)
    for t in ens.output:
        if available.get(t.name) != _signature(t):
            raise ValueError(f"ensemble output '{t.name}' {_signature(t)} is produced as "
                             f"{available.get(t.name)} (dtype, dims)")


def config_text(cfg: mc.ModelConfig) -> str:
    return str(text_format.MessageToString(cfg))


def read_configs(repo: Path) -> dict[str, mc.ModelConfig]:
    """Parse every <model>/config.pbtxt of a repository as Triton's ModelConfig."""
    return {p.parent.name: text_format.Parse(p.read_text(), mc.ModelConfig())
            for p in sorted(Path(repo).glob("*/config.pbtxt"))}
