"""Step 2 of diagnosis: the U-Net on every slice that holds lung, cropped to the lungs."""

from __future__ import annotations

import numpy as np
import torch

from p2ch_luna.diagnose.heap import HeapTrimmer
from p2ch_luna.diagnose.inference import autocast, host_to_device, progress_bar
from p2ch_luna.diagnose.lungs import mask_bounding_box
from p2ch_luna.io.ct import HU_MAX, HU_MIN
from p2ch_luna.models.layout import to_memory_format

SEGMENTATION_PAD = 16
"""Pixels added around the lungs' bounding box before segmenting (U-Net context)."""
SEGMENTATION_HEAP_SLACK = 512 << 20
"""Bytes the process may grow by in CPU segmentation before the heap's free memory goes back to the system.

Each trim costs time (the memory is faulted in again) and never trimming lets the free heap grow by
gigabytes on a large CT; past 512 MB trades the two (``python -m bench.bench_memory``)."""
CPU_SEGMENTATION_BATCH = 4
"""Slices per U-Net batch on the CPU: larger batches run slower there (``python -m bench.bench_segmentation``)."""
CUDA_SEGMENTATION_BATCH = 32
"""Slices per U-Net batch on CUDA."""


def context_slices(model: torch.nn.Module) -> int:
    """Slices above and below the segmented one that ``model`` takes: its input channels say it.

    The checkpoint's U-Net is built with ``2 * context + 1`` input channels (7 in the book),
    so training and inference cannot disagree."""
    channels = getattr(model, "in_channels", None)
    if not isinstance(channels, int) or channels < 1 or channels % 2 == 0:
        raise ValueError(f"a segmentation model takes an odd number of slices as channels, not {channels!r}")
    return (channels - 1) // 2


def segment_ct(hu: np.ndarray, region: np.ndarray, model: torch.nn.Module, threshold: float,
               batch_size: int, device: torch.device, amp: bool = False, progress: bool = False) -> np.ndarray:
    """Boolean nodule mask: the U-Net on every slice that ``region`` touches.

    The clipped HU of the region's bounding box (plus context slices) go to
    the device once; each batch of consecutive slices is cropped to the
    region's box within those slices (padded in-plane by ``SEGMENTATION_PAD``),
    and its stacks of ``2 * context_slices(model) + 1`` slices are gathered there by index. The crops start and end
    on the model's ``pooling_grid`` (where it has one), so they see the pooling
    cells of the full slice, as the book's full-slice inference does. The predictions are
    read back after the last batch, so the host never waits for a GPU between
    batches. On the CPU the heap's free memory goes back to the system whenever
    the process has grown by ``SEGMENTATION_HEAP_SLACK`` (:mod:`p2ch_luna.diagnose.heap`).
    ``progress`` shows a bar of the slices on a terminal.
    """
    mask = np.zeros(hu.shape, dtype=bool)
    context_count = context_slices(model)
    box = mask_bounding_box(region)
    if box is None:
        return mask
    slices = box[0]
    n_slices = hu.shape[0]
    first = max(slices.start - context_count, 0)
    last = min(slices.stop + context_count, n_slices)
    volume = host_to_device(hu[first:last], device)  # int16 over the bus; clipped and widened a batch at a time
    offsets = np.arange(-context_count, context_count + 1)
    slice_indices = np.arange(slices.start, slices.stop)
    grid = int(getattr(model, "pooling_grid", 1))  # crops start on the full slice's pooling cells
    context = host_to_device(np.clip(slice_indices[:, None] + offsets[None, :], 0, n_slices - 1) - first, device)
    predictions = []
    trimmer = HeapTrimmer(SEGMENTATION_HEAP_SLACK) if device.type == "cpu" else None
    with torch.inference_mode(), autocast(device, amp), progress_bar(len(slice_indices), "segmentation", "slice",
                                                            progress) as bar:
        for start in range(0, len(slice_indices), batch_size):
            batch_slices = slice_indices[start : start + batch_size]
            bar.update(len(batch_slices))
            crop = mask_bounding_box(region[batch_slices], (0, SEGMENTATION_PAD, SEGMENTATION_PAD))
            if crop is None:
                continue
            rows, cols = (_on_grid(axis, grid, size) for axis, size in zip(crop[1:], hu.shape[1:]))
            inputs = volume[context[start : start + batch_size], rows, cols].float().clamp_(HU_MIN, HU_MAX)
            logits = model(to_memory_format(inputs, channels_last=True))
            predictions.append((batch_slices, rows, cols, torch.sigmoid(logits[:, 0].float()) > threshold))
            if trimmer is not None:  # without this the heap keeps gigabytes of freed blocks
                trimmer.step()
    for batch_slices, rows, cols, predicted in predictions:
        mask[batch_slices, rows, cols] = predicted.cpu().numpy()
    return mask


def _on_grid(span: slice, grid: int, size: int) -> slice:
    """``span`` widened to start and end on multiples of ``grid`` (the end clamped to ``size``)."""
    return slice(span.start - span.start % grid, min(span.stop + -span.stop % grid, size))
