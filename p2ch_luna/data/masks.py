"""Nodule masks from annotations: the labels of the segmentation model.

Two ways to turn an annotation (world centre, diameter) into voxels:

- ``"grow"`` (the book's chapter 13 ``buildAnnotationMask``): from the centre
  voxel, grow a radius along each axis while the voxels at +radius and -radius
  are both denser than ``threshold_hu``; the nodule's box is the centre +- those
  radii. The mask is the union of the boxes, restricted to voxels denser than
  ``threshold_hu`` (so the surrounding lung, around -850 HU, is excluded).
- ``"sphere"``: every voxel whose centre lies within ``diameter_mm / 2`` of the
  annotation centre (in millimetres, through the CT's affine).

Unlike the book, growth stops at the volume's border instead of wrapping round
through negative indices. Masks are cached bit-packed (:func:`pack_mask`)
through ``ChunkCache.array`` under a name holding the series, mode, threshold,
:data:`MASK_VERSION` and a hash of the annotations, so a change to any of them
builds a new mask; each series' positive-slice index is cached beside it.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from p2ch_luna.columns import CENTER_COLUMNS
from p2ch_luna.geometry import Geometry
from p2ch_luna.io.ct import Ct

if TYPE_CHECKING:
    from p2ch_luna.data.cache import ChunkCache

log = logging.getLogger(__name__)

MASK_VERSION = 1
"""Bump when the mask builder changes: cached masks under the old name are then ignored."""
MASK_THRESHOLD_HU = -700
"""Voxels denser than this belong to a nodule (the book's ``threshold_hu``)."""
INITIAL_RADIUS = 2
"""The book starts growing each box from this radius (voxels)."""
MASK_MODES = ("grow", "sphere")


def annotation_rows(annotations: pd.DataFrame, series_uid: str | None = None) -> pd.DataFrame:
    """Annotated nodules of one series from an annotations frame or a candidate table.

    Candidate-table rows are kept only where ``source == "annotation"``; a
    ``series_uid`` column, when present, is filtered to ``series_uid``.
    """
    rows = annotations
    if "source" in rows.columns:
        rows = rows[rows["source"] == "annotation"]
    if series_uid is not None and "series_uid" in rows.columns:
        rows = rows[rows["series_uid"] == series_uid]
    return rows


def grow_radius(line: np.ndarray, center: int, threshold_hu: float) -> int:
    """The book's radius along one axis: the first radius at which either side is <= threshold.

    ``line`` is the volume's voxels along the axis through the centre. When the
    border is reached first, the radius is the largest one inside the volume.
    """
    largest = min(center, line.shape[0] - 1 - center)
    radii = np.arange(INITIAL_RADIUS, largest + 1)
    dense = (line[center + radii] > threshold_hu) & (line[center - radii] > threshold_hu)
    stops = np.flatnonzero(~dense)
    if stops.size:
        return int(radii[stops[0]])
    return max(largest, 0)


def grown_box_mask(hu: np.ndarray, centers_irc: np.ndarray, threshold_hu: float = MASK_THRESHOLD_HU) -> np.ndarray:
    """Boolean ``(I, R, C)`` mask: union of the grown boxes, voxels above ``threshold_hu``."""
    boxes = np.zeros(hu.shape, dtype=bool)
    for center in np.asarray(centers_irc, dtype=np.int64).reshape(-1, 3):
        index, row, col = (int(v) for v in center)
        lines = (hu[:, row, col], hu[index, :, col], hu[index, row, :])
        radii = [grow_radius(line, int(c), threshold_hu) for line, c in zip(lines, center)]
        boxes[tuple(slice(max(c - r, 0), c + r + 1) for c, r in zip((index, row, col), radii))] = True
    return boxes & (hu > threshold_hu)


def sphere_mask(geometry: Geometry, centers_xyz: np.ndarray, diameters_mm: np.ndarray) -> np.ndarray:
    """Boolean ``(I, R, C)`` mask of the voxels within ``diameter / 2`` mm of each centre."""
    mask = np.zeros(geometry.shape_irc, dtype=bool)
    shape = np.asarray(geometry.shape_irc)
    for center_xyz, diameter in zip(np.asarray(centers_xyz, dtype=np.float64).reshape(-1, 3),
                                    np.asarray(diameters_mm, dtype=np.float64).reshape(-1)):
        radius = diameter / 2
        center_irc = geometry.xyz_to_irc_continuous(center_xyz)
        # The direction matrix is orthonormal, so radius / spacing bounds the sphere on each array axis.
        reach = np.ceil(radius / geometry.spacing_irc).astype(np.int64) + 1
        low = np.clip(np.floor(center_irc).astype(np.int64) - reach, 0, shape)
        high = np.clip(np.ceil(center_irc).astype(np.int64) + reach + 1, 0, shape)
        if np.any(high <= low):
            continue
        grid = np.stack(np.meshgrid(*(np.arange(a, b) for a, b in zip(low, high)), indexing="ij"), axis=-1)
        distance = np.linalg.norm(geometry.irc_to_xyz(grid.reshape(-1, 3)) - center_xyz, axis=1)
        window = tuple(slice(a, b) for a, b in zip(low, high))
        mask[window] |= (distance <= radius).reshape(grid.shape[:3])
    return mask


def build_nodule_mask(hu: np.ndarray, geometry: Geometry, annotations: pd.DataFrame, mode: str = "grow",
                      threshold_hu: float = MASK_THRESHOLD_HU, series_uid: str = "") -> np.ndarray:
    """Boolean ``(I, R, C)`` nodule mask of one CT from its annotation rows.

    ``annotations`` holds ``center_x/y/z`` and ``diameter_mm`` (already limited to
    this series); centres outside the CT are skipped with a warning.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"mask mode must be one of {MASK_MODES}, not {mode!r}")
    if hu.shape != tuple(geometry.shape_irc):
        raise ValueError(f"HU shape {hu.shape} differs from the geometry's {geometry.shape_irc}")
    centers_xyz = annotations[list(CENTER_COLUMNS)].to_numpy(dtype=np.float64).reshape(-1, 3)
    diameters = annotations["diameter_mm"].to_numpy(dtype=np.float64).reshape(-1)
    centers_irc = geometry.xyz_to_irc(centers_xyz).reshape(-1, 3)
    inside = geometry.contains_irc(centers_irc).reshape(-1)
    if not inside.all():
        log.warning("series %s: %d annotation centre(s) outside the CT are ignored",
                    series_uid or "?", int((~inside).sum()))
    if mode == "sphere":
        return sphere_mask(geometry, centers_xyz[inside], diameters[inside])
    return grown_box_mask(hu, centers_irc[inside], threshold_hu)


def ct_nodule_mask(ct: Ct, annotations: pd.DataFrame, mode: str = "grow",
                   threshold_hu: float = MASK_THRESHOLD_HU) -> np.ndarray:
    """Nodule mask of ``ct`` from an annotations frame or candidate table (any series)."""
    rows = annotation_rows(annotations, ct.series_uid)
    return build_nodule_mask(ct.hu, ct.geometry, rows, mode, threshold_hu, ct.series_uid)


def mask_cache_name(series_uid: str, annotations: pd.DataFrame, mode: str, threshold_hu: float) -> str:
    """Cache name of a mask: series, mode, threshold, builder version and an annotation hash."""
    values = annotations[[*CENTER_COLUMNS, "diameter_mm"]].to_numpy(dtype=np.float64)
    digest = hashlib.sha1(np.ascontiguousarray(np.round(values, 4)).tobytes()).hexdigest()[:12]
    return f"mask-v{MASK_VERSION}-{mode}-t{threshold_hu:g}-{series_uid}-{digest}"


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """A boolean ``(I, R, C)`` mask as ``uint8`` bits along the columns: ``(I, R, ceil(C / 8))``."""
    return np.packbits(np.asarray(mask, dtype=bool), axis=-1)


def unpack_mask(packed: np.ndarray, cols: int) -> np.ndarray:
    """The boolean mask (or mask slice) of :func:`pack_mask` output with ``cols`` columns."""
    return np.unpackbits(np.asarray(packed), axis=-1, count=cols).astype(bool)


def positive_slices(mask: np.ndarray) -> np.ndarray:
    """Indices of the slices holding at least one mask voxel (works on packed masks too)."""
    return np.flatnonzero(np.asarray(mask).reshape(mask.shape[0], -1).any(axis=1))


def cached_packed_mask(cache: ChunkCache, series_uid: str, annotations: pd.DataFrame, mode: str = "grow",
                       threshold_hu: float = MASK_THRESHOLD_HU) -> np.ndarray:
    """The :func:`pack_mask` nodule mask of a cached series, built once, then read from the cache.

    Packed, a 512×512×300 mask takes 10 MB of cache instead of 79 MB.
    """
    rows = annotation_rows(annotations, series_uid)

    def build() -> np.ndarray:
        mask = build_nodule_mask(np.asarray(cache.volume(series_uid)), cache.geometry(series_uid), rows,
                                 mode, threshold_hu, series_uid)
        return pack_mask(mask)

    return cache.array(mask_cache_name(series_uid, rows, mode, threshold_hu) + "-packed", build)


def cached_positive_slices(cache: ChunkCache, series_uid: str, annotations: pd.DataFrame, mode: str = "grow",
                           threshold_hu: float = MASK_THRESHOLD_HU) -> np.ndarray:
    """:func:`positive_slices` of the cached mask, itself cached (a few bytes per series)."""
    rows = annotation_rows(annotations, series_uid)
    name = mask_cache_name(series_uid, rows, mode, threshold_hu) + "-positive-slices"
    return cache.array(name, lambda: positive_slices(cached_packed_mask(cache, series_uid, rows, mode, threshold_hu)))


def cached_nodule_mask(cache: ChunkCache, series_uid: str, annotations: pd.DataFrame, mode: str = "grow",
                       threshold_hu: float = MASK_THRESHOLD_HU) -> np.ndarray:
    """The boolean ``(I, R, C)`` nodule mask of a cached series (unpacked from the cache)."""
    packed = cached_packed_mask(cache, series_uid, annotations, mode, threshold_hu)
    return unpack_mask(packed, cache.geometry(series_uid).shape_irc[2])
