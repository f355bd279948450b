"""Depth inside masks: both ways of computing it give scipy's Euclidean distance transform."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from p2ch_luna.diagnose import distance

SPACINGS = [(1.0, 1.0, 1.0), (2.5, 0.7, 0.7), (0.63, 0.81, 0.77)]


def _blobs(seed: int, shape: tuple[int, int, int], fraction: float, radius: int) -> np.ndarray:
    """Balls and their unions at random places: thin and thick tissue, some touching the array's edge."""
    rng = np.random.default_rng(seed)
    seeds = rng.random(shape) < fraction
    ball = ndimage.generate_binary_structure(3, 1)
    return ndimage.binary_dilation(seeds, structure=ball, iterations=radius)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_feature_transform_depth_is_scipys_bit_for_bit(spacing: tuple[float, float, float]) -> None:
    mask = ndimage.binary_opening(np.random.default_rng(5).random((20, 31, 26)) > 0.3)
    assert mask.any() and not mask.all()
    expected = ndimage.distance_transform_edt(mask, sampling=spacing)
    assert np.array_equal(distance.depth_from_feature_transform(mask, np.asarray(spacing)), expected)
    assert np.array_equal(distance.depth_mm(mask, np.asarray(spacing)), expected)  # dense: this path


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("seed, radius", [(0, 1), (1, 3), (2, 6)])
def test_boundary_depth_is_scipys(spacing: tuple[float, float, float], seed: int, radius: int) -> None:
    mask = _blobs(seed, (24, 40, 36), 0.002, radius)
    assert mask.any() and not mask.all()
    assert mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, :, -1].any()  # the edge is not outside
    expected = ndimage.distance_transform_edt(mask, sampling=spacing)
    depth = distance.depth_from_boundary(mask, np.asarray(spacing))
    assert depth.dtype == np.float64 and depth.shape == mask.shape
    assert np.all(depth[~mask] == 0.0)
    # The same arithmetic from the same offsets; only equidistant outside voxels may differ, in the last bit.
    np.testing.assert_allclose(depth, expected, rtol=4e-16, atol=0.0)
    assert np.count_nonzero(depth != expected) <= 0.01 * np.count_nonzero(mask)


def test_boundary_depth_is_the_same_on_several_threads() -> None:
    mask = _blobs(3, (30, 50, 50), 0.001, 4)
    spacing = np.array([1.25, 0.68, 0.68])
    assert np.array_equal(distance.depth_from_boundary(mask, spacing, workers=1),
                          distance.depth_from_boundary(mask, spacing, workers=3))


def test_depth_picks_the_boundary_path_for_sparse_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    mask = _blobs(4, (20, 30, 30), 0.0005, 2)
    assert 0 < np.count_nonzero(mask) <= distance.SPARSE_FRACTION * mask.size
    calls: list[str] = []
    original = distance.depth_from_boundary

    def counted(*args, **kwargs):
        calls.append("boundary")
        return original(*args, **kwargs)

    monkeypatch.setattr(distance, "depth_from_boundary", counted)
    spacing = np.array([2.0, 0.8, 0.8])
    np.testing.assert_allclose(distance.depth_mm(mask, spacing, workers=2),
                               ndimage.distance_transform_edt(mask, sampling=spacing), rtol=4e-16, atol=0.0)
    assert calls == ["boundary"]


@pytest.mark.parametrize("fraction, radius", [(0.0005, 2), (0.01, 3)])  # the boundary path, the feature transform
def test_float32_depth_is_the_float64_depth_rounded(fraction: float, radius: int) -> None:
    mask = _blobs(6, (20, 30, 30), fraction, radius)
    spacing = np.array([1.25, 0.7, 0.7])
    depth = distance.depth_mm(mask, spacing, workers=2, dtype=np.float32)
    assert depth.dtype == np.float32
    assert np.array_equal(depth, distance.depth_mm(mask, spacing, workers=2).astype(np.float32))
    assert distance.depth_mm(np.zeros((2, 3, 4), dtype=bool), spacing, dtype=np.float32).dtype == np.float32


def test_depth_of_an_empty_mask_is_zero() -> None:
    empty = np.zeros((4, 5, 6), dtype=bool)
    assert np.array_equal(distance.depth_mm(empty, np.ones(3)), np.zeros(empty.shape))
    assert np.array_equal(distance.depth_from_boundary(empty, np.ones(3)), np.zeros(empty.shape))


def test_a_full_mask_falls_back_to_scipys_convention() -> None:
    full = np.ones((3, 4, 5), dtype=bool)  # nothing outside: scipy measures to a virtual outside voxel
    expected = ndimage.distance_transform_edt(full, sampling=(1.0, 2.0, 3.0))
    assert np.array_equal(distance.depth_from_boundary(full, np.array([1.0, 2.0, 3.0])), expected)


def test_outer_boundary_is_the_face_neighbours_outside() -> None:
    mask = np.zeros((3, 5, 5), dtype=bool)
    mask[1, 2, 2] = True
    expected = ndimage.binary_dilation(mask, structure=ndimage.generate_binary_structure(3, 1)) & ~mask
    assert np.array_equal(distance.outer_boundary(mask), expected)
    assert np.count_nonzero(expected) == 6
