"""A mask shaped as a nodule mask is (mostly zeros, a few small balls), for the mask files' tests and bench."""

from __future__ import annotations

import numpy as np


def sample_nodule_mask(shape: tuple[int, int, int]) -> np.ndarray:
    """A uint8 ``(I, R, C)`` mask of ``shape`` (rows and columns of at least 350) with two balls of radius 6 and 4."""
    grid = np.indices(shape)
    mask = np.zeros(shape, dtype=np.uint8)
    for centre, radius in (((shape[0] // 2, 200, 180), 6.0), ((shape[0] // 3, 300, 340), 4.0)):
        squared = sum((axis - c) ** 2 for axis, c in zip(grid, centre))
        mask[squared <= radius ** 2] = 1
    return mask
