"""Drawing primitives in a series' frame (its voxel grid, spacing and field of view): tubes, super-ellipses,
lung membership of points in millimetres, random directions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from p2ch_luna.synth.parameters import EDGE_MM


@dataclass
class Frame:
    """Canonical (identity-direction) voxel grid and its centred mm coordinates."""

    shape: tuple[int, int, int]
    spacing: np.ndarray  # (z, y, x) mm
    offset: np.ndarray  # mm of voxel (0, 0, 0)

    def to_mm(self, irc: np.ndarray) -> np.ndarray:
        return np.asarray(irc, dtype=np.float64) * self.spacing + self.offset

    def to_irc(self, mm: np.ndarray) -> np.ndarray:
        return (np.asarray(mm, dtype=np.float64) - self.offset) / self.spacing

    def axes_mm(self, lo: Sequence[int], hi: Sequence[int]) -> list[np.ndarray]:
        """Broadcastable mm coordinates of the box ``lo:hi`` along (z, y, x)."""
        axes = []
        for axis in range(3):
            values = (np.arange(lo[axis], hi[axis]) * self.spacing[axis] + self.offset[axis]).astype(np.float32)
            shape = [1, 1, 1]
            shape[axis] = -1
            axes.append(values.reshape(shape))
        return axes

    def box(self, lo_mm: np.ndarray, hi_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lo = np.floor(self.to_irc(lo_mm)).astype(int)
        hi = np.ceil(self.to_irc(hi_mm)).astype(int) + 1
        return np.clip(lo, 0, self.shape), np.clip(hi, 0, self.shape)


def superellipse(x: np.ndarray, y: np.ndarray, a: float, b: float, power: float = 2.0) -> np.ndarray:
    return np.abs(x / a) ** power + np.abs(y / b) ** power


def upsampling_matrix(n: int, cell: int) -> np.ndarray:
    """(n, m) Gaussian weights from a coarse grid of spacing ``cell`` with unit-variance output."""
    m = max(2, n // cell + 2)
    fine = (np.arange(n) + 0.5) / cell + 0.5
    weights = np.exp(-0.5 * ((fine[:, None] - np.arange(m)[None, :]) / 0.6) ** 2)
    weights /= np.sqrt((weights ** 2).sum(axis=1, keepdims=True))
    return weights.astype(np.float32)


def draw_tube(frame: Frame, target: np.ndarray, start: np.ndarray, end: np.ndarray,
               radius_start: float, radius_end: float) -> None:
    """Max-composite a tapering tube (line-segment distance field) into ``target``."""
    reach = max(radius_start, radius_end) + EDGE_MM
    lo, hi = frame.box(np.minimum(start, end) - reach, np.maximum(start, end) + reach)
    if np.any(hi <= lo):
        return
    z, y, x = frame.axes_mm(lo, hi)
    axis = (end - start).astype(np.float32)
    length2 = max(float(axis @ axis), 1e-6)
    dz, dy, dx = z - np.float32(start[0]), y - np.float32(start[1]), x - np.float32(start[2])
    t = unit_clip((dz * axis[0] + dy * axis[1] + dx * axis[2]) / length2)
    dist = np.sqrt((dz - t * axis[0]) ** 2 + (dy - t * axis[1]) ** 2 + (dx - t * axis[2]) ** 2)
    radius = radius_start + t * np.float32(radius_end - radius_start)
    occupancy = unit_clip((radius - dist) / EDGE_MM + 0.5)
    region = target[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    np.maximum(region, occupancy, out=region)


def unit_clip(values: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] in place (cheaper than np.clip on the many small arrays here)."""
    return np.minimum(np.maximum(values, 0, out=values), 1, out=values)


def in_lung(frame: Frame, lung: np.ndarray, mm: np.ndarray) -> np.ndarray:
    irc = np.rint(frame.to_irc(np.atleast_2d(mm))).astype(int)
    inside = np.all((irc >= 0) & (irc < np.array(frame.shape)), axis=1)
    result = np.zeros(len(irc), dtype=bool)
    result[inside] = lung[tuple(irc[inside].T)]
    return result


def point_in_lung(frame: Frame, lung: np.ndarray, mm: np.ndarray) -> bool:
    i, r, c = (int(round(v)) for v in frame.to_irc(mm))
    n_i, n_r, n_c = frame.shape
    return 0 <= i < n_i and 0 <= r < n_r and 0 <= c < n_c and bool(lung[i, r, c])


def random_unit(rng: np.random.Generator) -> np.ndarray:
    vector = rng.standard_normal(3)
    return vector / np.linalg.norm(vector)


def rotate_towards(direction: np.ndarray, other: np.ndarray, angle: float) -> np.ndarray:
    """``direction`` turned by ``angle`` radians in the plane it spans with ``other``."""
    perpendicular = other - (other @ direction) * direction
    norm = np.linalg.norm(perpendicular)
    if norm < 1e-6:
        return direction
    return np.cos(angle) * direction + np.sin(angle) * perpendicular / norm


def triple(values: np.ndarray) -> tuple[float, float, float]:
    return tuple(round(float(v), 6) for v in np.asarray(values).reshape(3))


def boundary_indices(lung: np.ndarray) -> np.ndarray:
    interior = lung.copy()
    interior[:, 1:, :] &= lung[:, :-1, :]
    interior[:, :-1, :] &= lung[:, 1:, :]
    interior[:, :, 1:] &= lung[:, :, :-1]
    interior[:, :, :-1] &= lung[:, :, 1:]
    return np.flatnonzero(lung & ~interior)


def random_lung_points(rng: np.random.Generator, frame: Frame, lung: np.ndarray, count: int) -> np.ndarray:
    """``count`` uniform points (mm) inside the lungs, by rejection sampling."""
    found = []
    total = 0
    for _ in range(200):
        irc = rng.uniform(0, 1, (max(64, 4 * count), 3)) * np.array(frame.shape) - 0.5
        keep = in_lung(frame, lung, frame.to_mm(irc))
        found.append(frame.to_mm(irc[keep]))
        total += int(keep.sum())
        if total >= count:
            break
    points = np.concatenate(found) if found else np.zeros((0, 3))
    return points[:count]
