"""Lung mask from HU: plausible on a real chest CT, and covering the lungs of synthetic CTs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from p2ch_luna.diagnose.lungs import fill_holes_in_slices, find_lungs, mask_bounding_box
from p2ch_luna.synth.series import make_series

LITRE_ML = 1000.0


def _touches_border(mask: np.ndarray) -> bool:
    faces = [mask[0], mask[-1], mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1]]
    return any(face.any() for face in faces)


@pytest.fixture(scope="module")
def real_ct(cptac_dir: Path):
    from p2ch_luna.io.ct import load_ct

    return load_ct(cptac_dir)


def test_real_ct_lungs_are_plausible(real_ct) -> None:
    lungs = find_lungs(real_ct.hu, tuple(real_ct.geometry.spacing_irc))
    assert lungs.count == 2
    sizes = np.bincount(lungs.labels.ravel())[1:] * np.prod(lungs.spacing_irc) / LITRE_ML
    assert sizes.min() > 0.5, sizes  # both lungs are large, neither is a gas bubble
    assert 2.0 * LITRE_ML <= lungs.volume_ml <= 8.0 * LITRE_ML
    assert not _touches_border(lungs.mask)
    assert not _touches_border(lungs.labels > 0)
    _, components = ndimage.label(lungs.labels > 0)
    assert components == 2
    assert (lungs.mask >= (lungs.labels > 0)).all()
    # Nothing outside the body: the border regions of every slice are outside the mask.
    assert not lungs.mask[:, :40, :].any() and not lungs.mask[:, -40:, :].any()


@pytest.mark.parametrize("seed, shape, n_slices", [(0, (96, 96), 40), (1, (128, 128), 48), (3, (96, 96), 40)])
def test_mask_covers_synthetic_lungs(seed: int, shape: tuple[int, int], n_slices: int) -> None:
    series = make_series(np.random.default_rng(seed), shape=shape, n_slices=n_slices)
    lungs = find_lungs(series.hu, tuple(series.geometry.spacing_irc))
    truth = series.lung_mask.astype(bool)
    assert lungs.count == 2
    coverage = np.count_nonzero(lungs.mask & truth) / np.count_nonzero(truth)
    assert coverage > 0.98
    # Vessels and nodules are inside the lungs; the margin adds a little; the body is not included.
    assert np.count_nonzero(lungs.mask) < 1.4 * np.count_nonzero(truth)


def test_no_lungs_gives_empty_mask() -> None:
    hu = np.full((8, 64, 64), -1000, dtype=np.int16)
    hu[:, 16:48, 16:48] = 40  # a block of soft tissue without air inside
    lungs = find_lungs(hu, (1.0, 1.0, 1.0))
    assert lungs.count == 0 and not lungs.mask.any()
    assert lungs.bounding_box() is None


@pytest.mark.parametrize("offset, hinted", [(0, False), (1024, True)])
def test_no_lungs_in_values_that_cannot_be_hu_says_so(offset: int, hinted: bool,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A CT stored without its rescale (HU + 1024, say) never reaches air: the warning asks whether it is in HU."""
    hu = np.full((8, 64, 64), -1000 + offset, dtype=np.int16)
    hu[:, 16:48, 16:48] = 40 + offset
    assert not find_lungs(hu, (1.0, 1.0, 1.0)).mask.any()
    assert "no lungs found" in caplog.text
    assert ("never reach air" in caplog.text) == hinted
    assert not hinted or "run from 24 to 1064" in caplog.text


def test_mask_bounding_box_pads_and_clamps() -> None:
    mask = np.zeros((5, 10, 10), dtype=bool)
    mask[2, 3:5, 8] = True
    box = mask_bounding_box(mask, (1, 2, 2))
    assert box == (slice(1, 4), slice(1, 7), slice(6, 10))


def test_slice_hole_filling_is_scipys() -> None:
    rng = np.random.default_rng(9)
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    for density in (0.3, 0.5, 0.7):
        mask = rng.random((7, 23, 19)) < density
        expected = ndimage.binary_fill_holes(mask, structure=structure)
        assert np.array_equal(fill_holes_in_slices(mask), expected)
    assert not fill_holes_in_slices(np.zeros((2, 5, 5), dtype=bool)).any()
    assert fill_holes_in_slices(np.ones((2, 5, 5), dtype=bool)).all()
