"""Running a model on a CT's voxels: mixed precision, host-to-device copies, progress bars."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch
from tqdm import tqdm

from p2ch_luna.precision import amp_settings


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Inference under the training engine's mixed precision (bfloat16 where supported); nothing when disabled."""
    return amp_settings(enabled, device).autocast(device)


def progress_bar(total: int, description: str, unit: str, progress: bool) -> tqdm:
    """A transient bar with ETA over one CT's ``total`` items; shown only with ``progress`` and on a terminal."""
    return tqdm(total=total, desc=description, unit=unit, leave=False, dynamic_ncols=True,
                disable=None if progress else True)


def host_to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` as a tensor on ``device``; on CUDA through pinned memory, so the host does not wait for the GPU.

    On the CPU the tensor shares ``array``'s memory, read-only arrays too (a CT's
    ``hu``): callers only read it.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
