"""The nodule mask file: gzip NIfTI with the CT's geometry, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from p2ch_luna.errors import LunaError
from p2ch_luna.geometry import Geometry
from p2ch_luna.io.ct import load_ct, write_metaimage
from p2ch_luna.io.mask import write_nifti_mask
from p2ch_luna.synth.masks import sample_nodule_mask


def test_mask_round_trips_through_nifti_with_the_real_cts_geometry_and_is_small(cptac_dir: Path,
                                                                                tmp_path: Path) -> None:
    ct = load_ct(cptac_dir)
    mask = sample_nodule_mask(ct.hu.shape)
    path = tmp_path / "series_mask.nii.gz"
    write_nifti_mask(mask, ct.geometry, path)
    image = sitk.ReadImage(str(path))
    assert image.GetSize() == tuple(reversed(ct.hu.shape))
    np.testing.assert_allclose(image.GetOrigin(), ct.geometry.origin_xyz, atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), ct.geometry.spacing_xyz, atol=1e-6)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), ct.geometry.direction, atol=1e-6)
    read = sitk.GetArrayFromImage(image)
    assert np.count_nonzero(read) == np.count_nonzero(mask) > 0
    np.testing.assert_array_equal(read, mask)
    write_metaimage(mask, ct.geometry, tmp_path / "series_mask.mhd")
    uncompressed = (tmp_path / "series_mask.mhd").stat().st_size + (tmp_path / "series_mask.raw").stat().st_size
    assert path.stat().st_size * 100 < uncompressed


def test_a_failed_mask_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    geometry = Geometry(np.zeros(3), np.ones(3), np.eye(3), (8, 16, 16))
    mask = np.zeros((8, 16, 16), dtype=np.uint8)
    written: list[Path] = []

    def failing_replace(source: str | os.PathLike, target: str | os.PathLike) -> None:
        written.append(Path(source))
        assert Path(source).stat().st_size > 0  # the temporary file was really written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(LunaError, match="could not write .*mask.nii.gz: No space left on device"):
        write_nifti_mask(mask, geometry, tmp_path / "mask.nii.gz")
    assert written and written[0].name.endswith(".nii.gz")
    assert list(tmp_path.iterdir()) == []
