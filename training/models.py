"""ResNet family in plain PyTorch (torchvision does not import with the CPU torch build).

Models are built by name from :data:`ARCHS`; the name and keyword arguments are stored in every
checkpoint so that export and evaluation rebuild exactly the trained network. A structurally pruned
network (training.prune) is its architecture plus ``channels``: the layers whose widths pruning
changed, so a pruned checkpoint is rebuilt by the same ``build_model`` call as any other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from training import sources


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride on the 3x3 (ResNet v1.5)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _downsample(inplanes: int, outplanes: int, stride: int) -> nn.Module | None:
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False), nn.BatchNorm2d(outplanes))


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], num_classes: int,
                 width: int = 64, zero_init_residual: bool = True, dropout: float = 0.0):
        super().__init__()
        self.inplanes = width
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        self.layer1 = self._make_layer(block, width, layers[0], 1)
        self.layer2 = self._make_layer(block, width * 2, layers[1], 2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], 2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()  # no weights: state dicts unchanged
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # each residual branch starts as identity: steadier early training
            for m in self.modules():
                last_bn = m.bn3 if isinstance(m, Bottleneck) else m.bn2 if isinstance(m, BasicBlock) else None
                if last_bn is not None:
                    nn.init.zeros_(last_bn.weight)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [block(self.inplanes, planes, stride)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


ARCHS: dict[str, Callable[..., ResNet]] = {
    # small variant for the demo and the tests: one block per stage, narrow
    "resnet_tiny": lambda num_classes, width=32, **kw: ResNet(BasicBlock, [1, 1, 1, 1], num_classes, width, **kw),
    "resnet18": lambda num_classes, width=64, **kw: ResNet(BasicBlock, [2, 2, 2, 2], num_classes, width, **kw),
    "resnet34": lambda num_classes, width=64, **kw: ResNet(BasicBlock, [3, 4, 6, 3], num_classes, width, **kw),
    "resnet50": lambda num_classes, width=64, **kw: ResNet(Bottleneck, [3, 4, 6, 3], num_classes, width, **kw),
}


# A layer's widths: [in, out] for convolutions and linear layers, [features] for batch norms.
Channels = dict[str, list[int]]


def layer_widths(model: nn.Module) -> Channels:
    widths: Channels = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            widths[name] = [m.in_channels, m.out_channels]
        elif isinstance(m, nn.Linear):
            widths[name] = [m.in_features, m.out_features]
        elif isinstance(m, nn.BatchNorm2d):
            widths[name] = [m.num_features]
    return widths


def changed_widths(model: nn.Module, nominal: nn.Module) -> Channels:
    """The layers of ``model`` whose widths differ from ``nominal`` (the same architecture, unpruned)."""
    before = layer_widths(nominal)
    return {name: w for name, w in layer_widths(model).items() if before.get(name) != w}


ModelT = TypeVar("ModelT", bound=nn.Module)


def _pair(values: tuple[int, ...]) -> tuple[int, int]:
    """A Conv2d's kernel size, stride, padding or dilation (always two numbers) as nn.Conv2d takes them."""
    return values[0], values[1]


def resize_layers(model: ModelT, channels: Channels) -> ModelT:
    """Replace each named layer by one of the recorded widths (same kernel, stride, padding, bias);
    the weights are then loaded from the checkpoint."""
    modules = dict(model.named_modules())
    for name, widths in channels.items():
        old = modules.get(name)
        new: nn.Module
        if isinstance(old, nn.Conv2d) and len(widths) == 2 and old.groups == 1:
            padding = old.padding if isinstance(old.padding, str) else _pair(old.padding)
            new = nn.Conv2d(widths[0], widths[1], _pair(old.kernel_size), _pair(old.stride), padding,
                            _pair(old.dilation), bias=old.bias is not None, padding_mode=old.padding_mode)
        elif isinstance(old, nn.Linear) and len(widths) == 2:
            new = nn.Linear(widths[0], widths[1], bias=old.bias is not None)
        elif isinstance(old, nn.BatchNorm2d) and len(widths) == 1:
            new = nn.BatchNorm2d(widths[0], old.eps, old.momentum, old.affine, old.track_running_stats)
        else:
            raise ValueError(f"channels: cannot resize layer {name!r} ({type(old).__name__}) to {widths}")
        parent, _, attr = name.rpartition(".")
        setattr(modules[parent] if parent else model, attr, new)
    return model


# A pruned library network (training.prune) is rebuilt as the library's network, then reshaped: every module
# whose tensors or plain attributes (in_channels, normalized_shape, head_dim, ...) pruning changed gets
# them back from the checkpoint. Torch-Pruning's own tp.state_dict does the same by pickling every module's
# __dict__ (hooks and all); this keeps the checkpoint a plain dict of numbers and shapes.
Structure = dict[str, dict[str, dict[str, Any]]]
PLAIN = (int, float, bool, str, tuple)


def pruned_structure(model: nn.Module, nominal: nn.Module) -> Structure:
    """Per module of ``model`` that differs from ``nominal`` (the same architecture, unpruned): the plain
    attributes that changed and the shapes of the tensors that did."""
    reference = dict(nominal.named_modules())
    out: Structure = {}
    for name, m in model.named_modules():
        ref = reference[name]
        attrs = {k: v for k, v in vars(m).items()
                 if not k.startswith("_") and isinstance(v, PLAIN) and vars(ref).get(k) != v}
        shapes = {k: list(t.shape) for k, t in [*m._parameters.items(), *m._buffers.items()]
                  if t is not None and tuple(t.shape) != tuple(getattr(ref, k).shape)}
        if attrs or shapes:
            out[name] = {"attrs": attrs, "shapes": shapes}
    return out


def apply_structure(model: ModelT, structure: Structure) -> ModelT:
    """Reshape ``model`` (freshly built, unpruned) to a recorded :func:`pruned_structure`; the weights are
    then loaded from the checkpoint."""
    modules = dict(model.named_modules())
    for name, s in structure.items():
        if name not in modules:
            raise ValueError(f"structure: the network has no module {name!r} (another architecture or version?)")
        m = modules[name]
        for k, v in s["attrs"].items():
            setattr(m, k, v)
        for k, shape in s["shapes"].items():
            if k in m._parameters and m._parameters[k] is not None:
                m._parameters[k] = nn.Parameter(torch.empty(shape), requires_grad=m._parameters[k].requires_grad)
            elif k in m._buffers and m._buffers[k] is not None:
                m._buffers[k] = torch.empty(shape, dtype=m._buffers[k].dtype)
            else:
                raise ValueError(f"structure: module {name!r} has no tensor {k!r}")
    return model


def build_model(arch: str, channels: Channels | None = None, structure: Structure | None = None,
                **arch_args: Any) -> nn.Module:
    """A fresh network: a built-in one by name, or a library's (``torchvision:<name>``, ``timm:<name>``:
    training/sources.py) with the checkpoint's arguments; a pruned network's layer widths (``channels``, the
    built-in networks) or :func:`pruned_structure` (``structure``, the libraries')."""
    check_arch(arch)
    model = sources.create(arch, **arch_args) if sources.SEPARATOR in arch else ARCHS[arch](**arch_args)
    if structure:
        model = apply_structure(model, structure)
    return resize_layers(model, channels) if channels else model


def check_arch(arch: str) -> str:
    """An --arch value: a built-in name, or a known source and a name (the library checks the name itself)."""
    if sources.SEPARATOR in arch:
        sources.split(arch)
    elif arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHS)}, or torchvision:<name> "
                         "or timm:<name>")
    return arch
