"""Nodule masks: the book's grown boxes and spherical masks on synthetic CTs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from p2ch_luna.data.masks import (
    MASK_THRESHOLD_HU,
    annotation_rows,
    build_nodule_mask,
    cached_nodule_mask,
    cached_positive_slices,
    ct_nodule_mask,
    grow_radius,
    mask_cache_name,
    pack_mask,
    positive_slices,
    unpack_mask,
)
from p2ch_luna.geometry import Geometry
from p2ch_luna.io.ct import Ct

LUNG_HU = -850
NODULE_HU = 40
SHAPE = (30, 40, 40)
SPACING_XYZ = (0.8, 0.8, 2.0)
ORIGIN_XYZ = (-20.0, 10.0, -100.0)


def _geometry(direction: np.ndarray | None = None) -> Geometry:
    return Geometry(np.array(ORIGIN_XYZ), np.array(SPACING_XYZ), np.eye(3) if direction is None else direction, SHAPE)


def _ct_with_nodule(center_irc: tuple[int, int, int], radius_mm: float, geometry: Geometry) -> tuple[Ct, np.ndarray]:
    """A lung-filled CT with one dense spherical nodule; also returns the nodule's true voxels."""
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij"), axis=-1).reshape(-1, 3)
    center_xyz = geometry.irc_to_xyz(center_irc)
    inside = (np.linalg.norm(geometry.irc_to_xyz(grid) - center_xyz, axis=1) <= radius_mm).reshape(SHAPE)
    hu = np.full(SHAPE, LUNG_HU, dtype=np.int16)
    hu[inside] = NODULE_HU
    return Ct(hu=hu, geometry=geometry, series_uid="1.2.3"), inside


def _annotations(geometry: Geometry, center_irc: tuple[int, int, int], diameter_mm: float,
                 series_uid: str = "1.2.3") -> pd.DataFrame:
    x, y, z = geometry.irc_to_xyz(center_irc)
    return pd.DataFrame({"series_uid": [series_uid], "center_x": [x], "center_y": [y], "center_z": [z],
                         "diameter_mm": [diameter_mm]})


def test_grown_mask_covers_nodule_and_excludes_lung() -> None:
    geometry = _geometry()
    center = (15, 20, 18)
    ct, nodule = _ct_with_nodule(center, radius_mm=5.0, geometry=geometry)
    mask = ct_nodule_mask(ct, _annotations(geometry, center, 10.0))
    assert mask.dtype == bool and mask.shape == SHAPE
    np.testing.assert_array_equal(mask, nodule)
    assert not mask[ct.hu < MASK_THRESHOLD_HU].any()


def test_grown_mask_keeps_only_the_box_around_the_annotation() -> None:
    geometry = _geometry()
    ct, nodule = _ct_with_nodule((15, 20, 18), radius_mm=5.0, geometry=geometry)
    hu = np.array(ct.hu)
    hu[:, :, 35:] = NODULE_HU  # a dense wall far from the nodule must stay out of the mask
    ct = Ct(hu=hu, geometry=geometry, series_uid="1.2.3")
    mask = ct_nodule_mask(ct, _annotations(geometry, (15, 20, 18), 10.0))
    np.testing.assert_array_equal(mask, nodule)


def test_grow_radius_stops_at_threshold_and_border() -> None:
    line = np.array([-900, 0, 0, 0, 0, 0, 0, -900, -900], dtype=np.int16)
    assert grow_radius(line, 3, MASK_THRESHOLD_HU) == 3  # hu[0] is lung: stop at radius 3
    assert grow_radius(np.zeros(9, dtype=np.int16), 4, MASK_THRESHOLD_HU) == 4  # border reached
    assert grow_radius(np.zeros(9, dtype=np.int16), 0, MASK_THRESHOLD_HU) == 0


def test_grow_radius_at_the_border_does_not_wrap() -> None:
    line = np.zeros(10, dtype=np.int16)
    line[-1] = -1000  # the book's hu[c - r] with c - r < 0 would read this voxel
    assert grow_radius(line, 1, MASK_THRESHOLD_HU) == 1


@pytest.mark.parametrize("direction", [np.eye(3), np.diag([-1.0, -1.0, 1.0])])
def test_sphere_mask_volume(direction: np.ndarray) -> None:
    geometry = _geometry(direction)
    ct = Ct(hu=np.full(SHAPE, LUNG_HU, dtype=np.int16), geometry=geometry, series_uid="1.2.3")
    diameter = 14.0
    mask = ct_nodule_mask(ct, _annotations(geometry, (15, 20, 20), diameter), mode="sphere")
    voxel_volume = float(np.prod(SPACING_XYZ))
    expected = 4 / 3 * math.pi * (diameter / 2) ** 3
    assert mask.sum() * voxel_volume == pytest.approx(expected, rel=0.1)
    assert mask[15, 20, 20] and not mask[0, 0, 0]


def test_annotations_of_other_series_and_candidates_are_ignored() -> None:
    geometry = _geometry()
    ct, nodule = _ct_with_nodule((15, 20, 18), radius_mm=5.0, geometry=geometry)
    rows = pd.concat([
        _annotations(geometry, (15, 20, 18), 10.0).assign(source="annotation"),
        _annotations(geometry, (5, 5, 5), 10.0).assign(source="candidate"),
        _annotations(geometry, (25, 30, 30), 10.0, series_uid="other").assign(source="annotation"),
    ], ignore_index=True)
    assert len(annotation_rows(rows, "1.2.3")) == 1
    np.testing.assert_array_equal(ct_nodule_mask(ct, rows), nodule)


def test_centre_outside_ct_is_skipped() -> None:
    geometry = _geometry()
    ct = Ct(hu=np.zeros(SHAPE, dtype=np.int16), geometry=geometry, series_uid="1.2.3")
    rows = _annotations(geometry, (15, 20, 18), 10.0)
    rows["center_z"] = 1e4
    assert not build_nodule_mask(ct.hu, geometry, rows).any()


def test_positive_slices_and_cache_name() -> None:
    mask = np.zeros((6, 4, 4), dtype=bool)
    mask[2, 1, 1] = mask[4, 3, 0] = True
    np.testing.assert_array_equal(positive_slices(mask), [2, 4])
    rows = _annotations(_geometry(), (15, 20, 18), 10.0)
    name = mask_cache_name("1.2.3", rows, "grow", MASK_THRESHOLD_HU)
    assert "1.2.3" in name and "grow" in name and "-700" in name
    assert name != mask_cache_name("1.2.3", rows.assign(diameter_mm=11.0), "grow", MASK_THRESHOLD_HU)
    assert name != mask_cache_name("1.2.3", rows, "sphere", MASK_THRESHOLD_HU)


def test_pack_mask_round_trip() -> None:
    mask = np.random.default_rng(0).random((3, 5, 13)) > 0.7
    packed = pack_mask(mask)
    assert packed.shape == (3, 5, 2) and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_mask(packed, 13), mask)
    np.testing.assert_array_equal(unpack_mask(packed[1], 13), mask[1])
    np.testing.assert_array_equal(positive_slices(packed), positive_slices(mask))


def test_cached_mask_matches_mask_of_loaded_ct(tiny_dataset: Path, tmp_path: Path) -> None:
    from p2ch_luna.data.cache import ChunkCache
    from p2ch_luna.data.luna import ANNOTATIONS_FILE, read_annotations
    from p2ch_luna.io.ct import find_series_path, load_ct

    annotations = read_annotations(tiny_dataset / ANNOTATIONS_FILE)
    series_uid = annotations["series_uid"].iloc[0]
    expected = ct_nodule_mask(load_ct(find_series_path(tiny_dataset, series_uid)), annotations)
    assert expected.any()
    cache = ChunkCache(tmp_path / "cache", tiny_dataset)
    for _ in range(2):  # built, then read back
        np.testing.assert_array_equal(cached_nodule_mask(cache, series_uid, annotations), expected)
        np.testing.assert_array_equal(cached_positive_slices(cache, series_uid, annotations),
                                      positive_slices(expected))
