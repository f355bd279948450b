"""The shell-fill test of the peak grouping: blobs (nodules) kept, tubes (vessels) dropped."""

from __future__ import annotations

import numpy as np
import pytest

from p2ch_luna.diagnose import grouping
from p2ch_luna.geometry import Geometry
from p2ch_luna.io.ct import Ct

SHAPE = (40, 60, 90)


def _ball(center: tuple[float, float, float], radius: float) -> np.ndarray:
    grid = np.indices(SHAPE, dtype=np.float64)
    return sum((axis - c) ** 2 for axis, c in zip(grid, center)) <= radius**2


def _tube(row: float, col: float, radius: float) -> np.ndarray:
    """A straight tube along the index axis, through the whole array."""
    grid = np.indices(SHAPE, dtype=np.float64)
    return (grid[1] - row) ** 2 + (grid[2] - col) ** 2 <= radius**2


def test_shell_directions_are_unit_vectors_spread_over_the_sphere() -> None:
    directions = grouping.shell_directions(512)
    assert np.allclose(np.linalg.norm(directions, axis=1), 1.0)
    assert np.allclose(directions.mean(axis=0), 0.0, atol=0.01)
    assert np.mean(np.abs(directions[:, 0]) < 0.5) == pytest.approx(0.5, abs=0.01)  # uniform in cos(polar)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.7, 0.7)])
def test_a_ball_fills_nothing_and_a_tube_a_quarter_of_its_shell(spacing: tuple[float, float, float]) -> None:
    radius_mm = 6.0
    scale = np.asarray(spacing)
    grid = np.indices(SHAPE, dtype=np.float64) * scale[:, None, None, None]
    center = np.asarray([20.0, 30.0, 45.0]) * scale
    ball = sum((axis - c) ** 2 for axis, c in zip(grid, center)) <= radius_mm**2
    tube = (grid[1] - center[1]) ** 2 + (grid[2] - center[2]) ** 2 <= radius_mm**2
    centers = np.asarray([[20.0, 30.0, 45.0]])
    assert grouping.shell_fill(ball, centers, [radius_mm], spacing)[0] == 0.0
    # The caps within the radius of the axis: 1 - cos(asin(1 / 1.5)) = 0.255 of the sphere.
    assert grouping.shell_fill(tube, centers, [radius_mm], spacing)[0] == pytest.approx(0.255, abs=0.05)


def test_max_shell_fill_drops_the_peaks_along_a_vessel_and_keeps_the_nodule_on_it() -> None:
    vessel = _tube(30, 20, 2.0)
    nodule = _ball((20, 30, 60), 5.0) | (_tube(30, 60, 1.5) & (np.indices(SHAPE)[0] > 20))  # a vessel leaves it
    mask = vessel | nodule
    hu = np.where(mask, 40, -850).astype(np.int16)
    ct = Ct(hu=hu, geometry=Geometry(np.zeros(3), np.ones(3), np.eye(3), SHAPE), series_uid="series")
    region = np.ones(SHAPE, dtype=bool)
    everything = grouping.group_candidates(hu, mask, region, ct, 1, "peaks")
    blobs = grouping.group_candidates(hu, mask, region, ct, 1, "peaks", max_shell_fill=0.15)
    on_vessel = (everything["col"] - 20).abs() < 3
    assert on_vessel.any()  # a perfect tube's depth ridge is one plateau: one peak (a real one's, many)
    assert not ((blobs["col"] - 20).abs() < 3).any()
    nearest = blobs.iloc[((blobs["index"] - 20) ** 2 + (blobs["col"] - 60) ** 2).argmin()]
    assert (nearest["index"], nearest["row"], nearest["col"]) == pytest.approx((20, 30, 60), abs=1.0)
    assert nearest["diameter_mm"] == pytest.approx(10.0, abs=1.5)


@pytest.mark.parametrize("method", grouping.GROUPINGS)
def test_min_diameter_drops_the_narrow_blob_and_keeps_the_wide_one(method: str) -> None:
    mask = _ball((20, 20, 20), 1.5) | _ball((20, 30, 60), 5.0)
    hu = np.where(mask, 40, -850).astype(np.int16)
    ct = Ct(hu=hu, geometry=Geometry(np.zeros(3), np.ones(3), np.eye(3), SHAPE), series_uid="series")
    region = np.ones(SHAPE, dtype=bool)
    erosion = 0 if method == "components" else 1
    everything = grouping.group_candidates(hu, mask, region, ct, erosion, method)
    wide = grouping.group_candidates(hu, mask, region, ct, erosion, method, min_diameter_mm=5.0)
    assert ((everything["col"] - 20).abs() < 2).any() and ((everything["col"] - 60).abs() < 2).any()
    assert not ((wide["col"] - 20).abs() < 2).any() and ((wide["col"] - 60).abs() < 2).any()
    assert (wide["diameter_mm"] >= 5.0).all()
