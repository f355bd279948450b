"""The nodule mask as DICOM-SEG: read back with pydicom, frames at the CT's slices, UIDs of the source series."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from p2ch_luna.geometry import Geometry
from p2ch_luna.io.ct import load_ct
from p2ch_luna.io.dicom_seg import SEGMENTATION_STORAGE, read_dicom_source, read_seg_mask, write_dicom_seg
from p2ch_luna.synth.masks import sample_nodule_mask

pydicom = pytest.importorskip("pydicom")


def _frame_positions(ds) -> np.ndarray:
    return np.array([[float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
                     for frame in ds.PerFrameFunctionalGroupsSequence])


def test_seg_of_a_synthetic_ct_holds_the_mask_at_its_slices(tmp_path: Path) -> None:
    direction = np.array([[1.0, 0, 0], [0, -1.0, 0], [0, 0, 1.0]])
    geometry = Geometry(np.array([-120.0, 80.0, -300.0]), np.array([0.7, 0.7, 2.5]), direction, (12, 41, 47))  # frames of 1927 bits: not byte aligned
    mask = np.zeros(geometry.shape_irc, dtype=np.uint8)
    mask[3:6, 10:17, 20:25] = 1
    mask[9, 30, 40] = 1
    path = tmp_path / "series_mask.dcm"
    write_dicom_seg(mask, geometry, path)
    ds = pydicom.dcmread(path, force=False)
    assert ds.SOPClassUID == SEGMENTATION_STORAGE == ds.file_meta.MediaStorageSOPClassUID
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY" and ds.BitsAllocated == 1
    assert int(ds.NumberOfFrames) == 4  # slices 3, 4, 5 and 9
    expected = geometry.irc_to_xyz(np.array([[i, 0, 0] for i in (3, 4, 5, 9)]))
    np.testing.assert_allclose(_frame_positions(ds), expected, atol=1e-6)
    np.testing.assert_array_equal(read_seg_mask(path, geometry.shape_irc, geometry), mask)
    np.testing.assert_array_equal(ds.pixel_array, mask[[3, 4, 5, 9]])  # pydicom's own decoder agrees
    segment = ds.SegmentSequence[0]
    assert segment.SegmentLabel == "Nodule" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "27925004"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    orientation = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    np.testing.assert_allclose([float(v) for v in orientation], [1, 0, 0, 0, -1, 0])
    assert "ReferencedSeriesSequence" not in ds
    assert not list(tmp_path.glob(".*"))  # no temporary file left
    # SimpleITK (GDCM) reads the frames as one image; its voxels of frames that are not byte aligned vary
    # from run to run (106 or 110 set here), so they are compared on byte-aligned frames below.
    assert sitk.ReadImage(str(path)).GetSize() == (47, 41, 4)


def test_simpleitk_reads_a_seg_of_byte_aligned_frames_as_the_mask(tmp_path: Path) -> None:
    geometry = Geometry(np.array([-120.0, 80.0, -300.0]), np.array([0.7, 0.7, 2.5]), np.eye(3), (6, 40, 48))
    mask = np.zeros(geometry.shape_irc, dtype=np.uint8)
    mask[1:4, 10:17, 20:25] = 1
    mask[5, 30, 40] = 1
    write_dicom_seg(mask, geometry, tmp_path / "series_mask.dcm")
    image = sitk.ReadImage(str(tmp_path / "series_mask.dcm"))
    assert image.GetSize() == (48, 40, 4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image) != 0, mask[[1, 2, 3, 5]] != 0)


def test_an_empty_mask_is_one_empty_frame(tmp_path: Path) -> None:
    geometry = Geometry(np.zeros(3), np.ones(3), np.eye(3), (5, 8, 8))
    write_dicom_seg(np.zeros((5, 8, 8), dtype=np.uint8), geometry, tmp_path / "empty.dcm")
    ds = pydicom.dcmread(tmp_path / "empty.dcm")
    assert int(ds.NumberOfFrames) == 1 and not np.any(np.frombuffer(ds.PixelData, dtype=np.uint8))


def test_seg_of_the_real_dicom_ct_references_its_series_and_slices(cptac_dir: Path, tmp_path: Path) -> None:
    ct = load_ct(cptac_dir)
    mask = sample_nodule_mask(ct.hu.shape)
    source = read_dicom_source(cptac_dir, ct.series_uid, ct.geometry)
    path = tmp_path / "series_mask.dcm"
    write_dicom_seg(mask, ct.geometry, path, source)
    ds = pydicom.dcmread(path)
    slices = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    assert int(ds.NumberOfFrames) == slices.size > 0
    np.testing.assert_array_equal(read_seg_mask(path, ct.hu.shape, ct.geometry), mask)

    by_uid = {}
    for file in sorted(cptac_dir.glob("*.dcm")):
        header = pydicom.dcmread(file, stop_before_pixels=True)
        by_uid[header.SOPInstanceUID] = header
    first = next(iter(by_uid.values()))
    assert ds.StudyInstanceUID == first.StudyInstanceUID
    assert ds.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert ds.PatientID == first.PatientID
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID == ct.series_uid
    assert len(ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == len(by_uid)
    for frame, position in zip(ds.PerFrameFunctionalGroupsSequence, _frame_positions(ds)):
        referenced = frame.DerivationImageSequence[0].SourceImageSequence[0]
        slice_header = by_uid[referenced.ReferencedSOPInstanceUID]
        assert referenced.ReferencedSOPClassUID == slice_header.SOPClassUID
        np.testing.assert_allclose(position, [float(v) for v in slice_header.ImagePositionPatient], atol=1e-3)
