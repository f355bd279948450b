"""A lung mask from Hounsfield units and connected components, with no learning.

Diagnosis keeps every step inside the lungs: the book's pipeline, run on a
clinical CT, reports most of its "nodules" outside the body at the edge of the
scanner's field of view. The mask is built on an in-plane downsampled volume
(about 1 mm voxels) so it takes a second or two on a CPU:

1. body: the largest connected component above ``BODY_HU`` after filling its
   holes slice by slice (air outside the body, the table and the region
   outside the field of view, -2000/-3024 HU, are left out);
2. air inside the body below ``LUNG_HU``, vessels filled slice by slice; its
   largest component (lungs, usually joined through the airways) and any other
   at least ``LUNG_FRACTION`` of its size; components touching the in-plane
   border are dropped;
3. the left and right lung are split by eroding (a distance transform) until
   two large cores appear, every voxel going to its nearest core; the trachea
   and main bronchi, small cross-sections, are cut off slice by slice;
4. each lung is closed (``CLOSING_MM``) so juxtapleural nodules lie inside it,
   and the union is dilated by a margin.

Lengths are for an adult chest; a field of view narrower than
``ADULT_FIELD_OF_VIEW_MM`` (small synthetic test CTs, whose anatomy is scaled
to the image) scales them down in proportion.
"""

from __future__ import annotations

import concurrent.futures
import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from p2ch_luna.diagnose.distance import depth_mm

log = logging.getLogger(__name__)

BODY_HU = -500
"""Tissue denser than this belongs to the body (fat is about -100 HU)."""
LUNG_HU = -400
"""Air and lung parenchyma (-1000..-700 HU) lie below this."""
TARGET_SPACING_MM = 2.0
"""Spacing the mask is computed at: each axis is subsampled by whole steps towards it."""
LUNG_FRACTION = 0.2
"""Air components at least this fraction of the largest one count as lung."""
MIN_LUNG_ML = 1.0
"""Smallest air component (millilitres) considered at all."""
SPLIT_DEPTHS_MM = (3.0, 5.0, 7.0, 9.0, 12.0, 15.0)
"""Erosion depths tried, in order, to split the air into a left and a right lung."""
AIRWAY_MAX_AREA_MM2 = 400.0
"""Slice cross-sections smaller than this (trachea about 250 mm²) are cut off as airway."""
CLOSING_MM = 15.0
"""Closing radius per lung: notches of juxtapleural nodules up to ~30 mm are filled (10 mm lost half of a
24 mm one on a real CT; see docs/benchmarks.md, implanted nodules)."""
DEFAULT_MARGIN_MM = 3.0
"""Dilation of the final mask, so findings on the pleura stay inside."""

ADULT_FIELD_OF_VIEW_MM = 250.0
"""Narrowest in-plane field of view for which the lengths above are used unscaled."""

_SLICE_CROSS = np.zeros((3, 3, 3), dtype=bool)
_SLICE_CROSS[1] = ndimage.generate_binary_structure(2, 1)
"""4-connectivity within each slice and none across slices (slice-by-slice operations)."""


@dataclass(frozen=True, eq=False)
class Lungs:
    """The lungs of one CT, full resolution ``(I, R, C)``.

    ``labels`` numbers each lung (1, 2, ...) after closing, before the margin;
    ``mask`` is the dilated union that diagnosis stays inside.
    """

    labels: np.ndarray
    mask: np.ndarray
    spacing_irc: tuple[float, float, float]

    @property
    def count(self) -> int:
        return int(self.labels.max(initial=0))

    @property
    def volume_ml(self) -> float:
        """Volume of the lungs themselves (``labels``), in millilitres."""
        return float(np.count_nonzero(self.labels)) * float(np.prod(self.spacing_irc)) / 1000.0

    def bounding_box(self, pad: tuple[int, int, int] = (0, 0, 0)) -> tuple[slice, slice, slice] | None:
        """Slices around ``mask`` padded by ``pad`` voxels per axis; None when the mask is empty."""
        return mask_bounding_box(self.mask, pad)


def mask_bounding_box(mask: np.ndarray, pad: tuple[int, int, int] = (0, 0, 0)) -> tuple[slice, slice, slice] | None:
    """Bounding box of a boolean mask padded by ``pad`` (clamped to the array); None when empty."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        if present.size == 0:
            return None
        start = max(int(present[0]) - pad[axis], 0)
        end = min(int(present[-1]) + 1 + pad[axis], mask.shape[axis])
        box.append(slice(start, end))
    return tuple(box)


def _not_hu_hint(hu: np.ndarray) -> str:
    """A hint for the no-lungs warning when the values cannot be HU: a chest CT always holds air (-1000)."""
    lowest, highest = (int(v) for v in np.percentile(hu, [0.1, 99.9])) if hu.size else (0, 0)
    if lowest < LUNG_HU:
        return ""
    return (f"; its values run from {lowest} to {highest} and never reach air (-1000 HU): is it in HU "
            "(rescale slope and intercept applied)?")


def find_lungs(hu: np.ndarray, spacing_irc: tuple[float, float, float],
               margin_mm: float = DEFAULT_MARGIN_MM) -> Lungs:
    """Find the lungs of a CT given its HU ``(I, R, C)`` and voxel spacing (mm, ``irc`` order)."""
    spacing = np.asarray(spacing_irc, dtype=np.float64)
    field_of_view = min(hu.shape[1] * spacing[1], hu.shape[2] * spacing[2])
    scale = min(1.0, field_of_view / ADULT_FIELD_OF_VIEW_MM)
    steps = tuple(max(1, int(TARGET_SPACING_MM * scale / value)) for value in spacing)
    small = np.asarray(hu[:: steps[0], :: steps[1], :: steps[2]])
    small_spacing = spacing * steps
    # Lengths in units of the (scaled) anatomy: the spacing the morphology sees is divided by ``scale``.
    small_spacing = small_spacing / scale
    voxel_ml = float(np.prod(small_spacing)) / 1000.0

    labels = _lung_labels(small, small_spacing, voxel_ml)
    mask = np.zeros(labels.shape, dtype=bool)
    if labels.max() == 0:
        log.warning("no lungs found (no large air region inside the body); the lung mask is empty%s",
                    _not_hu_hint(small))
    else:
        boxes = [(label, box) for label, box in enumerate(ndimage.find_objects(labels), start=1) if box is not None]
        # scipy's transforms release the GIL: the lungs close at once; they are written in label order.
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(boxes)) as pool:
            closings = list(pool.map(lambda item: _closed(labels, *item, small_spacing), boxes))
        closed = np.zeros_like(labels)
        for (label, _), (padded, lung) in zip(boxes, closings):
            region = closed[padded]
            region[lung & (region == 0)] = label
        labels = closed
        margin = tuple(int(np.ceil(margin_mm / value)) + 1 for value in small_spacing)
        box = mask_bounding_box(labels > 0, margin)
        mask[box] = _dilate(labels[box] > 0, small_spacing, margin_mm)
    return Lungs(labels=_upsample(labels, steps, hu.shape), mask=_upsample(mask, steps, hu.shape),
                 spacing_irc=tuple(float(v) for v in spacing))


def _lung_labels(hu: np.ndarray, spacing: np.ndarray, voxel_ml: float) -> np.ndarray:
    """Labelled lungs (before closing) of a (subsampled) volume."""
    body = _largest_component(fill_holes_in_slices(hu > BODY_HU))
    air = (hu < LUNG_HU) & body
    air_labels, _ = ndimage.label(air)
    sizes = np.bincount(air_labels.ravel())
    sizes[0] = 0
    sizes[_border_labels(air_labels)] = 0
    if sizes.max(initial=0) * voxel_ml < MIN_LUNG_ML:
        return np.zeros(hu.shape, dtype=np.int8)
    keep = sizes >= LUNG_FRACTION * sizes.max()
    air = keep[air_labels]
    box = mask_bounding_box(air, (1, 1, 1))
    air = fill_holes_in_slices(air[box])
    lungs = np.zeros(hu.shape, dtype=np.int8)
    lungs[box] = _keep_large(_cut_airways(_split_lungs(air, spacing), spacing))
    return lungs


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


def _border_labels(labels: np.ndarray) -> np.ndarray:
    """Labels touching the in-plane border (air around the patient, outside the field of view)."""
    edges = [labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]]
    return np.unique(np.concatenate([edge.ravel() for edge in edges]))


def _split_lungs(air: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Assign every air voxel to the nearest of the two largest cores found by erosion.

    Keeps the air as one label when no depth splits it into two cores of
    comparable size (one lung, or a partial scan).
    """
    depth = depth_mm(air, spacing)
    for split_depth in SPLIT_DEPTHS_MM:
        cores, count = ndimage.label(depth > split_depth)
        if count < 2:
            continue
        sizes = np.bincount(cores.ravel())
        sizes[0] = 0
        largest, second = np.argsort(sizes)[::-1][:2]
        if sizes[second] >= LUNG_FRACTION * sizes[largest]:
            nearest = ndimage.distance_transform_edt(cores == 0, sampling=spacing, return_distances=False,
                                                     return_indices=True)
            owner = cores[tuple(nearest)]
            lungs = np.zeros(air.shape, dtype=np.int8)
            lungs[air & (owner == largest)] = 1
            lungs[air & (owner == second)] = 2
            return lungs
    return air.astype(np.int8)


def _cut_airways(lungs: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Drop slice cross-sections smaller than ``AIRWAY_MAX_AREA_MM2`` (trachea, main bronchi)."""
    sections, _ = ndimage.label(lungs > 0, structure=_SLICE_CROSS)
    area = np.bincount(sections.ravel()) * spacing[1] * spacing[2]
    area[0] = np.inf
    return np.where(area[sections] < AIRWAY_MAX_AREA_MM2, 0, lungs).astype(np.int8)


def _keep_large(lungs: np.ndarray) -> np.ndarray:
    """Relabel the 3-D components; keep those at least ``LUNG_FRACTION`` of the largest."""
    components, count = ndimage.label(lungs > 0)
    if count == 0:
        return np.zeros(lungs.shape, dtype=np.int8)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    kept = [label for label in np.argsort(sizes)[::-1] if sizes[label] >= LUNG_FRACTION * sizes.max()]
    result = np.zeros(lungs.shape, dtype=np.int8)
    for new_label, label in enumerate(kept, start=1):
        result[components == label] = new_label
    return result


def _closed(labels: np.ndarray, label: int, box: tuple[slice, ...],
            spacing: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray]:
    """Lung ``label`` closed by ``CLOSING_MM``, as a mask over its box padded for the closing (returned too)."""
    pad = np.ceil(CLOSING_MM / spacing).astype(int) + 1
    padded = tuple(slice(max(s.start - p, 0), min(s.stop + p, n)) for s, p, n in zip(box, pad, labels.shape))
    lung = labels[padded] == label
    grown = _dilate(lung, spacing, CLOSING_MM)
    closed = depth_mm(grown, spacing) > CLOSING_MM
    return padded, fill_holes_in_slices(closed | lung)


def _dilate(mask: np.ndarray, spacing: np.ndarray, radius_mm: float) -> np.ndarray:
    if radius_mm <= 0 or not mask.any():
        return mask.copy()
    return depth_mm(~mask, spacing) <= radius_mm


def fill_holes_in_slices(mask: np.ndarray) -> np.ndarray:
    """``mask`` with the holes of each slice filled (4-connected background not reaching the slice's edge).

    ``ndimage.binary_fill_holes(mask, structure=_SLICE_CROSS)``, result for result,
    by one labelling of the background instead of a dilation repeated until it
    stops changing: about twice as fast.
    """
    background, count = ndimage.label(~mask, structure=_SLICE_CROSS)
    edges = [background[:, 0, :], background[:, -1, :], background[:, :, 0], background[:, :, -1]]
    outside = np.zeros(count + 1, dtype=bool)
    outside[np.concatenate([edge.ravel() for edge in edges])] = True
    outside[0] = False  # label 0 is the mask itself
    return ~outside[background]


def _upsample(small: np.ndarray, steps: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour upsampling by whole ``steps`` per axis, cropped to ``shape``."""
    full = small
    for axis, step in enumerate(steps):
        if step > 1:
            full = np.repeat(full, step, axis=axis)
    return np.ascontiguousarray(full[: shape[0], : shape[1], : shape[2]])
