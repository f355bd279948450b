"""Models by name, so checkpoints rebuild them from ``model_name`` and ``model_kwargs``."""

from __future__ import annotations

import functools
from typing import Any, Callable

from torch import nn

from p2ch_luna.models.classifier import LunaModel
from p2ch_luna.models.unet import UNetWrapper

WIDE_CONV_CHANNELS = 16

MODEL_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "luna": LunaModel,
    "luna-wide": functools.partial(LunaModel, conv_channels=WIDE_CONV_CHANNELS),
    "unet": UNetWrapper,
}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` with constructor arguments ``kwargs``."""
    try:
        factory = MODEL_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODEL_REGISTRY))}") from None
    return factory(**kwargs)
