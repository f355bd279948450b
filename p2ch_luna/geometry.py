"""Pure world (x, y, z mm) <-> voxel (index, row, col) conversions.

Arrays are indexed ``(index, row, col)``, i.e. ``(z, y, x)`` as
``SimpleITK.GetArrayFromImage`` returns them, while origin and spacing are in
``xyz`` order as in the image header. One affine per CT:

    xyz = origin + direction @ (spacing * [col, row, index])

The full direction matrix is honoured (flipped and permuted axes included); the
book's ``(xyz - origin) @ inv(direction)`` is only right for symmetric matrices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike


def _as_points(points: ArrayLike) -> tuple[np.ndarray, bool]:
    array = np.asarray(points, dtype=np.float64)
    single = array.ndim == 1
    array = np.atleast_2d(array)
    if array.shape[-1] != 3:
        raise ValueError(f"points must have 3 coordinates, got shape {array.shape}")
    return array, single


def irc_to_xyz(irc: ArrayLike, origin_xyz: ArrayLike, spacing_xyz: ArrayLike,
               direction: ArrayLike) -> np.ndarray:
    """Voxel ``(index, row, col)`` (N×3 or 3, may be fractional) to world ``xyz`` mm."""
    points, single = _as_points(irc)
    cri = points[:, ::-1] * np.asarray(spacing_xyz, dtype=np.float64)
    xyz = cri @ np.asarray(direction, dtype=np.float64).T + np.asarray(origin_xyz, dtype=np.float64)
    return xyz[0] if single else xyz


def xyz_to_irc_continuous(xyz: ArrayLike, origin_xyz: ArrayLike, spacing_xyz: ArrayLike,
                          direction: ArrayLike) -> np.ndarray:
    """World ``xyz`` mm (N×3 or 3) to fractional voxel ``(index, row, col)``."""
    points, single = _as_points(xyz)
    offset = points - np.asarray(origin_xyz, dtype=np.float64)
    # Solve direction @ v = offset for every point (exact for any invertible matrix).
    cri = np.linalg.solve(np.asarray(direction, dtype=np.float64), offset.T).T
    cri = cri / np.asarray(spacing_xyz, dtype=np.float64)
    irc = cri[:, ::-1]
    return irc[0] if single else irc


def xyz_to_irc(xyz: ArrayLike, origin_xyz: ArrayLike, spacing_xyz: ArrayLike,
               direction: ArrayLike) -> np.ndarray:
    """World ``xyz`` mm to the nearest voxel ``(index, row, col)`` as int64."""
    return np.rint(xyz_to_irc_continuous(xyz, origin_xyz, spacing_xyz, direction)).astype(np.int64)


@dataclass(frozen=True, eq=False)
class Geometry:
    """Origin, spacing and direction of one CT, plus its array shape ``(I, R, C)``."""

    origin_xyz: np.ndarray
    spacing_xyz: np.ndarray
    direction: np.ndarray
    shape_irc: tuple[int, int, int]
    affine: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        origin = np.asarray(self.origin_xyz, dtype=np.float64).reshape(3)
        spacing = np.asarray(self.spacing_xyz, dtype=np.float64).reshape(3)
        direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        for name, value in (("origin_xyz", origin), ("spacing_xyz", spacing), ("direction", direction)):
            value.setflags(write=False)
            object.__setattr__(self, name, value)
        object.__setattr__(self, "shape_irc", tuple(int(n) for n in self.shape_irc))
        affine = np.eye(4)
        affine[:3, :3] = direction * spacing
        affine[:3, 3] = origin
        affine.setflags(write=False)
        object.__setattr__(self, "affine", affine)

    def xyz_to_irc(self, xyz: ArrayLike) -> np.ndarray:
        return xyz_to_irc(xyz, self.origin_xyz, self.spacing_xyz, self.direction)

    def xyz_to_irc_continuous(self, xyz: ArrayLike) -> np.ndarray:
        return xyz_to_irc_continuous(xyz, self.origin_xyz, self.spacing_xyz, self.direction)

    def irc_to_xyz(self, irc: ArrayLike) -> np.ndarray:
        return irc_to_xyz(irc, self.origin_xyz, self.spacing_xyz, self.direction)

    def contains_irc(self, irc: ArrayLike) -> np.ndarray:
        """True for each (rounded) voxel index that lies inside the array."""
        points, single = _as_points(irc)
        inside = np.all((points >= 0) & (points < np.asarray(self.shape_irc)), axis=1)
        return inside[0] if single else inside

    @property
    def spacing_irc(self) -> np.ndarray:
        return self.spacing_xyz[::-1]


def chunk_bounds(center_irc: Sequence[float], width_irc: Sequence[int],
                 shape_irc: Sequence[int]) -> list[tuple[int, int]]:
    """Start/end of a ``width_irc`` window around ``center_irc`` per axis, book-style.

    The window is centred on the voxel, and shifted to lie inside the volume
    when it would cross a border (the book's chapter 10 behaviour). Where the
    volume is narrower than the window the bounds cover the whole axis; callers
    pad the remainder.
    """
    bounds = []
    for center, width, size in zip(center_irc, width_irc, shape_irc):
        # Round half up (not Python's half-to-even) so odd widths stay centred on the voxel.
        start = math.floor(float(center) - width / 2 + 0.5)
        end = start + int(width)
        if start < 0:
            start, end = 0, int(width)
        if end > size:
            start, end = max(int(size) - int(width), 0), int(size)
        bounds.append((start, end))
    return bounds
