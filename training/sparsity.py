"""2:4 structured sparsity for TensorRT's sparse tensor cores, via NVIDIA ModelOpt.

In every group of four weights along a layer's input channels two are zero; TensorRT (built with
``--sparsity``, build.engine) then runs those layers on the sparse tensor cores of Ampere and later
GPUs. ModelOpt picks the mask by magnitude and keeps it through fine-tuning; checkpoints store the
masked weights as ordinary dense tensors, so nothing downstream needs ModelOpt.
"""

from __future__ import annotations

import torch
from torch import nn

SPARSITY_PATTERNS = ("none", "2:4")
MASK_SUFFIX = "._weight_mask"  # the buffer ModelOpt's sparse modules keep beside each weight
# ModelOpt (after NVIDIA's ASP) sparsifies a layer only when its outputs are a multiple of 8 and its
# inputs a multiple of 16; pruning with --sparsity 2:4 rounds channels to 16 so every layer qualifies.
SPARSE_OUT_MULTIPLE, SPARSE_IN_MULTIPLE = 8, 16


def eligible(weight: torch.Tensor) -> bool:
    """Whether ModelOpt gives this weight (conv or linear) a 2:4 mask."""
    return weight.ndim >= 2 and weight.shape[0] % SPARSE_OUT_MULTIPLE == 0 and weight.shape[1] % SPARSE_IN_MULTIPLE == 0


def sparsify(model: nn.Module) -> nn.Module:
    """Magnitude 2:4 masks on every layer ModelOpt supports (in place); the masks hold while training."""
    import modelopt.torch.sparsity as mts  # heavy import, only when asked for

    return mts.sparsify(model, "sparse_magnitude")


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each mask folded into its weight: loads into the plain architecture."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for key in [k for k in state if k.endswith(MASK_SUFFIX)]:
        weight = key[: -len(MASK_SUFFIX)] + ".weight"
        state[weight] = state[weight] * state.pop(key).to(state[weight].dtype)
    return state


def two_four_violations(weight: torch.Tensor) -> int:
    """Groups of four consecutive input channels (at one output channel and kernel position) with more
    than two non-zero weights: 0 means TensorRT can use the layer's sparse kernels. Layers that are not
    :func:`eligible` count 0."""
    if not eligible(weight):
        return 0
    w = weight.movedim(1, -1).reshape(-1, weight.shape[1] // 4, 4)  # input channels last, in groups of 4
    return int(((w != 0).sum(-1) > 2).sum())
