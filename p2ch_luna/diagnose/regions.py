"""Statistics of labelled regions computed over their voxels only.

``scipy.ndimage.center_of_mass`` and ``maximum`` with ``labels`` visit every
voxel of the volume (``maximum`` even sorts them all); diagnosis has a few
thousand small regions in a box of millions of voxels, so these take the
labelled voxels' coordinates (``np.nonzero``) and work on those alone.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

# In every function, ``voxel_labels[k]`` is the label (1..count, each present) of the
# voxel at ``coordinates[axis][k]``: ``labels[coordinates]`` for ``coordinates = np.nonzero(labels)``.


def label_means(voxel_labels: np.ndarray, coordinates: tuple[np.ndarray, ...], count: int,
                weights: np.ndarray | None = None) -> np.ndarray:
    """(Weighted) mean coordinates ``(count, ndim)`` of labels 1..count: ``ndimage.center_of_mass``."""
    totals = np.bincount(voxel_labels, weights=weights, minlength=count + 1)[1:]
    sums = [np.bincount(voxel_labels, weights=axis if weights is None else axis * weights,
                        minlength=count + 1)[1:] for axis in coordinates]
    return np.stack(sums, axis=1) / totals[:, None]


def label_maxima(voxel_labels: np.ndarray, values: np.ndarray, count: int) -> np.ndarray:
    """Largest of ``values`` (one per voxel) for each label 1..count: ``ndimage.maximum``."""
    maxima = np.full(count + 1, -np.inf)
    np.maximum.at(maxima, voxel_labels, values.astype(np.float64))
    return maxima[1:]


def one_voxel_each(voxel_labels: np.ndarray, count: int) -> np.ndarray:
    """Position (into ``voxel_labels``) of one voxel of each label 1..count (which one is unspecified)."""
    positions = np.empty(count + 1, dtype=np.int64)
    positions[voxel_labels] = np.arange(len(voxel_labels))
    return positions[1:]


def touching_labels(coordinates: tuple[np.ndarray, ...]) -> tuple[np.ndarray, int]:
    """Labels (1..count) of the groups of touching voxels (26-connected in 3-D) among the given ones, and count.

    ``ndimage.label(mask, structure=np.ones((3,) * ndim))`` read at ``np.nonzero(mask)``, without its
    labelled copy of the whole array: for a few thousand voxels in a box of millions. With the
    coordinates in raster order, the labels are numbered as scipy numbers them (by first voxel).
    """
    points = np.stack(coordinates, axis=1) if len(coordinates) else np.empty((0, 0))
    if len(points) == 0:
        return np.empty(0, dtype=np.int64), 0
    pairs = cKDTree(points).query_pairs(r=1.0, p=np.inf, output_type="ndarray")  # neighbours: 1 step per axis
    graph = sparse.coo_matrix((np.ones(len(pairs), dtype=bool), (pairs[:, 0], pairs[:, 1])),
                              shape=(len(points), len(points)))
    count, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64) + 1, int(count)
