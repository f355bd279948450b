"""Binary masks as a DICOM Segmentation object (Segmentation IOD, SOP Class 1.2.840.10008.5.1.4.1.1.66.4).

Hand-built with pydicom's ``Dataset`` API (the optional ``[dicom]`` extra; highdicom is not used). One
segment, "Nodule" (SCT 49755003 Morphologically Altered Structure / 27925004 Nodule), found by an
AUTOMATIC algorithm named ``p2ch_luna``.

Frames: one per CT slice that holds any mask voxel, in slice order (a nodule mask is mostly empty
slices; a viewer places each frame by its Plane Position). An empty mask is written as one empty frame
for the first slice, since a SEG needs at least one frame. Pixels are 1 bit, packed little-endian
bit order across frames without padding between them, as the standard asks for BINARY segmentations.

When the CT came from a DICOM series (:func:`read_dicom_source`) the SEG joins its study, Frame of
Reference and patient, and each frame names its source slice (Derivation Image Sequence and Referenced
Series Sequence). Otherwise new UIDs are generated and only the geometry links the two.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from p2ch_luna.errors import DataError, UsageError
from p2ch_luna.geometry import Geometry
from p2ch_luna.io.atomic import atomic_path

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
DCM_SUFFIX = ".dcm"
SEGMENT_LABEL = "Nodule"
ALGORITHM_NAME = "p2ch_luna"
CATEGORY_CODE = ("49755003", "SCT", "Morphologically Altered Structure")
TYPE_CODE = ("27925004", "SCT", "Nodule")
DERIVATION_CODE = ("113076", "DCM", "Segmentation")
PURPOSE_CODE = ("121322", "DCM", "Source image for image processing operation")
POSITION_TOLERANCE_VOXELS = 0.05
"""Largest distance (in voxels) of a slice or frame position from a CT slice before it lies at none."""


@dataclass(frozen=True)
class DicomSource:
    """What a SEG takes from the DICOM CT series it segments: UIDs, patient and study, and per-slice SOPs.

    ``slice_sop_instance_uids[i]`` is the SOP Instance UID of the slice at array index ``i``.
    """

    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    sop_class_uid: str
    slice_sop_instance_uids: tuple[str, ...]
    patient_name: str = ""
    patient_id: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = ""
    study_time: str = ""
    study_id: str = ""
    accession_number: str = ""
    referring_physician_name: str = ""


def require_pydicom() -> None:
    """Refuse with one line when pydicom (the ``[dicom]`` extra) is not installed."""
    try:
        import pydicom  # noqa: F401
    except ImportError as error:
        raise UsageError("DICOM-SEG output needs pydicom: pip install 'p2ch_luna[dicom]'") from error


def read_dicom_source(folder: str | os.PathLike, series_uid: str, geometry: Geometry) -> DicomSource:
    """The :class:`DicomSource` of series ``series_uid`` in ``folder``, slices matched to ``geometry``'s indices.

    Each file is placed at the array index its Image Position (Patient) falls on, so the order does not
    depend on how SimpleITK sorted the files.
    """
    import pydicom

    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid))
    if not files:
        raise DataError(f"DICOM folder {folder} has no series {series_uid}")
    slice_uids: list[str | None] = [None] * geometry.shape_irc[0]
    first = None
    for file_name in files:
        header = pydicom.dcmread(file_name, stop_before_pixels=True)
        if first is None:
            first = header
        if "ImagePositionPatient" not in header:
            raise DataError(f"DICOM file {file_name} has no Image Position (Patient)")
        continuous = geometry.xyz_to_irc_continuous([float(v) for v in header.ImagePositionPatient])
        index = int(np.rint(continuous[0]))
        if not 0 <= index < len(slice_uids) or abs(continuous[0] - index) > POSITION_TOLERANCE_VOXELS:
            raise DataError(f"DICOM file {file_name} lies at no slice of series {series_uid}")
        slice_uids[index] = str(header.SOPInstanceUID)
    missing = [i for i, uid in enumerate(slice_uids) if uid is None]
    if missing:
        raise DataError(f"DICOM series {series_uid} in {folder} has no file for slice {missing[0]}")
    return DicomSource(
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")) or _new_uid(),
        sop_class_uid=str(first.SOPClassUID),
        slice_sop_instance_uids=tuple(slice_uids),  # type: ignore[arg-type]
        patient_name=str(first.get("PatientName", "")),
        patient_id=str(first.get("PatientID", "")),
        patient_birth_date=str(first.get("PatientBirthDate", "")),
        patient_sex=str(first.get("PatientSex", "")),
        study_date=str(first.get("StudyDate", "")),
        study_time=str(first.get("StudyTime", "")),
        study_id=str(first.get("StudyID", "")),
        accession_number=str(first.get("AccessionNumber", "")),
        referring_physician_name=str(first.get("ReferringPhysicianName", "")),
    )


def segmented_slices(mask: np.ndarray) -> np.ndarray:
    """The slice indices written as frames: those with any mask voxel, or slice 0 for an empty mask."""
    indices = np.flatnonzero(np.asarray(mask).reshape(mask.shape[0], -1).any(axis=1))
    return indices if indices.size else np.array([0])


def write_dicom_seg(mask: np.ndarray, geometry: Geometry, path: str | os.PathLike,
                    source: DicomSource | None = None, series_description: str = "p2ch_luna nodule mask") -> None:
    """Write the ``(I, R, C)`` binary ``mask`` as DICOM-SEG file ``path`` with ``geometry``; atomic."""
    require_pydicom()
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    mask = np.asarray(mask) != 0
    if mask.shape != tuple(geometry.shape_irc):
        raise ValueError(f"mask shape {mask.shape} differs from the CT's {geometry.shape_irc}")
    if source is not None and len(source.slice_sop_instance_uids) != mask.shape[0]:
        raise ValueError("the DICOM source has a different number of slices than the mask")
    dataset = _seg_dataset(mask, geometry, source, series_description)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SEGMENTATION_STORAGE
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta = meta
    with atomic_path(Path(path), suffix=DCM_SUFFIX) as tmp_path:
        dataset.save_as(tmp_path, enforce_file_format=True)


def _new_uid() -> str:
    from pydicom.uid import generate_uid

    return generate_uid()


def _code(value: tuple[str, str, str]):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value
    return item


def _ds(value: float) -> str:
    """A Decimal String (at most 16 characters) for ``value``."""
    text = f"{value:.10g}"
    return text if len(text) <= 16 else f"{value:.6g}"


def _seg_dataset(mask: np.ndarray, geometry: Geometry, source: DicomSource | None, series_description: str):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    # SOP Common
    ds.SOPClassUID = SEGMENTATION_STORAGE
    ds.SOPInstanceUID = _new_uid()
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    # Patient, General Study
    ds.PatientName = source.patient_name if source else ""
    ds.PatientID = source.patient_id if source else ""
    ds.PatientBirthDate = source.patient_birth_date if source else ""
    ds.PatientSex = source.patient_sex if source else ""
    ds.StudyInstanceUID = source.study_instance_uid if source else _new_uid()
    ds.StudyDate = source.study_date if source else date
    ds.StudyTime = source.study_time if source else time
    ds.ReferringPhysicianName = source.referring_physician_name if source else ""
    ds.StudyID = source.study_id if source else ""
    ds.AccessionNumber = source.accession_number if source else ""
    # General Series, Segmentation Series
    ds.Modality = "SEG"
    ds.SeriesInstanceUID = _new_uid()
    ds.SeriesNumber = 1
    ds.SeriesDescription = series_description
    ds.SeriesDate, ds.SeriesTime = date, time
    # Frame of Reference
    ds.FrameOfReferenceUID = source.frame_of_reference_uid if source else _new_uid()
    ds.PositionReferenceIndicator = ""
    # General Equipment, Enhanced General Equipment
    ds.Manufacturer = ALGORITHM_NAME
    ds.ManufacturerModelName = ALGORITHM_NAME
    ds.DeviceSerialNumber = "1"
    ds.SoftwareVersions = _version()
    # General Image, Segmentation Image
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = date, time
    ds.ContentLabel = "NODULES"
    ds.ContentDescription = "nodule segmentation"
    ds.ContentCreatorName = ""
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.SegmentationType = "BINARY"
    ds.LossyImageCompression = "00"
    # Image Pixel
    slices = segmented_slices(mask)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(mask.shape[1]), int(mask.shape[2])
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit = 0
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = int(slices.size)
    packed = np.packbits(mask[slices].reshape(-1), bitorder="little").tobytes()
    ds.PixelData = packed + (b"\0" if len(packed) % 2 else b"")
    # Segment Sequence
    segment = Dataset()
    segment.SegmentNumber = 1
    segment.SegmentLabel = SEGMENT_LABEL
    segment.SegmentAlgorithmType = "AUTOMATIC"
    segment.SegmentAlgorithmName = ALGORITHM_NAME
    segment.SegmentedPropertyCategoryCodeSequence = Sequence([_code(CATEGORY_CODE)])
    segment.SegmentedPropertyTypeCodeSequence = Sequence([_code(TYPE_CODE)])
    ds.SegmentSequence = Sequence([segment])
    if source is not None:
        ds.ReferencedSeriesSequence = Sequence([_referenced_series(source)])
    # Multi-frame Dimension: frames are ordered by the segment, then by position
    ds.DimensionOrganizationType = "3D"
    organization_uid = _new_uid()
    organization = Dataset()
    organization.DimensionOrganizationUID = organization_uid
    ds.DimensionOrganizationSequence = Sequence([organization])
    ds.DimensionIndexSequence = Sequence([
        _dimension(organization_uid, 0x0062000B, 0x0062000A, "ReferencedSegmentNumber"),
        _dimension(organization_uid, 0x00200032, 0x00209113, "ImagePositionPatient"),
    ])
    # Multi-frame Functional Groups
    ds.SharedFunctionalGroupsSequence = Sequence([_shared_groups(geometry)])
    ds.PerFrameFunctionalGroupsSequence = Sequence(
        [_frame_groups(geometry, int(index), position + 1, source) for position, index in enumerate(slices)])
    ds.ContentQualification = "RESEARCH"
    return ds


def _version() -> str:
    from p2ch_luna import __version__

    return str(__version__)


def _dimension(organization_uid: str, index_pointer: int, group_pointer: int, label: str):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.DimensionOrganizationUID = organization_uid
    item.DimensionIndexPointer = index_pointer
    item.FunctionalGroupPointer = group_pointer
    item.DimensionDescriptionLabel = label
    return item


def _referenced_series(source: DicomSource):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    series = Dataset()
    series.SeriesInstanceUID = source.series_instance_uid
    instances = []
    for uid in source.slice_sop_instance_uids:
        item = Dataset()
        item.ReferencedSOPClassUID = source.sop_class_uid
        item.ReferencedSOPInstanceUID = uid
        instances.append(item)
    series.ReferencedInstanceSequence = Sequence(instances)
    return series


def _shared_groups(geometry: Geometry):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    spacing = geometry.spacing_xyz
    measures = Dataset()
    measures.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # row spacing, column spacing
    measures.SliceThickness = _ds(spacing[2])
    measures.SpacingBetweenSlices = _ds(spacing[2])
    orientation = Dataset()
    cosines = np.concatenate([geometry.direction[:, 0], geometry.direction[:, 1]])
    orientation.ImageOrientationPatient = [_ds(v) for v in cosines]
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orientation])
    return shared


def _frame_groups(geometry: Geometry, index: int, position_number: int, source: DicomSource | None):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    frame = Dataset()
    content = Dataset()
    content.DimensionIndexValues = [1, position_number]
    frame.FrameContentSequence = Sequence([content])
    position = Dataset()
    position.ImagePositionPatient = [_ds(v) for v in geometry.irc_to_xyz([index, 0, 0])]
    frame.PlanePositionSequence = Sequence([position])
    identification = Dataset()
    identification.ReferencedSegmentNumber = 1
    frame.SegmentIdentificationSequence = Sequence([identification])
    if source is not None:
        image = Dataset()
        image.ReferencedSOPClassUID = source.sop_class_uid
        image.ReferencedSOPInstanceUID = source.slice_sop_instance_uids[index]
        image.PurposeOfReferenceCodeSequence = Sequence([_code(PURPOSE_CODE)])
        derivation = Dataset()
        derivation.DerivationCodeSequence = Sequence([_code(DERIVATION_CODE)])
        derivation.SourceImageSequence = Sequence([image])
        frame.DerivationImageSequence = Sequence([derivation])
    return frame


def read_seg_mask(path: str | os.PathLike, shape_irc: tuple[int, int, int], geometry: Geometry) -> np.ndarray:
    """The ``(I, R, C)`` mask a SEG file written by :func:`write_dicom_seg` holds, frames placed by position."""
    import pydicom

    ds = pydicom.dcmread(path)
    rows, columns, frames = int(ds.Rows), int(ds.Columns), int(ds.NumberOfFrames)
    bits = np.unpackbits(np.frombuffer(ds.PixelData, dtype=np.uint8), bitorder="little",
                         count=frames * rows * columns)
    planes = bits.reshape(frames, rows, columns)
    mask = np.zeros(shape_irc, dtype=np.uint8)
    for plane, frame in zip(planes, ds.PerFrameFunctionalGroupsSequence):
        xyz = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        continuous = geometry.xyz_to_irc_continuous(xyz)
        index = int(np.rint(continuous[0]))
        if not 0 <= index < shape_irc[0] or np.any(np.abs(continuous - np.rint(continuous)) > POSITION_TOLERANCE_VOXELS):
            raise DataError(f"SEG {path}: a frame at {xyz} lies at no slice of the CT")
        mask[index] = plane
    return mask
