"""Step 3 of diagnosis: the segmentation mask, restricted to the lungs, grouped into candidates.

By default one candidate per distance-transform peak of the dense segmented tissue, with copies of
large ones at the lungs' edge moved towards it (``peaks``); or the book's eroded connected components
with their HU-weighted centre of mass (``components``). After classification :func:`keep_strongest`
keeps one detection per blob.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from p2ch_luna.diagnose import distance, regions
from p2ch_luna.diagnose.lungs import mask_bounding_box
from p2ch_luna.io.ct import HU_MAX, HU_MIN, Ct

log = logging.getLogger(__name__)

GROUPINGS = ("peaks", "components")
HU_WEIGHT_OFFSET = HU_MIN - 1
"""Centre of mass weights are HU - this (>= 1 after clipping), as in the book."""
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
MIN_CANDIDATE_DIAMETER_MM = 2.8
"""Diagnosis' default ``min_diameter_mm``: LUNA16 counts nodules of 3 mm and more, and the estimate moves
in voxel steps, so a little below 3 mm (measured on real CTs with implanted small nodules:
docs/benchmarks.md, 'Narrow candidates')."""
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
SHELL_SCALE = 1.5
"""Peak grouping, ``max_shell_fill``: the shell around a peak lies at this many times its depth."""
SHELL_POINTS = 256
"""... sampled at this many points, spread evenly over the sphere (a Fibonacci lattice)."""

CANDIDATE_COLUMNS = [
    "series_uid", "center_x", "center_y", "center_z", "index", "row", "col",
    "voxel_count", "diameter_mm", "nodule_probability", "malignancy_probability",
]


def group_candidates(hu: np.ndarray, nodule_mask: np.ndarray, region: np.ndarray, ct: Ct,
                     erosion_iterations: int, grouping: str = "peaks", workers: int = 1,
                     max_shell_fill: float | None = None, min_diameter_mm: float = 0.0) -> pd.DataFrame:
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
    the peaks' distances. With ``max_shell_fill``, peaks whose :func:`shell_fill`
    exceeds it are dropped: tubes (vessels) rather than blobs. Candidates narrower than
    ``min_diameter_mm`` (their peak's or component's diameter) are dropped.
    """
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}")
    restricted = nodule_mask & region
    box = mask_bounding_box(restricted, (1, 1, 1))  # so no blob touches a face of the box
    if box is None:
        return _empty_candidates()
    restricted = restricted[box]
    if grouping == "peaks":
        centers, voxel_count, diameters = _distance_peaks(hu[box], restricted, ct.geometry.spacing_irc, workers,
                                                          max_shell_fill)
    else:
        centers, voxel_count, diameters = _component_centres(hu[box], restricted, ct, erosion_iterations)
    if len(centers) == 0:
        return _empty_candidates()
    centers += [s.start for s in box]
    nearest = np.rint(centers).astype(np.int64)
    inside = region[tuple(nearest.T)]
    if not inside.all():
        log.debug("%s: %d candidate centre(s) outside the lungs dropped", ct.series_uid, int((~inside).sum()))
    inside &= diameters >= min_diameter_mm
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


def _distance_peaks(hu: np.ndarray, mask: np.ndarray, spacing_irc: np.ndarray, workers: int,
                    max_shell_fill: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres (voxel), voxel counts and diameters (mm) of the distance-transform peaks of the mask's blobs
    (those whose shell fill is at most ``max_shell_fill``, when given)."""
    dense = blob_tissue(hu, mask, spacing_irc)
    box = mask_bounding_box(dense, (1, 1, 1))
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
    radii = regions.label_maxima(labels, depth.flat[peaks], count)
    if max_shell_fill is not None:
        blob_like = shell_fill(dense, centers, radii, spacing) <= max_shell_fill
        centers, radii = centers[blob_like], radii[blob_like]
    centers += [s.start for s in box]
    diameters = 2.0 * radii
    voxel_count = np.rint(np.pi / 6.0 * diameters**3 / float(np.prod(spacing))).astype(np.int64)
    return centers, voxel_count, diameters


def shell_directions(count: int = SHELL_POINTS) -> np.ndarray:
    """``count`` unit vectors (index, row, col) spread evenly over the sphere (a Fibonacci lattice)."""
    k = np.arange(count) + 0.5
    polar = np.arccos(1.0 - 2.0 * k / count)
    azimuth = np.pi * (1.0 + 5.0**0.5) * k
    return np.stack([np.cos(polar), np.sin(polar) * np.cos(azimuth), np.sin(polar) * np.sin(azimuth)], axis=1)


def shell_fill(tissue: np.ndarray, centers_irc: np.ndarray, radii_mm: np.ndarray,
               spacing_irc: Sequence[float]) -> np.ndarray:
    """Per peak, the fraction of a sphere around it, ``SHELL_SCALE`` times its depth across, lying in ``tissue``.

    A blob of radius r (a nodule, alone or touching thinner vessels or the lungs' edge) lies wholly
    inside the sphere of radius 1.5 r around its centre: the fill is near 0. Along a tube of radius r
    (a vessel, whose depth ridge gives a peak every few mm) the sphere's two caps within r of the axis
    lie in it: 0.25 for a straight tube, more where it branches. The fills measured on real and
    synthetic CTs, and why the test is off by default: docs/benchmarks.md, "the shell-fill test".
    Points outside the array count as empty.
    """
    spacing = np.asarray(spacing_irc, dtype=np.float64)
    directions = shell_directions() / spacing  # voxels per mm along each direction
    shape = np.asarray(tissue.shape)
    fills = np.empty(len(centers_irc))
    for row, (center, radius) in enumerate(zip(np.asarray(centers_irc, np.float64), radii_mm)):
        points = np.rint(center + SHELL_SCALE * float(radius) * directions).astype(np.int64)
        inside = np.all((points >= 0) & (points < shape), axis=1)
        fills[row] = tissue[tuple(points[inside].T)].sum() / len(points)
    return fills


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
    # all would span the lungs (two float32 copies of them: hundreds of MB on a large CT).
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
