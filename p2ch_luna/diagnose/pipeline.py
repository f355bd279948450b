"""Diagnose CTs end to end: lungs, segmentation, candidates, nodule and malignancy scores.

    python -m p2ch_luna.diagnose --series-uid UID[,UID...]   # LUNA16 series under --data-root
    python -m p2ch_luna.diagnose --ct PATH                    # .mhd, NIfTI or a DICOM folder
    python -m p2ch_luna.diagnose --validation [--include-train] --output DIR

Pipeline per CT (the book's chapter 14, kept inside the lungs):

1. lung mask from HU (:mod:`p2ch_luna.diagnose.lungs`); every later step stays inside it;
2. U-Net on every slice that holds lung (7-slice context, clamped at the ends),
   cropped to the lungs' bounding box, batched, sigmoid > threshold;
3. restrict to the lungs and group the mask into candidates: by default one
   per distance-transform peak of the dense segmented tissue, with copies of
   large ones at the lungs' edge moved towards it (``--grouping peaks``), or
   the book's eroded connected components with their HU-weighted centre of
   mass (``--grouping components``);
4. nodule probability per candidate (softmax of the classifier on a chunk of
   the size it was trained on, averaged over its in-plane mirror images unless
   ``--no-flips``), then, with peaks, one detection per blob (a
   candidate inside a more probable one is dropped); malignancy probability
   for those above the nodule threshold.

Truth, when annotations exist, scores the run: the book's confusion table per
series and in total, and the LUNA16 FROC/CPM. Under ``torchrun`` the series are
split across ranks and rank 0 merges the results and writes the outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from scipy import ndimage
from tqdm import tqdm

from p2ch_luna.diagnose import distance
from p2ch_luna.diagnose import lungs as lungs_module
from p2ch_luna.diagnose import prefetch as prefetch_module
from p2ch_luna.diagnose import regions
from p2ch_luna.cli import make_parser, run_command
from p2ch_luna.io.ct import HU_MAX, HU_MIN, Ct, extract_chunk, find_series_path, list_series_on_disk
from p2ch_luna.distributed import DistributedInfo, distributed_info_from_env, resolve_device
from p2ch_luna.training.engine import amp_settings, warn_if_emulated
from p2ch_luna.errors import DataError, UsageError
from p2ch_luna.geometry import Geometry
from p2ch_luna.diagnose.heap import HeapTrimmer
from p2ch_luna.data.luna import (
    ANNOTATIONS_FILE,
    COORD_COLUMNS,
    EXCLUDED_FILE,
    MALIGNANCY_FILE,
    attach_malignancy,
    read_annotations,
    read_csv_checked,
    read_malignancy,
    split_by_series,
)
from p2ch_luna.metrics import FrocResult, confusion_table, froc, match_nodules
from p2ch_luna.models.checkpoint import LoadedCheckpoint, find_latest_checkpoint, load_checkpoint
from p2ch_luna.models.classifier import CHUNK_SHAPE_IRC
from p2ch_luna.models.layout import channels_last, to_memory_format
from p2ch_luna.paths import Paths, paths_from_args

log = logging.getLogger(__name__)

CONTEXT_SLICES = 3
"""Slices above and below the one segmented (7 input channels, as in the book)."""
SEGMENTATION_PAD = 16
"""Pixels added around the lungs' bounding box before segmenting (U-Net context)."""
SEGMENTATION_HEAP_SLACK = 512 << 20
"""Bytes the process may grow by in CPU segmentation before the heap's free memory goes back to the system.
Each trim costs time (the memory is faulted in again): on a 475-slice CT, trimming after every batch
made the segmentation 30% slower, past 512 MB 15%, and never trimming let the free heap grow to 1.6 GB
(``bench/bench_memory.py``)."""
HU_WEIGHT_OFFSET = HU_MIN - 1
"""Centre of mass weights are HU - this (>= 1 after clipping), as in the book."""
CPU_SEGMENTATION_BATCH = 4
"""Slices per U-Net batch on the CPU: larger batches measured slower (cache)."""
CUDA_SEGMENTATION_BATCH = 32
CPU_CLASSIFICATION_BATCH = 16
"""Candidates per classifier batch on the CPU (x4 mirror views: 64 chunks; measured fastest in channels-last)."""
CUDA_CLASSIFICATION_BATCH = 64
GROUPINGS = ("peaks", "components")
DENSE_HU = -600
"""Peak grouping: voxels of the segmentation at or above this HU form the blobs (ground glass included)."""
FAINT_HU = -750
"""Peak grouping: in a faint component of the segmentation, voxels at or above this HU form its blob."""
FAINT_COMPONENT = (0.5, 0.6)
"""Peak grouping: a component is faint (ground glass fainter than ``DENSE_HU``) when under the first
fraction of its voxels reach ``DENSE_HU`` but at least the second reach ``FAINT_HU``. Its blob at
``DENSE_HU`` would be specks (a -600 HU nodule has half its voxels below, through the CT's noise);
segmented parenchyma (about -850 HU) is not faint."""
FAINT_MAX_DIAMETER_MM = 20.0
"""Peak grouping: a faint component is at most a sphere this wide. An over-segmenting model's components
of parenchyma and vessels are larger (12-35 cm3 on the demo's data); larger ground glass still gives
speckled candidates within its radius."""
FAINT_SMOOTHING_MM = 1.0
"""Peak grouping: Gaussian sigma of the HU that ``FAINT_HU`` applies to (the noise's specks)."""
GAUSSIAN_TRUNCATE = 4.0
"""Peak grouping: the ``FAINT_SMOOTHING_MM`` kernel reaches this many sigmas (scipy's default)."""
MIN_PEAK_RADIUS_MM = 1.0
"""Peak grouping: a blob's centre must lie at least this far inside it (nodules are >= 3 mm across)."""
PEAK_SEPARATION_MM = 3.0
"""Peak grouping: two peaks closer than this (per axis) are one candidate."""
EDGE_SHIFT_MIN_DIAMETER_MM = 10.0
"""Peak grouping: candidates this large near the lungs' edge get shifted copies (see :func:`edge_shifts`)."""
EDGE_SHIFT_REACH_MM = 3.0
"""... when the edge lies within their radius plus this."""
EDGE_SHIFTS = (0.5, 1.0)
"""... moved by these fractions of their radius towards the edge."""


@dataclasses.dataclass(frozen=True)
class DiagnoseConfig:
    """Thresholds and post-processing (book defaults) and how to run the models."""

    segmentation_threshold: float = 0.5
    erosion_iterations: int = 1
    grouping: str = "peaks"
    flips: bool = True
    nodule_threshold: float = 0.5
    malignancy_threshold: float = 0.5
    batch_size: int = CPU_SEGMENTATION_BATCH
    amp: bool = False
    lung_margin_mm: float = lungs_module.DEFAULT_MARGIN_MM


@dataclasses.dataclass
class DiagnosisModels:
    """The loaded models; ``malignancy`` is optional."""

    segmentation: LoadedCheckpoint
    nodule: LoadedCheckpoint
    malignancy: LoadedCheckpoint | None = None

    def place(self, device: torch.device) -> DiagnosisModels:
        """Every model on ``device``, in eval mode and channels-last (about 2x faster on the CPU); returns self."""
        for loaded in (self.segmentation, self.nodule, self.malignancy):
            if loaded is not None:
                channels_last(loaded.model.to(device).eval())
        return self

    def describe(self) -> dict[str, Any]:
        """JSON-ready description of each model (file, task, architecture, book or ours)."""
        described: dict[str, Any] = {}
        for name in ("segmentation", "nodule", "malignancy"):
            loaded = getattr(self, name)
            described[name] = None if loaded is None else {
                "path": str(loaded.path), "task": loaded.task, "model_name": loaded.model_name,
                "is_book": loaded.is_book, "epoch": loaded.epoch, "samples_seen": loaded.samples_seen,
            }
        return described


@dataclasses.dataclass
class SeriesDiagnosis:
    """Everything found in one CT: one row per candidate, plus what the report needs."""

    series_uid: str
    source: str
    shape_irc: tuple[int, int, int]
    spacing_irc: tuple[float, float, float]
    lung_volume_ml: float
    candidates: pd.DataFrame
    timings: dict[str, float]
    geometry: Geometry | None = None
    figures: dict[str, bytes] = dataclasses.field(default_factory=dict)
    """PNG bytes per finding, keyed by file name."""
    mask_bits: np.ndarray | None = None
    """The segmentation mask inside the lungs, ``np.packbits``-ed (``--save-mask``)."""


CANDIDATE_COLUMNS = [
    "series_uid", "center_x", "center_y", "center_z", "index", "row", "col",
    "voxel_count", "diameter_mm", "nodule_probability", "malignancy_probability",
]


# ---------------------------------------------------------------------------
# Models


def load_models(paths: Paths, segmentation_path: Path | None, classification_path: Path | None,
                malignancy_path: Path | None, device: torch.device) -> DiagnosisModels:
    """Load the three models: given files, else the newest best checkpoint of each task."""

    def resolve(path: Path | None, task: str, flag: str, required: bool) -> Path | None:
        if path is not None:
            return path
        found = find_latest_checkpoint(paths.models_dir, task)
        if found is None and required:
            raise DataError(f"no {task} checkpoint ({task}_*.best.state) under {paths.models_dir}; "
                            f"pass {flag} FILE or --models-dir DIR")
        if found is not None:
            log.info("using the newest %s checkpoint %s", task, found)
        return found

    segmentation_file = resolve(segmentation_path, "segmentation", "--segmentation-path", True)
    nodule_file = resolve(classification_path, "nodule", "--classification-path", True)
    malignancy_file = resolve(malignancy_path, "malignancy", "--malignancy-path", False)
    models = DiagnosisModels(
        segmentation=load_checkpoint(segmentation_file, "segmentation", map_location=device),
        nodule=load_checkpoint(nodule_file, "nodule", map_location=device),
        malignancy=None if malignancy_file is None else load_checkpoint(malignancy_file, "malignancy",
                                                                          map_location=device),
    )
    if models.malignancy is None:
        log.info("no malignancy model: malignancy is not estimated")
    return models.place(device)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Inference under the training engine's mixed precision (bfloat16 where supported); nothing when disabled."""
    return amp_settings(enabled, device).autocast(device)


# ---------------------------------------------------------------------------
# Pipeline steps


def _bar(total: int, description: str, unit: str, progress: bool) -> tqdm:
    """A transient bar with ETA over one CT's ``total`` items; shown only with ``progress`` and on a terminal."""
    return tqdm(total=total, desc=description, unit=unit, leave=False, dynamic_ncols=True,
                disable=None if progress else True)


def segment_ct(hu: np.ndarray, region: np.ndarray, model: torch.nn.Module, threshold: float,
               batch_size: int, device: torch.device, amp: bool = False, progress: bool = False) -> np.ndarray:
    """Boolean nodule mask: the U-Net on every slice that ``region`` touches.

    The clipped HU of the region's bounding box (plus context slices) go to
    the device once; each batch of consecutive slices is cropped to the
    region's box within those slices (padded in-plane by ``SEGMENTATION_PAD``),
    and its 7-slice stacks are gathered there by index. The crops start and end
    on the model's ``pooling_grid`` (where it has one), so they see the pooling
    cells of the full slice, as the book's full-slice inference does. The predictions are
    read back after the last batch, so the host never waits for a GPU between
    batches. On the CPU the heap's free memory goes back to the system whenever
    the process has grown by ``SEGMENTATION_HEAP_SLACK`` (:mod:`p2ch_luna.diagnose.heap`).
    ``progress`` shows a bar of the slices on a terminal.
    """
    mask = np.zeros(hu.shape, dtype=bool)
    box = lungs_module.mask_bounding_box(region)
    if box is None:
        return mask
    slices = box[0]
    n_slices = hu.shape[0]
    first = max(slices.start - CONTEXT_SLICES, 0)
    last = min(slices.stop + CONTEXT_SLICES, n_slices)
    volume = host_to_device(hu[first:last], device)  # int16 over the bus; clipped and widened a batch at a time
    offsets = np.arange(-CONTEXT_SLICES, CONTEXT_SLICES + 1)
    slice_indices = np.arange(slices.start, slices.stop)
    grid = int(getattr(model, "pooling_grid", 1))  # crops start on the full slice's pooling cells
    context = host_to_device(np.clip(slice_indices[:, None] + offsets[None, :], 0, n_slices - 1) - first, device)
    predictions = []
    trimmer = HeapTrimmer(SEGMENTATION_HEAP_SLACK) if device.type == "cpu" else None
    with torch.inference_mode(), autocast(device, amp), _bar(len(slice_indices), "segmentation", "slice",
                                                            progress) as bar:
        for start in range(0, len(slice_indices), batch_size):
            batch_slices = slice_indices[start : start + batch_size]
            bar.update(len(batch_slices))
            crop = lungs_module.mask_bounding_box(region[batch_slices], (0, SEGMENTATION_PAD, SEGMENTATION_PAD))
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


def group_candidates(hu: np.ndarray, nodule_mask: np.ndarray, region: np.ndarray, ct: Ct,
                     erosion_iterations: int, grouping: str = "peaks", workers: int = 1) -> pd.DataFrame:
    """Candidate rows from the segmentation mask restricted to ``region`` (the lungs).

    ``grouping="components"`` is the book's: connected components of the eroded
    mask, centred at their HU-weighted centre of mass, sized by the equivalent
    diameter of the component before erosion. An over-segmenting model merges a
    nodule with the vessels and chest wall it touches into one component whose
    centre lies off the nodule, so ``"peaks"`` (the default) instead puts one
    candidate at each local maximum of the distance to the edge of the dense
    (>= ``DENSE_HU``; faint ground glass: see :func:`blob_tissue`) segmented
    tissue: the centre of every blob, attached or not, sized by twice that
    distance, plus shifted copies of large ones at the lungs' edge
    (:func:`edge_shifts`). Candidates whose centre falls outside ``region`` are
    dropped, so every finding lies inside the lungs. ``workers`` threads compute
    the peaks' distances.
    """
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}")
    restricted = nodule_mask & region
    box = lungs_module.mask_bounding_box(restricted, (1, 1, 1))  # so no blob touches a face of the box
    if box is None:
        return _empty_candidates()
    restricted = restricted[box]
    if grouping == "peaks":
        centers, voxel_count, diameters = _distance_peaks(hu[box], restricted, ct.geometry.spacing_irc, workers)
    else:
        centers, voxel_count, diameters = _component_centres(hu[box], restricted, ct, erosion_iterations)
    if len(centers) == 0:
        return _empty_candidates()
    centers += [s.start for s in box]
    nearest = np.rint(centers).astype(np.int64)
    inside = region[tuple(nearest.T)]
    if not inside.all():
        log.debug("%s: %d candidate centre(s) outside the lungs dropped", ct.series_uid, int((~inside).sum()))
    centers, voxel_count, diameters = centers[inside], voxel_count[inside], diameters[inside]
    if grouping == "peaks":
        shifted, source = edge_shifts(centers, diameters, region, ct.geometry.spacing_irc)
        rows = np.concatenate([np.arange(len(centers)), source])
        centers, voxel_count, diameters = np.concatenate([centers, shifted]), voxel_count[rows], diameters[rows]
    xyz = ct.geometry.irc_to_xyz(centers).reshape(-1, 3)
    return pd.DataFrame({
        "series_uid": ct.series_uid,
        "center_x": xyz[:, 0], "center_y": xyz[:, 1], "center_z": xyz[:, 2],
        "index": centers[:, 0], "row": centers[:, 1], "col": centers[:, 2],
        "voxel_count": voxel_count.astype(np.int64), "diameter_mm": diameters,
        "nodule_probability": np.nan, "malignancy_probability": np.nan,
    }, columns=CANDIDATE_COLUMNS)


def edge_shifts(centers_irc: np.ndarray, diameters_mm: np.ndarray, region: np.ndarray,
                spacing_irc: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Copies of the large candidates at the edge of ``region``, moved towards it: ``(centres, source rows)``.

    A juxtapleural nodule lies partly beyond the lung mask, and the segmenter marks only the part inside,
    so its depth peak sits towards the lung, off the nodule's centre: 7.5-8.4 mm for a 30 mm one on a
    real CT, where the book's classifier scored 0.66-0.995 there and 1.000 at the true centre. A candidate
    at least ``EDGE_SHIFT_MIN_DIAMETER_MM`` across, whose nearest voxel outside ``region`` lies within its
    radius plus ``EDGE_SHIFT_REACH_MM``, gets copies moved ``EDGE_SHIFTS`` of its radius towards that voxel
    (those landing inside ``region``). The classifier scores them all, and :func:`keep_strongest` keeps the
    most probable of each group.
    """
    spacing = np.asarray(spacing_irc, dtype=np.float64)
    shape = np.asarray(region.shape)
    shifted: list[np.ndarray] = []
    source: list[int] = []
    for row in np.flatnonzero(diameters_mm >= EDGE_SHIFT_MIN_DIAMETER_MM):
        radius = diameters_mm[row] / 2.0
        center = centers_irc[row]
        reach = np.ceil((radius + EDGE_SHIFT_REACH_MM) / spacing).astype(int)
        low = np.maximum(np.rint(center).astype(int) - reach, 0)
        high = np.minimum(np.rint(center).astype(int) + reach + 1, shape)
        outside = np.argwhere(~region[tuple(slice(a, b) for a, b in zip(low, high))])
        if len(outside) == 0:
            continue
        offsets = (outside + low - center) * spacing
        distances = np.linalg.norm(offsets, axis=1)
        nearest = int(np.argmin(distances))
        if distances[nearest] > radius + EDGE_SHIFT_REACH_MM or distances[nearest] == 0.0:
            continue
        direction = offsets[nearest] / distances[nearest] / spacing  # voxels per mm along the way out
        for fraction in EDGE_SHIFTS:
            moved = center + fraction * radius * direction
            voxel = np.rint(moved).astype(int)
            if np.all(voxel >= 0) and np.all(voxel < shape) and region[tuple(voxel)]:
                shifted.append(moved)
                source.append(int(row))
    if not shifted:
        return np.empty((0, 3)), np.empty(0, dtype=np.int64)
    return np.asarray(shifted, dtype=np.float64), np.asarray(source, dtype=np.int64)


def _distance_peaks(hu: np.ndarray, mask: np.ndarray, spacing_irc: np.ndarray,
                    workers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres (voxel), voxel counts and diameters (mm) of the distance-transform peaks of the mask's blobs."""
    dense = blob_tissue(hu, mask, spacing_irc)
    box = lungs_module.mask_bounding_box(dense, (1, 1, 1))
    if box is None:
        return np.empty((0, 3)), np.empty(0, np.int64), np.empty(0)
    dense = dense[box]  # padded by one voxel, so the edge of the box is never dense: distances are unchanged
    spacing = np.asarray(spacing_irc, dtype=np.float64)
    depth = distance.depth_mm(dense, spacing, workers, np.float32)
    window = 2 * np.maximum(np.rint(PEAK_SEPARATION_MM / spacing), 1).astype(int) + 1
    deepest = ndimage.maximum_filter(depth, size=tuple(window))
    peaks = np.flatnonzero(depth >= MIN_PEAK_RADIUS_MM)  # a few voxels in a hundred: compared there alone
    peaks = peaks[depth.flat[peaks] == deepest.flat[peaks]]
    del deepest
    coordinates = np.unravel_index(peaks, depth.shape)
    labels, count = regions.touching_labels(coordinates)  # a plateau of equal depths is one peak
    if count == 0:
        return np.empty((0, 3)), np.empty(0, np.int64), np.empty(0)
    centers = regions.label_means(labels, coordinates, count)
    centers += [s.start for s in box]
    radii = regions.label_maxima(labels, depth.flat[peaks], count)
    diameters = 2.0 * radii
    voxel_count = np.rint(np.pi / 6.0 * diameters**3 / float(np.prod(spacing))).astype(np.int64)
    return centers, voxel_count, diameters


def blob_tissue(hu: np.ndarray, mask: np.ndarray, spacing_irc: Sequence[float]) -> np.ndarray:
    """The segmented tissue whose depth peaks are the candidates (the peak grouping).

    Voxels of ``mask`` at or above ``DENSE_HU``; in a faint component of ``mask`` (see
    ``FAINT_COMPONENT`` and ``FAINT_MAX_DIAMETER_MM``), its voxels whose HU smoothed over
    ``FAINT_SMOOTHING_MM`` reaches ``FAINT_HU``. Components are 26-connected, so no two touch
    and a faint one leaves every other blob's depths as they were.
    """
    dense = mask & (hu >= DENSE_HU)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return dense
    inside = labels[mask]
    values = hu[mask]
    size = np.bincount(inside, minlength=count + 1)
    solid_count = np.bincount(inside, weights=values >= DENSE_HU, minlength=count + 1)
    faint_count = np.bincount(inside, weights=values >= FAINT_HU, minlength=count + 1)
    solid_fraction, faint_fraction = FAINT_COMPONENT
    largest = np.pi / 6.0 * FAINT_MAX_DIAMETER_MM**3 / float(np.prod(spacing_irc))
    is_faint = (solid_count < solid_fraction * size) & (faint_count >= faint_fraction * size) & (size <= largest)
    is_faint[0] = False
    # Through the CT's noise a few voxels of a faint nodule lie below FAINT_HU, and each would cut its depth:
    # the threshold applies to HU smoothed over FAINT_SMOOTHING_MM, which parenchyma (-850 HU) stays far below.
    # Each faint component is smoothed in its own box, widened by the Gaussian's reach: one box around them
    # all would span the lungs (two float32 copies of them on a 475-slice CT: 0.5 GB).
    sigma = FAINT_SMOOTHING_MM / np.asarray(spacing_irc, dtype=np.float64)
    reach = [int(GAUSSIAN_TRUNCATE * s + 0.5) for s in sigma]  # gaussian_filter's radius
    boxes = ndimage.find_objects(labels) if is_faint.any() else []
    for label in np.flatnonzero(is_faint):
        box = tuple(slice(max(span.start - r, 0), min(span.stop + r, length))
                    for span, r, length in zip(boxes[label - 1], reach, hu.shape))
        smoothed = ndimage.gaussian_filter(hu[box].astype(np.float32), sigma, mode="nearest",
                                           truncate=GAUSSIAN_TRUNCATE)
        dense[box] |= (labels[box] == label) & (smoothed >= FAINT_HU)
    return dense


def _component_centres(hu: np.ndarray, restricted: np.ndarray, ct: Ct,
                       erosion_iterations: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The book's grouping: HU-weighted centres of the eroded mask's connected components."""
    eroded = ndimage.binary_erosion(restricted, iterations=erosion_iterations) if erosion_iterations else restricted
    labels, count = ndimage.label(eroded)
    if count == 0:
        return np.empty((0, 3)), np.empty(0, np.int64), np.empty(0)
    coordinates = np.nonzero(eroded)
    voxel_labels = labels[coordinates]
    weights = np.clip(hu[coordinates], HU_MIN, HU_MAX).astype(np.float64) - HU_WEIGHT_OFFSET
    centers = regions.label_means(voxel_labels, coordinates, count, weights)
    whole, _ = ndimage.label(restricted)
    # Each eroded component lies inside one component of the whole mask: read it at any of its voxels.
    one = regions.one_voxel_each(voxel_labels, count)
    owner = whole[tuple(axis[one] for axis in coordinates)]
    voxel_count = np.bincount(whole.ravel())[owner]
    voxel_volume = float(np.prod(ct.geometry.spacing_xyz))
    diameters = np.cbrt(6.0 * voxel_count * voxel_volume / np.pi)
    return centers, voxel_count, diameters


def keep_strongest(candidates: pd.DataFrame) -> np.ndarray:
    """Non-maximum suppression: drop a candidate inside a more probable one.

    ``candidates`` must be sorted by decreasing ``nodule_probability``. A
    candidate is dropped when its centre lies within the radius of a kept one
    (at least ``PEAK_SEPARATION_MM``), so one nodule gives one detection.
    """
    xyz = candidates[["center_x", "center_y", "center_z"]].to_numpy(np.float64)
    radii = np.maximum(candidates["diameter_mm"].to_numpy(np.float64) / 2.0, PEAK_SEPARATION_MM)
    keep = np.zeros(len(candidates), dtype=bool)
    kept: list[int] = []
    for position in range(len(candidates)):
        if kept:
            distances = np.linalg.norm(xyz[kept] - xyz[position], axis=1)
            if np.any(distances < radii[kept]):
                continue
        kept.append(position)
        keep[position] = True
    return keep


def _empty_candidates() -> pd.DataFrame:
    frame = pd.DataFrame({column: pd.Series(dtype=np.float64) for column in CANDIDATE_COLUMNS})
    return frame.astype({"series_uid": str, "voxel_count": np.int64})


def classify_chunks(hu: np.ndarray, centers_irc: np.ndarray, model: torch.nn.Module, batch_size: int,
                    device: torch.device, amp: bool = False, flips: bool = False,
                    progress: bool = False, description: str = "classification") -> np.ndarray:
    """Probability of class 1 (softmax of the logits) for a chunk around each voxel centre.

    With ``flips`` the probability is the mean over the chunk and its three
    in-plane mirror images (test-time augmentation with the training flips).
    The next batch is cut on the host while the device computes this one:
    the scores are read back after the last batch. ``progress`` shows a bar of
    the candidates on a terminal.
    """
    shape = tuple(getattr(model, "input_shape", CHUNK_SHAPE_IRC))
    scores = []
    with torch.inference_mode(), autocast(device, amp), _bar(len(centers_irc), description, "candidate",
                                                            progress) as bar:
        for start in range(0, len(centers_irc), batch_size):
            batch = centers_irc[start : start + batch_size]
            bar.update(len(batch))
            chunks = np.stack([extract_chunk(hu, center, shape) for center in batch])
            inputs = host_to_device(chunks, device).unsqueeze(1).float()
            views = [inputs, inputs.flip(3), inputs.flip(4), inputs.flip((3, 4))] if flips else [inputs]
            logits = model(to_memory_format(torch.cat(views), channels_last=True)).float()
            scores.append(torch.softmax(logits, dim=1)[:, 1].reshape(len(views), len(batch)).mean(dim=0))
    if not scores:
        return np.zeros(0, dtype=np.float64)
    return torch.cat(scores).cpu().numpy().astype(np.float64)  # the one wait for the device


def diagnose_ct(ct: Ct, models: DiagnosisModels, config: DiagnoseConfig, device: torch.device,
                source: str = "", lungs: lungs_module.Lungs | None = None, progress: bool = False,
                ) -> tuple[SeriesDiagnosis, np.ndarray, np.ndarray]:
    """Run the whole pipeline on one CT; returns the diagnosis, the lung mask and the nodule mask.

    ``lungs`` found beforehand (:mod:`p2ch_luna.diagnose.prefetch`) skip that step; the
    caller then adds its time to the timings. ``progress`` shows bars of the
    model stages on a terminal.
    """
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    spacing_irc = tuple(float(v) for v in ct.geometry.spacing_irc)
    if lungs is None:
        lungs = lungs_module.find_lungs(ct.hu, spacing_irc, margin_mm=config.lung_margin_mm)
        lap("lungs_s")
    nodule_mask = segment_ct(ct.hu, lungs.mask, models.segmentation.model, config.segmentation_threshold,
                             config.batch_size, device, config.amp, progress)
    lap("segmentation_s")
    candidates = group_candidates(ct.hu, nodule_mask, lungs.mask, ct, config.erosion_iterations, config.grouping,
                                  workers=torch.get_num_threads())
    lap("grouping_s")
    centers = np.rint(candidates[["index", "row", "col"]].to_numpy(np.float64)).astype(np.int64)
    batch = CUDA_CLASSIFICATION_BATCH if device.type == "cuda" else CPU_CLASSIFICATION_BATCH
    candidates["nodule_probability"] = classify_chunks(ct.hu, centers, models.nodule.model, batch, device,
                                                       config.amp, config.flips, progress, "nodule classification")
    order = np.argsort(-candidates["nodule_probability"].to_numpy(), kind="mergesort")
    candidates, centers = candidates.iloc[order], centers[order]
    if config.grouping == "peaks":
        keep = keep_strongest(candidates)
        candidates, centers = candidates[keep], centers[keep]
    if models.malignancy is not None:
        suspicious = candidates["nodule_probability"].to_numpy() >= config.nodule_threshold
        candidates.loc[suspicious, "malignancy_probability"] = classify_chunks(
            ct.hu, centers[suspicious], models.malignancy.model, batch, device, config.amp, config.flips, progress,
            "malignancy")
    lap("classification_s")
    diagnosis = SeriesDiagnosis(
        series_uid=ct.series_uid, source=source or str(ct.source or ""), shape_irc=ct.shape,
        spacing_irc=spacing_irc, lung_volume_ml=lungs.volume_ml,
        candidates=candidates.reset_index(drop=True), timings=timings, geometry=ct.geometry,
    )
    return diagnosis, lungs.mask, nodule_mask & lungs.mask


def findings(diagnosis: SeriesDiagnosis, config: DiagnoseConfig) -> pd.DataFrame:
    """Candidates at or above the nodule threshold (the report's findings)."""
    candidates = diagnosis.candidates
    return candidates[candidates["nodule_probability"] >= config.nodule_threshold]


# ---------------------------------------------------------------------------
# Truth and scoring


@dataclasses.dataclass
class Truth:
    """Annotated nodules (``series_uid, center_x/y/z, diameter_mm, is_malignant``) and excluded findings."""

    nodules: pd.DataFrame
    excluded: pd.DataFrame | None = None

    def for_series(self, series_uid: str) -> pd.DataFrame:
        return self.nodules[self.nodules["series_uid"] == series_uid]

    def has_series(self, series_uid: str) -> bool:
        return bool((self.nodules["series_uid"] == series_uid).any())


def read_truth(data_root: Path, excluded_path: Path | None = None) -> Truth | None:
    """Annotations of ``data_root`` with malignancy attached; None when it has no annotations.csv.

    The FROC's excluded findings come from ``excluded_path``, else from ``annotations_excluded.csv`` in
    ``data_root`` when it is there (as the official LUNA16 evaluation always uses it)."""
    annotations_path = data_root / ANNOTATIONS_FILE
    if not annotations_path.is_file():
        return None
    nodules = read_annotations(annotations_path)
    malignancy_path = data_root / MALIGNANCY_FILE
    malignancy = read_malignancy(malignancy_path) if malignancy_path.is_file() else None
    nodules["is_malignant"] = attach_malignancy(nodules, malignancy)
    excluded = None
    if excluded_path is None and (data_root / EXCLUDED_FILE).is_file():
        excluded_path = data_root / EXCLUDED_FILE
        log.info("FROC: marks on the findings of %s are ignored, as in the LUNA16 evaluation", excluded_path)
    if excluded_path is not None:
        excluded = read_csv_checked(excluded_path, ["seriesuid", *COORD_COLUMNS, "diameter_mm"],
                                    [*COORD_COLUMNS, "diameter_mm"], what="excluded annotations")
    return Truth(nodules=nodules, excluded=excluded)


def series_confusion(truth: pd.DataFrame, candidates: pd.DataFrame, config: DiagnoseConfig) -> np.ndarray:
    """The book's confusion table for one series (no malignancy model: predicted benign, as the book)."""
    detections = candidates.assign(malignancy_probability=candidates["malignancy_probability"].fillna(0.0))
    return confusion_table(truth, detections, config.nodule_threshold, config.malignancy_threshold)


def luna_detections(candidates: pd.DataFrame) -> pd.DataFrame:
    """Candidates in the LUNA16 submission format (probability = nodule probability)."""
    return pd.DataFrame({
        "seriesuid": candidates["series_uid"].astype(str),
        "coordX": candidates["center_x"], "coordY": candidates["center_y"], "coordZ": candidates["center_z"],
        "probability": candidates["nodule_probability"],
    })


def luna_annotations(nodules: pd.DataFrame) -> pd.DataFrame:
    """Truth nodules in the LUNA16 annotations format."""
    return pd.DataFrame({
        "seriesuid": nodules["series_uid"].astype(str), "coordX": nodules["center_x"],
        "coordY": nodules["center_y"], "coordZ": nodules["center_z"], "diameter_mm": nodules["diameter_mm"],
    })


def luna_froc(truth: Truth, candidates: pd.DataFrame, series_uids: Sequence[str]) -> FrocResult:
    """LUNA16 FROC/CPM (with bootstrap CI) of all candidates over the series evaluated."""
    return froc(luna_annotations(truth.nodules), luna_detections(candidates), list(series_uids), truth.excluded)


def truth_matches(truth: Truth, results: Sequence[SeriesDiagnosis], config: DiagnoseConfig) -> pd.DataFrame:
    """Every annotated nodule of ``results``' series with the candidate that finds it (LUNA16 rule).

    One row per nodule (``series_uid, center_x/y/z, diameter_mm, is_malignant``) plus
    ``is_detected``, the candidate's ``nodule_probability``, ``malignancy_probability`` and
    ``distance_mm``, ``finding`` (its number among the series' findings, 0 when it is below
    the nodule threshold or missed) and ``false_positives_above`` (-1 when missed).
    """
    columns = ["series_uid", "center_x", "center_y", "center_z", "diameter_mm", "is_malignant"]
    nodules = truth.nodules[truth.nodules["series_uid"].isin([r.series_uid for r in results])]
    nodules = nodules[columns].reset_index(drop=True)
    candidates = pd.concat([r.candidates.assign(finding=np.arange(1, len(r.candidates) + 1)) for r in results],
                           ignore_index=True)
    matched = match_nodules(luna_annotations(nodules), luna_detections(candidates), truth.excluded)
    detected = matched["is_detected"].to_numpy()
    hit = candidates.iloc[matched["detection_id"].to_numpy()[detected]]
    nodule_probability = np.full(len(nodules), np.nan)
    malignancy_probability = np.full(len(nodules), np.nan)
    finding = np.zeros(len(nodules), dtype=np.int64)
    nodule_probability[detected] = hit["nodule_probability"].to_numpy(np.float64)
    malignancy_probability[detected] = hit["malignancy_probability"].to_numpy(np.float64)
    finding[detected] = np.where(nodule_probability[detected] >= config.nodule_threshold, hit["finding"], 0)
    return nodules.assign(
        is_detected=detected, nodule_probability=nodule_probability, malignancy_probability=malignancy_probability,
        distance_mm=matched["distance_mm"].to_numpy(), finding=finding,
        false_positives_above=matched["false_positives_above"].to_numpy(),
    )


# ---------------------------------------------------------------------------
# Series selection and distribution


def select_series(args: argparse.Namespace, paths: Paths) -> list[tuple[str, Path]]:
    """``(series_uid, path)`` to diagnose from exactly one of --series-uid/--ct/--validation."""
    # With --ct, --series-uid picks one series of a DICOM folder that holds several.
    given = [name for name in ("series_uid", "ct", "validation")
             if getattr(args, name) and not (name == "series_uid" and args.ct is not None)]
    if len(given) != 1:
        raise UsageError("give exactly one of --series-uid, --ct or --validation"
                         + (f" (got {', '.join('--' + n.replace('_', '-') for n in given)})" if given else ""))
    if args.include_train and not args.validation:
        raise UsageError("--include-train only goes with --validation")
    if args.ct is not None:
        return [(args.series_uid or "", Path(args.ct))]
    data_root = paths.require_data_root()
    if args.series_uid:
        uids = [uid.strip() for uid in args.series_uid.split(",") if uid.strip()]
        if not uids:
            raise UsageError("--series-uid names no series")
        return [(uid, find_series_path(data_root, uid)) for uid in dict.fromkeys(uids)]
    on_disk = list_series_on_disk(data_root)
    if not on_disk:
        raise DataError(f"no series (subset*/*.mhd) under {data_root}")
    train, validation = split_by_series(on_disk)
    uids = sorted(on_disk) if args.include_train else validation
    return [(uid, on_disk[uid]) for uid in uids]


def shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """This rank's share of the work: every ``world_size``-th item from ``rank``."""
    return list(items[rank::world_size])


def merge_shards(shards: Sequence[Sequence[SeriesDiagnosis]], order: Sequence[str]) -> list[SeriesDiagnosis]:
    """All ranks' diagnoses in the order the series were asked for."""
    position = {uid: i for i, uid in enumerate(order)}
    merged = [diagnosis for part in shards for diagnosis in part]
    return sorted(merged, key=lambda d: position.get(d.series_uid, len(position)))


def gather_to_main(value: Any, info: DistributedInfo) -> list[Any] | None:
    """Every rank's ``value`` in rank order on rank 0, None on the other ranks."""
    if not info.is_distributed:
        return [value]
    gathered: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


@contextlib.contextmanager
def process_group(info: DistributedInfo) -> Iterator[None]:
    """A gloo process group (results are gathered as Python objects) for torchrun runs."""
    created = False
    if info.is_distributed and not dist.is_initialized():
        dist.init_process_group(backend="gloo")
        created = True
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------
# Command


def diagnose_series(selection: Sequence[tuple[str, Path]], models: DiagnosisModels, config: DiagnoseConfig,
                    device: torch.device, figures: bool, save_mask: bool, prefetch: int = 0,
                    show_progress: bool = True) -> list[SeriesDiagnosis]:
    """Load and diagnose each CT, rendering the per-finding figures (and the mask) as bytes.

    With ``prefetch`` > 0, that many worker processes load the next CTs and
    find their lungs while this one runs the models (:mod:`p2ch_luna.diagnose.prefetch`).
    With ``show_progress``, a bar shows the CTs, or for a single CT its model stages.
    """
    stage_bars = show_progress and len(selection) < 2
    results = []
    with contextlib.closing(prefetch_module.prepared_cts(selection, config.lung_margin_mm, prefetch)) as prepared_all:
        for (_, path), prepared in tqdm(zip(selection, prepared_all), desc="diagnose", unit="CT",
                                        total=len(selection), disable=not show_progress or stage_bars):
            results.append(_diagnose_prepared(prepared, path, models, config, device, figures, save_mask,
                                              stage_bars))
    return results


def _diagnose_prepared(prepared: prefetch_module.PreparedCt, path: Path, models: DiagnosisModels,
                       config: DiagnoseConfig, device: torch.device, figures: bool,
                       save_mask: bool, progress: bool = False) -> SeriesDiagnosis:
    """Diagnose one loaded CT whose lungs are found; figures and mask bytes when asked."""
    from p2ch_luna.diagnose import report

    started = time.perf_counter()
    ct = prepared.ct
    diagnosis, lung_mask, nodule_mask = diagnose_ct(ct, models, config, device, source=str(path),
                                                    lungs=prepared.lungs, progress=progress)
    diagnosis.timings = {"load_s": prepared.load_s, "lungs_s": prepared.lungs_s, **diagnosis.timings}
    if figures:
        diagnosis.figures = report.render_findings(ct, findings(diagnosis, config), lung_mask)
    if save_mask:
        diagnosis.mask_bits = np.packbits(nodule_mask)
    # Work done for this CT, wherever it ran (loading and lungs may have overlapped the previous CT).
    diagnosis.timings["total_s"] = prepared.load_s + prepared.lungs_s + time.perf_counter() - started
    log.info("%s: %d candidates, %d findings in %.1f s", diagnosis.series_uid, len(diagnosis.candidates),
             len(findings(diagnosis, config)), diagnosis.timings["total_s"])
    return diagnosis


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("python -m p2ch_luna.diagnose",
                         "Find lung nodules in CTs and estimate their malignancy (book chapter 14).")
    source = parser.add_argument_group("what to diagnose (exactly one)")
    source.add_argument("--series-uid", metavar="UID[,UID...]", help="LUNA16 series under --data-root (with --ct: the series of a DICOM folder)")
    source.add_argument("--ct", type=Path, metavar="PATH", help="a .mhd/.mha, a NIfTI file or a DICOM series folder")
    source.add_argument("--validation", action="store_true", help="every validation series on disk")
    source.add_argument("--include-train", action="store_true", help="with --validation: every series on disk")
    models = parser.add_argument_group("models (default: newest best checkpoint per task in --models-dir)")
    models.add_argument("--segmentation-path", type=Path, metavar="FILE")
    models.add_argument("--classification-path", type=Path, metavar="FILE")
    models.add_argument("--malignancy-path", type=Path, metavar="FILE", help="optional")
    tuning = parser.add_argument_group("thresholds and post-processing")
    tuning.add_argument("--segmentation-threshold", type=_probability, default=0.5,
                        help="U-Net probability above which a voxel is nodule tissue")
    tuning.add_argument("--erosion-iterations", type=_non_negative_int, default=1,
                        help="binary erosions of the mask before --grouping components")
    tuning.add_argument("--grouping", choices=GROUPINGS, default="peaks",
                        help="candidates at distance-transform peaks of the dense segmented tissue (one per "
                             "blob, also when it touches a vessel; faint ground glass taken at -750 HU; large "
                             "ones at the lungs' edge also moved towards it), or the book's connected components")
    tuning.add_argument("--flips", action=argparse.BooleanOptionalAction, default=True,
                        help="average the classifiers over the chunk and its in-plane mirror images")
    tuning.add_argument("--nodule-threshold", type=_probability, default=0.5,
                        help="nodule probability from which a candidate is reported as a finding")
    tuning.add_argument("--malignancy-threshold", type=_probability, default=0.5,
                        help="malignancy probability from which a finding is called malignant")
    tuning.add_argument("--lung-margin-mm", type=float, default=lungs_module.DEFAULT_MARGIN_MM,
                        help="dilation of the lung mask that findings must lie in")
    running = parser.add_argument_group("running")
    running.add_argument("--batch-size", type=_positive_int, default=None,
                         help=f"slices per segmentation batch (default {CPU_SEGMENTATION_BATCH} on the CPU, "
                              f"{CUDA_SEGMENTATION_BATCH} on CUDA)")
    running.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    running.add_argument("--prefetch", type=_non_negative_int, default=0, metavar="N",
                         help="with several CTs: N worker processes load the next CTs and find their lungs "
                              "while the models run on the current one (default 0: one CT at a time, all in "
                              "this process; workers measured no faster on 2 CPU cores and slower on an H200 "
                              "machine with 16 cores, on synthetic CTs that take little time to read)")
    running.add_argument("--amp", action="store_true",
                         help="mixed precision: bfloat16 on the CPU and on GPUs that support it, else float16. "
                              "On a CPU with AMX it measured 1.3-1.8x faster per CT, with the same findings "
                              "(probabilities within 0.01); a CPU without AVX-512 BF16 or AMX emulates it, slowly")
    output = parser.add_argument_group("outputs")
    output.add_argument("--output", type=Path, metavar="DIR",
                        help="write report.json, findings.csv, a PNG per finding (and froc.png) here")
    output.add_argument("--save-mask", action="store_true", help="with --output: the segmentation mask per series")
    output.add_argument("--annotations-excluded", type=Path, metavar="FILE",
                        help="LUNA16 annotations_excluded.csv for the FROC (default: that file in the data "
                             "root, when it is there)")
    return parser


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not positive")
    return value


def run(args: argparse.Namespace) -> int:
    from p2ch_luna.diagnose import report

    paths = paths_from_args(args)
    if args.save_mask and args.output is None:
        raise UsageError("--save-mask needs --output DIR")
    if args.output is not None and args.output.exists() and not args.output.is_dir():
        raise UsageError(f"--output {args.output} exists and is not a folder")
    selection = select_series(args, paths)
    info = distributed_info_from_env()
    device = resolve_device(args.device, info)
    warn_if_emulated(args.amp, device)
    default_batch = CUDA_SEGMENTATION_BATCH if device.type == "cuda" else CPU_SEGMENTATION_BATCH
    config = DiagnoseConfig(
        segmentation_threshold=args.segmentation_threshold, erosion_iterations=args.erosion_iterations,
        grouping=args.grouping, flips=args.flips,
        nodule_threshold=args.nodule_threshold, malignancy_threshold=args.malignancy_threshold,
        batch_size=args.batch_size or default_batch, amp=args.amp,
        lung_margin_mm=args.lung_margin_mm,
    )
    models = load_models(paths, args.segmentation_path, args.classification_path, args.malignancy_path, device)
    truth = read_truth(paths.data_root, args.annotations_excluded)
    started = time.perf_counter()
    with process_group(info):
        mine = shard(selection, info.rank, info.world_size)
        results = diagnose_series(mine, models, config, device, figures=args.output is not None,
                                  save_mask=args.save_mask, prefetch=args.prefetch, show_progress=info.is_main)
        gathered = gather_to_main(results, info)
    if gathered is None:
        return 0
    results = merge_shards(gathered, [uid for uid, _ in selection])
    scored = [uid for uid, _ in selection if uid] or [
        r.series_uid for r in results if truth is not None and truth.has_series(r.series_uid)]
    scores = report.score(results, truth, scored, config)
    summary = report.Summary(config=config, models=models.describe(), device=str(device),
                             world_size=info.world_size, wall_s=time.perf_counter() - started)
    print(report.format_report(results, scores, config, summary))
    if args.output is not None:
        report.write_outputs(args.output, results, scores, config, summary)
        log.info("wrote the report to %s", args.output)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
