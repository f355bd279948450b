"""The book's weight initialisation, shared by the classifier and the U-Net wrapper."""

from __future__ import annotations

import math

from torch import nn

_BOOK_INIT_TYPES = (nn.Linear, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def init_book_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) weights and uniform(+-1/sqrt(fan_out)) biases.

    The book calls ``nn.init.normal_(bias, -bound, bound)``, i.e. mean -bound and
    std bound, which reads like a slip for ``uniform_``; we use the uniform draw.
    """
    for module in model.modules():
        if isinstance(module, _BOOK_INIT_TYPES):
            nn.init.kaiming_normal_(module.weight, a=0, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                _, fan_out = nn.init._calculate_fan_in_and_fan_out(module.weight)
                bound = 1 / math.sqrt(fan_out)
                nn.init.uniform_(module.bias, -bound, bound)
