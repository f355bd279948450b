"""compiler_disabled: the kernels' entry points stay out of torch.compile, without importing dynamo at start-up."""

from __future__ import annotations

import subprocess
import sys

import torch

from p2ch_luna.kernels.support import compiler_disabled
from tests.locations import REPO


def test_importing_diagnosis_and_the_kernels_does_not_import_dynamo() -> None:
    code = ("import sys, p2ch_luna.diagnose.cli, p2ch_luna.models.small_conv, p2ch_luna.data.resample; "
            "print('torch._dynamo' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_a_compiler_disabled_function_runs_eagerly_inside_a_compiled_one() -> None:
    seen: list[bool] = []

    @compiler_disabled
    def eager(x: torch.Tensor) -> torch.Tensor:
        """Doubles ``x``, recording whether torch.compile was tracing it."""
        seen.append(torch.compiler.is_compiling())
        return x * 2

    def outer(x: torch.Tensor) -> torch.Tensor:
        return eager(x + 1) - 1

    assert eager.__doc__.startswith("Doubles")
    x = torch.arange(4.0)
    compiled = torch.compile(outer, backend="eager")
    assert torch.equal(compiled(x), (x + 1) * 2 - 1)
    assert torch.equal(compiled(x), (x + 1) * 2 - 1)
    assert seen == [False, False]  # never traced: run as plain Python each call
