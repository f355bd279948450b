"""DICOM series folders: choose the CT series (``series_uid`` where a folder holds several), refuse missing or
duplicated slices, and read the series with SimpleITK.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import numpy as np
import SimpleITK as sitk

from p2ch_luna.errors import DataError, simpleitk_message

MODALITY_TAG = "0008|0060"


POSITION_TAG = "0020|0032"

ORIENTATION_TAG = "0020|0037"

SLICE_GAP_TOLERANCE = 0.1
"""Largest relative deviation of a DICOM slice step from the median before it is a gap."""


def read_dicom_series(folder: Path, series_uid: str | None) -> tuple[sitk.Image, str]:
    """The chosen CT series of ``folder`` as a SimpleITK image, and its series UID."""
    series_ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ())
    if not series_ids:
        raise DataError(f"DICOM folder {folder} holds no DICOM series")
    if series_uid is not None:
        if series_uid not in series_ids:
            raise DataError(f"DICOM folder {folder} has no series {series_uid} (it has {', '.join(series_ids)})")
        chosen = series_uid
    else:
        ct_series = [uid for uid in series_ids if dicom_modality(folder, uid) == "CT"]
        if not ct_series:
            raise DataError(f"DICOM folder {folder} holds no CT series")
        if len(ct_series) > 1:
            raise DataError(
                f"DICOM folder {folder} holds {len(ct_series)} CT series ({', '.join(ct_series)}); "
                "choose one with --series-uid"
            )
        chosen = ct_series[0]
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), chosen))
    modality = read_dicom_tag(files[0], MODALITY_TAG)
    if modality != "CT":
        raise DataError(f"DICOM series {chosen} in {folder} has modality {modality or 'unknown'}, not CT")
    check_slice_spacing(folder, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise DataError(f"DICOM series {chosen} in {folder} could not be read: {simpleitk_message(error)}") from error
    return image, chosen


def dicom_modality(folder: Path, series_uid: str) -> str:
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid)
    return read_dicom_tag(files[0], MODALITY_TAG) if files else ""


def read_dicom_info(file_name: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file_name)
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise DataError(f"DICOM file {file_name} could not be read: {simpleitk_message(error)}") from error
    return reader


def read_dicom_tag(file_name: str, tag: str) -> str:
    reader = read_dicom_info(file_name)
    return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""


def check_slice_spacing(folder: Path, files: Iterable[str]) -> None:
    """Refuse series with missing slices: their geometry would be silently wrong."""
    positions = []
    normal = None
    for file_name in files:
        reader = read_dicom_info(file_name)
        if not reader.HasMetaDataKey(POSITION_TAG):
            return
        position = np.array([float(v) for v in re.split(r"\\", reader.GetMetaData(POSITION_TAG))])
        if normal is None:
            if reader.HasMetaDataKey(ORIENTATION_TAG):
                cosines = [float(v) for v in reader.GetMetaData(ORIENTATION_TAG).split("\\")]
                normal = np.cross(cosines[:3], cosines[3:])
            else:
                normal = np.array([0.0, 0.0, 1.0])
        positions.append(float(position @ normal))
    if len(positions) < 3:
        return
    steps = np.diff(np.sort(positions))
    median = float(np.median(steps))
    if median <= 0:
        raise DataError(f"DICOM folder {folder}: slices share the same position (duplicate slices)")
    worst = int(np.argmax(np.abs(steps - median)))
    if abs(steps[worst] - median) > SLICE_GAP_TOLERANCE * median:
        raise DataError(
            f"DICOM folder {folder}: slice spacing jumps from {median:.2f} mm to {steps[worst]:.2f} mm "
            f"after slice {worst + 1} of {len(positions)} (missing or duplicated slices)"
        )
