"""Which implementation runs the operations that have a Triton kernel (the classifier's small convolutions,
the augmentation's fused resampling): ``torch`` (cuDNN and torch's own operators, the default) or ``triton``
(the package's kernels on CUDA, each checked against torch before its first use).

The kernels stay opt-in until an end-to-end GPU training run with them shows the loss curve of cuDNN
(``bench/gpu_session.sh`` prints both); training and diagnosis take the choice as ``--kernels``.
"""

from __future__ import annotations

import argparse

import torch

from p2ch_luna.errors import UsageError
from p2ch_luna.kernels.support import MIN_TRITON, triton_usable

KERNEL_CHOICES = ("torch", "triton")
DEFAULT_KERNELS = "torch"
KERNELS_HELP = ("which implementation runs the classifier's small 3x3x3 convolutions and the fused augmentation: "
                "torch (cuDNN and torch's own operators) or triton (the package's Triton kernels, CUDA only; "
                "needs the [triton] extra). Default: torch")


def add_kernels_argument(group: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--kernels``, spelled and explained the same in every command that runs the classifier."""
    group.add_argument("--kernels", choices=KERNEL_CHOICES, default=DEFAULT_KERNELS, help=KERNELS_HELP)


def uses_triton(kernels: str) -> bool:
    """Whether the choice ``kernels`` asks for the Triton kernels."""
    if kernels not in KERNEL_CHOICES:
        raise UsageError(f"--kernels must be one of {', '.join(KERNEL_CHOICES)}, not {kernels!r}")
    return kernels == "triton"


def check_kernels(kernels: str, device: torch.device) -> None:
    """Refuse ``--kernels triton`` where the kernels cannot run: no usable Triton, or a device other than CUDA."""
    if not uses_triton(kernels):
        return
    if device.type != "cuda":
        raise UsageError(f"--kernels triton needs a CUDA device, not {device}; use --kernels torch")
    if not triton_usable():
        raise UsageError(f"--kernels triton needs Triton >= {'.'.join(map(str, MIN_TRITON))} "
                         "(pip install '.[triton]'); use --kernels torch")
