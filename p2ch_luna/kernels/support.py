"""What the package's Triton kernels share: whether Triton is usable, whether it runs in its CPU interpreter,
whether ``torch.compile`` is tracing (and keeping it out of the kernels), and how far a kernel's result lies from torch's."""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from typing import Any, Callable, TypeVar

import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")

MIN_TRITON = (3, 6)
"""The oldest Triton the kernels were tested with, compiled on a GPU and interpreted (docs/benchmarks.md)."""
DIFFERENCE_CHUNK = 1 << 24
"""Elements compared at a time, so a check needs no float64 copy of a whole activation."""

Result = torch.Tensor | tuple[torch.Tensor, ...]
"""A kernel's output, or several (a weight gradient and a bias gradient), each checked on its own."""


@functools.cache
def triton_usable() -> bool:
    """Whether Triton is installed and at least ``MIN_TRITON``."""
    try:
        import triton
    except ImportError:
        return False
    version = tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:2])
    if version < MIN_TRITON:
        logger.debug("Triton %s is older than %s; torch computes instead of the package's kernels",
                     triton.__version__, ".".join(map(str, MIN_TRITON)))
        return False
    return True


def compiling() -> bool:
    """Whether ``torch.compile`` is tracing the caller."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling is not None and is_compiling())


def compiler_disabled(function: Callable[..., T]) -> Callable[..., T]:
    """``torch.compiler.disable(function)``, applied at its first call instead of at import.

    The decorator imports ``torch._dynamo``, a large share of diagnosis' start-up (bench_diagnose's
    start-up line; docs/benchmarks.md), which a run that never calls the kernels (every CPU run) never needs. The kernels'
    entry points are not reached while ``torch.compile`` traces (:func:`compiling`), so the wrapper is
    never traced itself.
    """
    disabled: Callable[..., T] | None = None

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> T:
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(function)
        return disabled(*args, **kwargs)

    return call


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def relative_difference(got: Result, expected: Result) -> float:
    """``||got - expected|| / ||expected||``, summed in float64 a chunk at a time; NaN where either holds a
    non-finite value. Volumes are compared in channels-last order (a view of the kernels' outputs); for
    several outputs, the largest of their differences."""
    if isinstance(got, tuple):
        differences = [relative_difference(part, reference) for part, reference in zip(got, expected, strict=True)]
        return math.nan if any(math.isnan(d) for d in differences) else max(differences, default=0.0)
    got, expected = _flat(got.detach()), _flat(expected.detach())
    difference = reference = 0.0
    for got_part, expected_part in zip(got.split(DIFFERENCE_CHUNK), expected.split(DIFFERENCE_CHUNK)):
        expected_part = expected_part.double()
        difference += float((got_part.double() - expected_part).square().sum())
        reference += float(expected_part.square().sum())
    return math.sqrt(difference) / max(math.sqrt(reference), torch.finfo(torch.float64).tiny)


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.permute(0, 2, 3, 4, 1) if tensor.dim() == 5 else tensor).reshape(-1)
