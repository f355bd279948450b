"""Label statistics over labelled voxels agree with scipy.ndimage's whole-volume versions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from p2ch_luna.diagnose import regions


@pytest.fixture
def labelled() -> tuple[np.ndarray, int, tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(7)
    mask = ndimage.binary_opening(rng.random((14, 30, 26)) > 0.55)
    labels, count = ndimage.label(mask)
    assert count > 10
    return labels, count, np.nonzero(labels)


def test_label_means_equal_center_of_mass(labelled: tuple[np.ndarray, int, tuple[np.ndarray, ...]]) -> None:
    labels, count, coordinates = labelled
    index = np.arange(1, count + 1)
    expected = np.asarray(ndimage.center_of_mass(labels > 0, labels, index))
    assert regions.label_means(labels[coordinates], coordinates, count) == pytest.approx(expected)
    weights = np.random.default_rng(1).uniform(1.0, 5.0, labels.shape)
    expected = np.asarray(ndimage.center_of_mass(weights, labels, index))
    means = regions.label_means(labels[coordinates], coordinates, count, weights[coordinates])
    assert means == pytest.approx(expected)


def test_label_maxima_equal_ndimage_maximum(labelled: tuple[np.ndarray, int, tuple[np.ndarray, ...]]) -> None:
    labels, count, coordinates = labelled
    values = np.random.default_rng(2).normal(size=labels.shape).astype(np.float32)
    expected = np.asarray(ndimage.maximum(values, labels, np.arange(1, count + 1)))
    assert np.array_equal(regions.label_maxima(labels[coordinates], values[coordinates], count), expected)


def test_one_voxel_each_lies_in_its_label(labelled: tuple[np.ndarray, int, tuple[np.ndarray, ...]]) -> None:
    labels, count, coordinates = labelled
    positions = regions.one_voxel_each(labels[coordinates], count)
    picked = labels[tuple(axis[positions] for axis in coordinates)]
    assert np.array_equal(picked, np.arange(1, count + 1))


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.15, 0.3])
def test_touching_labels_are_ndimage_labels_with_26_neighbours(fraction: float) -> None:
    mask = np.random.default_rng(int(fraction * 100)).random((15, 17, 19)) < fraction
    expected, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    coordinates = np.nonzero(mask)
    labels, touching = regions.touching_labels(coordinates)
    assert touching == count and count > 1
    assert np.array_equal(labels, expected[coordinates])  # numbered alike too


def test_touching_labels_of_no_voxels() -> None:
    labels, count = regions.touching_labels(np.nonzero(np.zeros((3, 4, 5), dtype=bool)))
    assert count == 0 and labels.size == 0
