"""Distances inside binary masks, in millimetres: pure functions over NumPy arrays.

``depth_mm`` gives each voxel of a mask its distance to the nearest voxel
outside it, the values of scipy's Euclidean distance transform. scipy computes
a feature transform over the whole array, so its cost follows the array's size.
Diagnosis asks for the depth of thin dense tissue (vessels, nodules) inside the
box of both lungs, a few percent of that box: there a k-d tree over the outside
voxels that touch the mask finds each inside voxel's nearest outside voxel, at
a cost that follows the mask's size and spreads over threads.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike
from scipy import ndimage
from scipy.spatial import cKDTree

SPARSE_FRACTION = 0.1
"""Masks filling at most this fraction of their array are measured with the k-d tree.

The tree costs several times as much per inside voxel as the feature transform
per voxel of the array, so around a tenth the two cost about the same on one
thread; the tree's search spreads over threads, the feature transform does not
(``python -m bench.bench_distance``).
"""


def depth_mm(mask: np.ndarray, spacing: np.ndarray, workers: int = 1,
             dtype: DTypeLike = np.float64) -> np.ndarray:
    """Distance (mm) from each voxel of ``mask`` to the nearest voxel outside it; 0 outside.

    The values of ``ndimage.distance_transform_edt(mask, sampling=spacing)``: as
    in scipy, voxels beyond the array's edge do not count as outside. They are
    computed in float64 and returned as ``dtype`` (float32 halves the array of
    a large mask's box). Sparse masks (``SPARSE_FRACTION``) go through
    :func:`depth_from_boundary` on ``workers`` threads, the rest through
    :func:`depth_from_feature_transform`.
    """
    inside = np.count_nonzero(mask)
    if inside == 0:
        return np.zeros(mask.shape, dtype=dtype)
    if inside <= SPARSE_FRACTION * mask.size:
        return depth_from_boundary(mask, spacing, workers, dtype)
    return depth_from_feature_transform(mask, spacing, dtype)


def depth_from_feature_transform(mask: np.ndarray, spacing: np.ndarray, dtype: DTypeLike = np.float64) -> np.ndarray:
    """:func:`depth_mm` from scipy's feature transform: its distances bit for bit.

    Computed one axis at a time from the nearest outside voxel's indices instead
    of through scipy's (3, I, R, C) float64 temporary, which is faster and holds less memory
    (``python -m bench.bench_distance``).
    """
    nearest = ndimage.distance_transform_edt(mask, sampling=spacing, return_distances=False, return_indices=True)
    squared = np.zeros(mask.shape, dtype=np.float64)
    for axis, step in enumerate(np.asarray(spacing, dtype=np.float64)):
        along = [1] * mask.ndim
        along[axis] = -1
        _add_squared_mm(squared, nearest[axis] - np.arange(mask.shape[axis], dtype=np.int32).reshape(along), step)
    return np.sqrt(squared, out=squared).astype(dtype, copy=False)


def depth_from_boundary(mask: np.ndarray, spacing: np.ndarray, workers: int = 1,
                        dtype: DTypeLike = np.float64) -> np.ndarray:
    """:func:`depth_mm` from a k-d tree of the outside voxels that touch ``mask`` (6-connected).

    The nearest outside voxel always touches the mask: one step from it towards
    the inside voxel, along any axis where they differ, is nearer, so it is not
    outside. The distance is computed from the two voxels' indices as
    :func:`depth_from_feature_transform` does, so it is scipy's bit for bit
    except where two outside voxels lie at the same distance (within rounding):
    there the two may differ in the last bit.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    inside = np.flatnonzero(mask)
    depth = np.zeros(mask.shape, dtype=dtype)
    if inside.size == 0:
        return depth
    outside = np.flatnonzero(outer_boundary(mask))
    if outside.size == 0:  # nothing outside: scipy's convention for a full mask
        return depth_from_feature_transform(mask, spacing, dtype)
    inside_irc = np.stack(np.unravel_index(inside, mask.shape), axis=1)
    outside_irc = np.stack(np.unravel_index(outside, mask.shape), axis=1)
    tree = cKDTree(outside_irc * spacing, balanced_tree=False, compact_nodes=False)
    _, nearest = tree.query(inside_irc * spacing, workers=workers)
    offsets = inside_irc - outside_irc[nearest]
    squared = np.zeros(inside.size, dtype=np.float64)
    for axis, step in enumerate(spacing):
        _add_squared_mm(squared, offsets[:, axis], step)
    depth.flat[inside] = np.sqrt(squared)
    return depth


def outer_boundary(mask: np.ndarray) -> np.ndarray:
    """Voxels outside ``mask`` with a face neighbour inside it."""
    grown = mask.copy()
    for axis in range(mask.ndim):
        lower = [slice(None)] * mask.ndim
        upper = [slice(None)] * mask.ndim
        lower[axis] = slice(None, -1)
        upper[axis] = slice(1, None)
        grown[tuple(lower)] |= mask[tuple(upper)]
        grown[tuple(upper)] |= mask[tuple(lower)]
    grown &= ~mask
    return grown


def _add_squared_mm(total: np.ndarray, offset: np.ndarray, step: float) -> None:
    """``total += (offset * step) ** 2`` in float64, in the order scipy computes it."""
    millimetres = offset.astype(np.float64)
    millimetres *= step
    millimetres *= millimetres
    total += millimetres
