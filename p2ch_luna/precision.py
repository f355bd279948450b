"""Mixed precision and backend settings shared by training and diagnosis.

``--amp`` means bfloat16 autocast on CPUs and on GPUs that support it, float16 with a
GradScaler on older GPUs. A CPU without bfloat16 instructions emulates it, slowly, so
asking for it there logs a warning instead of silently running slower.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch

log = logging.getLogger(__name__)

BFLOAT16_PROBABILITY_TOLERANCE = 0.02
"""``diagnose --amp`` on the CPU: nodule probabilities within this of float32's, so the findings at a
threshold are float32's except candidates this close to it (measured with bench_diagnose --amp:
docs/benchmarks.md; tested in tests/diagnose/test_amp_tolerance.py)."""


@dataclasses.dataclass(frozen=True)
class AmpSettings:
    """Autocast dtype (None: full precision) and whether float16 needs a GradScaler."""

    dtype: torch.dtype | None = None

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


def tune_backends(device: torch.device) -> None:
    """Let cuDNN time its convolution algorithms for each new input shape and keep the fastest.

    Worth it for training, whose batches all have one shape (process-wide torch
    setting; nothing to do off CUDA)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def cpu_computes_bfloat16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX-512 BF16 or AMX); without them bfloat16 is emulated, slowly."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def warn_if_emulated(enabled: bool, device: torch.device) -> None:
    """Log a warning when mixed precision is asked for on a CPU that would emulate bfloat16."""
    if enabled and device.type == "cpu" and not cpu_computes_bfloat16():
        log.warning("--amp on a CPU without AVX-512 BF16 or AMX: bfloat16 is emulated there and usually slower "
                    "than float32")


PRECISIONS = ("auto", "float32", "mixed")
"""``diagnose --precision`` choices; ``--amp`` is ``mixed``."""


def mixed_by_default(device_type: str, runtime: str, native_bfloat16: bool) -> bool:
    """What ``--precision auto`` picks: mixed precision (bfloat16) only where it was measured faster with
    the same findings, i.e. PyTorch on a CPU with native bfloat16 (AVX-512 BF16 or AMX; docs/benchmarks.md,
    "Quiet, alternated"). Float32 elsewhere: a CPU that would emulate bfloat16, ONNX Runtime (float32 only),
    and GPUs, where bf16 was not measured faster."""
    return device_type == "cpu" and runtime == "torch" and native_bfloat16


def resolve_precision(precision: str, device: torch.device, runtime: str = "torch") -> bool:
    """Whether ``--precision`` (one of :data:`PRECISIONS`) means mixed precision on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "auto":
        return mixed_by_default(device.type, runtime, device.type == "cpu" and cpu_computes_bfloat16())
    return precision == "mixed"


def amp_settings(enabled: bool, device: torch.device) -> AmpSettings:
    """bfloat16 on the CPU and on GPUs that support it; float16 (with a GradScaler) otherwise."""
    if not enabled:
        return AmpSettings()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return AmpSettings(torch.float16)
    return AmpSettings(torch.bfloat16)
