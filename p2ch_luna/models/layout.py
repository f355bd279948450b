"""Channels-last memory layout for models and their inputs.

On the CPU (oneDNN) it is faster for both models in inference
(``python -m bench.bench_diagnose``); on GPUs it is what cuDNN's tensor-core kernels want.
Training and diagnosis use it by default (``--no-channels-last`` turns it off
for training).
"""

from __future__ import annotations

import torch
from torch import nn


def channels_last(model: nn.Module) -> nn.Module:
    """``model`` (in place) in channels-last layout: 3D when it has 5-D weights, else 2D; returns it."""
    has_3d = any(parameter.dim() == 5 for parameter in model.parameters())
    return model.to(memory_format=torch.channels_last_3d if has_3d else torch.channels_last)


def to_memory_format(tensor: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``tensor`` in channels-last layout (3D or 2D by its rank) when asked, else unchanged."""
    if not channels_last:
        return tensor
    if tensor.dim() == 5:
        return tensor.contiguous(memory_format=torch.channels_last_3d)
    if tensor.dim() == 4:
        return tensor.contiguous(memory_format=torch.channels_last)
    return tensor
