"""Tests for p2ch_luna.geometry: world <-> voxel conversions and chunk bounds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2ch_luna.geometry import Geometry, chunk_bounds, irc_to_xyz, xyz_to_irc, xyz_to_irc_continuous

coordinate = st.floats(-500, 500, allow_nan=False, allow_infinity=False)
xyz_points = st.tuples(coordinate, coordinate, coordinate).map(np.array)
spacings = st.tuples(*[st.floats(0.1, 5.0)] * 3).map(np.array)

SIGNED_PERMUTATIONS = [
    np.diag(signs)[:, list(order)]
    for order in itertools.permutations(range(3))
    for signs in itertools.product((1.0, -1.0), repeat=3)
]


@st.composite
def rotations(draw: st.DrawFn) -> np.ndarray:
    """A random proper or improper rotation (orthonormal matrix) from QR of a random matrix."""
    entries = draw(st.lists(st.floats(-1, 1), min_size=9, max_size=9))
    matrix = np.array(entries).reshape(3, 3) + np.eye(3) * 1e-3
    if abs(np.linalg.det(matrix)) < 1e-3:
        matrix = np.eye(3)
    q, r = np.linalg.qr(matrix)
    return q * np.sign(np.diag(r))


@st.composite
def invertible_matrices(draw: st.DrawFn) -> np.ndarray:
    """A general, reasonably conditioned invertible 3x3 matrix."""
    entries = draw(st.lists(st.floats(-2, 2), min_size=9, max_size=9))
    matrix = np.array(entries).reshape(3, 3) + 2.5 * np.eye(3)
    if np.linalg.cond(matrix) > 1e3:
        matrix = np.eye(3)
    return matrix


directions = st.one_of(st.sampled_from(SIGNED_PERMUTATIONS), rotations(), invertible_matrices())


@settings(max_examples=300, deadline=None)
@given(point=xyz_points, origin=xyz_points, spacing=spacings, direction=directions)
def test_world_voxel_round_trip(point: np.ndarray, origin: np.ndarray, spacing: np.ndarray,
                                direction: np.ndarray) -> None:
    irc = xyz_to_irc_continuous(point, origin, spacing, direction)
    assert irc.shape == (3,)
    np.testing.assert_allclose(irc_to_xyz(irc, origin, spacing, direction), point, atol=1e-6)


@settings(max_examples=100, deadline=None)
@given(origin=xyz_points, spacing=spacings, direction=directions,
       irc=st.lists(st.tuples(*[st.integers(-50, 600)] * 3), min_size=1, max_size=6).map(np.array))
def test_voxel_world_round_trip_batched(origin: np.ndarray, spacing: np.ndarray, direction: np.ndarray,
                                        irc: np.ndarray) -> None:
    geometry = Geometry(origin, spacing, direction, (10, 10, 10))
    xyz = geometry.irc_to_xyz(irc)
    assert xyz.shape == irc.shape
    np.testing.assert_array_equal(geometry.xyz_to_irc(xyz), irc)


def test_identity_direction_by_hand() -> None:
    origin, spacing = (-100.0, -200.0, -300.0), (0.5, 0.7, 2.5)
    irc = (4, 10, 20)  # index (z), row (y), col (x)
    expected = (-100 + 20 * 0.5, -200 + 10 * 0.7, -300 + 4 * 2.5)
    np.testing.assert_allclose(irc_to_xyz(irc, origin, spacing, np.eye(3)), expected)
    np.testing.assert_array_equal(xyz_to_irc(expected, origin, spacing, np.eye(3)), irc)


def test_flipped_z_by_hand() -> None:
    direction = np.diag([1.0, 1.0, -1.0])
    xyz = irc_to_xyz((4, 10, 20), (0.0, 0.0, 100.0), (1.0, 2.0, 3.0), direction)
    np.testing.assert_allclose(xyz, (20.0, 20.0, 100.0 - 12.0))
    np.testing.assert_allclose(xyz_to_irc_continuous((20.0, 20.0, 88.0), (0.0, 0.0, 100.0),
                                                     (1.0, 2.0, 3.0), direction), (4, 10, 20))


def test_permuted_axes_by_hand() -> None:
    # Column steps along world z, row steps along world x, index steps along world y.
    direction = np.array([[0.0, 1.0, 0.0],
                          [0.0, 0.0, 1.0],
                          [1.0, 0.0, 0.0]])
    spacing = (1.0, 2.0, 3.0)  # per image axis (col, row, index)
    xyz = irc_to_xyz((4, 10, 20), (0.0, 0.0, 0.0), spacing, direction)
    # cri * spacing = (20, 20, 12): x = row part, y = index part, z = col part
    np.testing.assert_allclose(xyz, (20.0, 12.0, 20.0))
    np.testing.assert_allclose(xyz_to_irc_continuous(xyz, (0, 0, 0), spacing, direction), (4, 10, 20))


def test_non_symmetric_direction_differs_from_book_formula() -> None:
    """The book's ``offset @ inv(direction)`` is wrong for this matrix; ours is right."""
    direction = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    origin, spacing = np.zeros(3), np.ones(3)
    irc = np.array([1.0, 2.0, 3.0])
    xyz = irc_to_xyz(irc, origin, spacing, direction)
    np.testing.assert_allclose(xyz_to_irc_continuous(xyz, origin, spacing, direction), irc)
    book = ((xyz - origin) @ np.linalg.inv(direction)) / spacing
    assert not np.allclose(book[::-1], irc)


def test_points_must_have_three_coordinates() -> None:
    with pytest.raises(ValueError):
        irc_to_xyz((1, 2), (0, 0, 0), (1, 1, 1), np.eye(3))


def test_geometry_is_read_only_and_contains() -> None:
    geometry = Geometry([0, 0, 0], [1, 1, 1], np.eye(3), (5, 6, 7))
    with pytest.raises(ValueError):
        geometry.origin_xyz[0] = 1.0
    assert geometry.contains_irc((4, 5, 6))
    assert not geometry.contains_irc((5, 0, 0))
    assert not geometry.contains_irc((0, -1, 0))
    np.testing.assert_array_equal(geometry.spacing_irc, [1, 1, 1])


def test_chunk_bounds_interior_is_centred() -> None:
    assert chunk_bounds((20, 30, 40), (8, 10, 12), (100, 100, 100)) == [(16, 24), (25, 35), (34, 46)]


def test_chunk_bounds_shift_inside_at_borders() -> None:
    # start < 0 shifts to 0; end > size shifts back to size - width.
    assert chunk_bounds((1, 98, 50), (8, 8, 8), (100, 100, 100)) == [(0, 8), (92, 100), (46, 54)]


def test_chunk_bounds_window_larger_than_axis_covers_it() -> None:
    assert chunk_bounds((2, 3, 50), (32, 8, 8), (5, 100, 100)) == [(0, 5), (0, 8), (46, 54)]


@settings(max_examples=200, deadline=None)
@given(center=st.integers(-10, 120), width=st.integers(1, 64), size=st.integers(1, 100))
def test_chunk_bounds_always_inside(center: int, width: int, size: int) -> None:
    [(start, end)] = chunk_bounds((center,), (width,), (size,))
    assert 0 <= start <= end <= size
    assert end - start == min(width, size)
    if width <= size and 0 <= center - width // 2 and center - width // 2 + width <= size:
        assert start == center - width // 2


@pytest.mark.parametrize("center", [4, 5, 6, 7])
def test_chunk_bounds_odd_width_is_centred_on_the_voxel(center: int) -> None:
    assert chunk_bounds((center,), (3,), (20,)) == [(center - 1, center + 2)]
