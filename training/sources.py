"""Model sources, as a registry: where an architecture comes from, its pretrained weights and its own preprocessing.

``--arch`` names a built-in network (training/models.py: ``resnet18``), or ``<source>:<name>`` for any
classification model of a library: ``torchvision:mobilenet_v3_small``, ``timm:convnext_nano``. The
checkpoint records the name and the arguments (``num_classes`` from the data set, and any others), so
export, quantization, serving and the engine build rebuild the network with no other input: a fresh
network of that architecture, then the checkpoint's weights.

Pretrained weights (``--weights``) come from a local file (a state dict, or a checkpoint dict holding
one under ``state_dict``/``model``), or a library's own name for them (torchvision: ``IMAGENET1K_V1``
or ``DEFAULT``; timm: a pretrained tag such as ``in1k``), which the library resolves from its local
cache (``$TORCH_HOME/hub/checkpoints``, the Hugging Face cache) and, where the machine is online, by
download. The classifier head is the new one for the data set's classes: the weights' own head is
left out (its shape differs), every other tensor must match.

Each source also says how its models were trained to see images (the library's eval transform:
resize fraction, interpolation, mean/std), which becomes the checkpoint's PreprocessSpec when
training starts from pretrained weights; and which parameters form the head, for the fine-tuning
recipe (a lower learning rate, or none, for the backbone).

Adding a source is one :class:`Source` entry in :data:`SOURCES`. The libraries are imported only by the
source that needs them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.metadata import file_sha256
from core.preprocess import PreprocessSpec

SEPARATOR = ":"
# the libraries' interpolation names in the spec's terms (core.preprocess.INTERPOLATIONS)
INTERPOLATIONS = {"nearest": "nearest", "bilinear": "linear", "bicubic": "cubic"}


@dataclass(frozen=True)
class EvalTransform:
    """How a library's pretrained model expects its images: the crop fraction (crop / resize), the
    interpolation in the library's words, mean/std, and the size it was trained at."""

    crop_fraction: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    native_size: int

    def spec(self, crop_size: int) -> PreprocessSpec:
        """The PreprocessSpec at ``crop_size``: the shorter side resized to crop / fraction (timm's
        floor(size / crop_pct)), then the centre crop, as the library's own eval transform does."""
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"the model's preprocessing resamples with {self.interpolation!r}, which the served "
                             f"DALI graph does not offer (it has {', '.join(INTERPOLATIONS)})")
        return PreprocessSpec(crop_size=crop_size, resize_size=math.floor(crop_size / self.crop_fraction),
                              mean=self.mean, std=self.std, interpolation=INTERPOLATIONS[self.interpolation])


@dataclass(frozen=True)
class Source:
    name: str
    library: str
    create: Callable[..., nn.Module]                     # (model name, num_classes, **kwargs) -> fresh network
    named_weights: Callable[[str, str], dict[str, Any]]  # (model name, the library's weights name) -> state dict
    eval_transform: Callable[[str, str | None], EvalTransform]  # (model name, weights name or None)
    head: Callable[[nn.Module], nn.Module]               # the classifier head module of a network


def _rgb(values: Any) -> tuple[float, float, float]:
    r, g, b = (float(v) for v in values)
    return r, g, b


def split(arch: str) -> tuple[str, str]:
    """``"timm:convnext_nano"`` -> ("timm", "convnext_nano"); a built-in name -> ("builtin", name)."""
    if SEPARATOR not in arch:
        return "builtin", arch
    source, name = arch.split(SEPARATOR, 1)
    if source not in SOURCES:
        raise ValueError(f"unknown model source {source!r} in --arch {arch!r}; sources: {', '.join(SOURCES)} "
                         "(or a built-in name without a source)")
    return source, name


# --------------------------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------------------------

def _torchvision_create(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    from torchvision import models

    if name not in models.list_models(module=models):
        raise ValueError(f"torchvision has no classification model {name!r}")
    return models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


def _torchvision_weights(name: str, weights: str) -> Any:
    from torchvision.models import get_model_weights

    enum = get_model_weights(name)
    tag = weights.split(".")[-1]
    if tag not in enum.__members__:
        raise ValueError(f"torchvision's {name} has no weights {weights!r}; it has {', '.join(enum.__members__)}, "
                         "or give a weights file")
    return enum[tag]


def _torchvision_named_weights(name: str, weights: str) -> dict[str, Any]:
    w = _torchvision_weights(name, weights)
    try:  # the hub cache first ($TORCH_HOME/hub/checkpoints/<the URL's file name>), then a download
        return dict(w.get_state_dict(progress=False, check_hash=True))
    except OSError as e:
        raise ValueError(f"torchvision's {name} weights {w.name} are not in the local cache and could not be "
                         f"downloaded ({e}); place {w.url.rsplit('/', 1)[-1]} in $TORCH_HOME/hub/checkpoints/ or "
                         "give the file as --weights") from e


def _torchvision_eval(name: str, weights: str | None) -> EvalTransform:
    from torchvision.models import get_model_weights

    w = _torchvision_weights(name, weights) if weights else get_model_weights(name).DEFAULT
    t = w.transforms()
    crop, resize = t.crop_size[0], t.resize_size[0]
    return EvalTransform(crop / resize, t.interpolation.value, _rgb(t.mean), _rgb(t.std), crop)


def last_linear(model: nn.Module) -> nn.Module:
    """torchvision's classifiers end in one nn.Linear (fc, classifier[-1], heads.head): the head."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no linear classifier head")
    return linears[-1]


# --------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------

def _timm_create(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ValueError(f"timm has no model {name!r}")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def _timm_named_weights(name: str, weights: str) -> dict[str, Any]:
    import timm

    try:  # timm resolves the tag from its caches (Hugging Face hub, torch hub), then downloads
        model = timm.create_model(f"{name}.{weights}", pretrained=True)
    except Exception as e:  # timm raises RuntimeError, OSError or the hub's own errors when offline
        raise ValueError(f"timm could not load the pretrained weights {name}.{weights} ({type(e).__name__}: "
                         f"{str(e)[:300]}); give a weights file as --weights") from e
    return dict(model.state_dict())


def _timm_eval(name: str, weights: str | None) -> EvalTransform:
    import timm

    cfg = timm.models.get_pretrained_cfg(f"{name}.{weights}" if weights else name)
    if cfg is None:
        raise ValueError(f"timm has no pretrained configuration for {name}{'.' + weights if weights else ''}")
    return EvalTransform(cfg.crop_pct, cfg.interpolation, _rgb(cfg.mean), _rgb(cfg.std), cfg.input_size[-1])


def _timm_head(model: nn.Module) -> nn.Module:
    head = model.get_classifier()  # type: ignore[operator]  # every timm model has it
    if not isinstance(head, nn.Module):
        raise ValueError(f"{type(model).__name__} has no classifier head module")
    return head


SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("torchvision", "torchvision", _torchvision_create, _torchvision_named_weights, _torchvision_eval,
           last_linear),
    Source("timm", "timm", _timm_create, _timm_named_weights, _timm_eval, _timm_head),
)}


# --------------------------------------------------------------------------------------------
# What training asks of a source
# --------------------------------------------------------------------------------------------

def size_arguments(arch: str, crop_size: int) -> dict[str, Any]:
    """What a library architecture needs to be built for ``crop_size``: a timm model with a fixed input size
    (a ViT's position embedding) takes ``img_size``; the others adapt by themselves."""
    source, name = split(arch)
    if source != "timm":
        return {}
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    return {"img_size": crop_size} if cfg is not None and cfg.fixed_input_size else {}


def create(arch: str, **arch_args: Any) -> nn.Module:
    """A fresh network of a library architecture (``arch`` = source:name) with the checkpoint's arguments."""
    source, name = split(arch)
    return SOURCES[source].create(name, **arch_args)


def _state_dict_of(path: Path) -> dict[str, Any]:
    from torch.torch_version import TorchVersion

    # tensors only (a weights file may come from anywhere); a checkpoint of this project also records
    # torch's version, a str subclass
    with torch.serialization.safe_globals([TorchVersion]):
        raw = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
            break
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ValueError(f"{path} holds no state dict (a mapping of parameter names to tensors)")
    return raw


def head_module(model: nn.Module, arch: str) -> nn.Module:
    """The classifier head: the library's own idea of it, or a built-in network's last linear layer."""
    source, _ = split(arch)
    return last_linear(model) if source == "builtin" else SOURCES[source].head(model)


def load_pretrained(model: nn.Module, arch: str, weights: str, keep_head: bool = False) -> dict[str, Any]:
    """Load ``weights`` (a file, or the library's name for them) into ``model`` but for its head, which
    stays the new one for the data set's classes; with ``keep_head``, the head too (the model served as it is,
    with the classes it was trained on: training/pretrained.py). Returns the record the checkpoint keeps."""
    source, name = split(arch)
    path = Path(weights)
    if path.is_file():
        state = _state_dict_of(path)
    elif source == "builtin":
        raise FileNotFoundError(f"--weights {weights}: no such file (a built-in architecture takes a weights file)")
    else:
        state = SOURCES[source].named_weights(name, weights)
    own = model.state_dict()
    head_mod = head_module(model, arch)
    head = set() if keep_head else {f"{n}.{k}" for n, m in model.named_modules() if m is head_mod
                                    for k in m.state_dict()}
    # the head is the data set's, always new; everything else must fit
    misfits = sorted(k for k, v in state.items()
                     if k in own and k not in head and tuple(v.shape) != tuple(own[k].shape))
    if misfits:
        raise ValueError(f"{weights} does not fit {arch}: {', '.join(misfits[:5])} differ in shape outside the "
                         "classifier head")
    left_out = sorted(k for k in state if k in head)
    missing = sorted(set(own) - set(state) - head)
    unexpected = sorted(set(state) - set(own) - head)
    if missing or unexpected:
        raise ValueError(f"{weights} does not fit {arch}: missing {missing[:5]}, unexpected {unexpected[:5]} "
                         f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")
    model.load_state_dict({k: v for k, v in state.items() if k not in left_out}, strict=False)
    return {"weights": weights if not path.is_file() else str(path.resolve()),
            "weights_sha256": file_sha256(path) if path.is_file() else None,
            "source": source, "library_version": _version(SOURCES[source].library) if source in SOURCES else None,
            "head_reinitialised": left_out}


def _version(library: str) -> str:
    return str(__import__(library).__version__)


def model_spec(arch: str, weights: str | None, crop_size: int) -> PreprocessSpec | None:
    """The preprocessing a library's pretrained model was trained with, at ``crop_size`` (None for a built-in
    architecture: it has no library transform)."""
    source, name = split(arch)
    if source == "builtin":
        return None
    tag = weights if weights and not Path(weights).is_file() else None
    return SOURCES[source].eval_transform(name, tag).spec(crop_size)


def head_parameters(model: nn.Module, arch: str) -> set[str]:
    """The names of the classifier head's parameters (the rest is the backbone)."""
    head = head_module(model, arch)
    return {f"{n}.{k}" for n, m in model.named_modules() if m is head for k, _ in m.named_parameters()}
