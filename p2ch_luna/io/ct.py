"""Read CTs with SimpleITK into one immutable type, :class:`Ct`.

Sources: a LUNA16 MetaImage (``.mhd`` + ``.raw``), a DICOM series folder, or a
NIfTI file (``.nii`` / ``.nii.gz``). Every reader checks what SimpleITK would
otherwise report as a C++ exception (or not at all: zero spacing, a short
``.raw``, a 1-slice volume) and raises :class:`~p2ch_luna.errors.DataError`
with one line naming the file. The format checks live in :mod:`~p2ch_luna.io.metaimage`,
:mod:`~p2ch_luna.io.nifti` and :mod:`~p2ch_luna.io.dicom`; this module turns what SimpleITK read into a
:class:`Ct`, writes MetaImages and finds LUNA16 series on disk.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from numpy.typing import ArrayLike

from p2ch_luna.errors import DataError, LunaError, simpleitk_message
from p2ch_luna.geometry import Geometry, chunk_bounds
from p2ch_luna.io.dicom import read_dicom_series
from p2ch_luna.io.metaimage import check_metaimage_header
from p2ch_luna.io.nifti import check_nifti_orientation

log = logging.getLogger(__name__)

HU_MIN = -1000
"""Lower HU clip (air), as in the book."""
HU_MAX = 1000
"""Upper HU clip (dense bone and metal are clipped), as in the book."""
MIN_SLICES = 3
"""Fewest slices a usable CT may have (segmentation needs slice context)."""

_INT16_INFO = np.iinfo(np.int16)
_HU_PIXEL_TYPES = {
    sitk.sitkInt8, sitk.sitkUInt8, sitk.sitkInt16, sitk.sitkUInt16, sitk.sitkInt32,
    sitk.sitkUInt32, sitk.sitkInt64, sitk.sitkUInt64, sitk.sitkFloat32, sitk.sitkFloat64,
}


@dataclass(frozen=True, eq=False)
class Ct:
    """A CT volume in Hounsfield units with its geometry.

    ``hu`` is a read-only ``int16`` array indexed ``(index, row, col)``.
    """

    hu: np.ndarray
    geometry: Geometry
    series_uid: str
    source: Path | None = None

    def __post_init__(self) -> None:
        if self.hu.dtype != np.int16 or self.hu.ndim != 3:
            raise ValueError("Ct.hu must be a 3-D int16 array")
        self.hu.setflags(write=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.geometry.shape_irc

    def hu_float(self, clip: bool = True) -> np.ndarray:
        """HU as float32, clipped to [HU_MIN, HU_MAX] unless ``clip`` is False."""
        values = self.hu.astype(np.float32)
        if clip:
            np.clip(values, HU_MIN, HU_MAX, out=values)
        return values

    def center_irc(self, center_xyz: ArrayLike) -> np.ndarray:
        """Nearest voxel of a world point; a clear error when it lies outside the CT."""
        irc = self.geometry.xyz_to_irc(center_xyz)
        if not self.geometry.contains_irc(irc):
            xyz = ", ".join(f"{v:.1f}" for v in np.asarray(center_xyz, dtype=float))
            raise DataError(
                f"centre ({xyz}) mm lies outside CT {self.series_uid} "
                f"(voxel {tuple(int(v) for v in irc)}, shape {self.shape})"
            )
        return irc

    def chunk(self, center_xyz: ArrayLike, width_irc: Sequence[int],
              clip: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The ``width_irc`` int16 chunk around a world point and its voxel centre."""
        irc = self.center_irc(center_xyz)
        return extract_chunk(self.hu, irc, width_irc, clip=clip), irc


def extract_chunk(hu: np.ndarray, center_irc: Sequence[int], width_irc: Sequence[int],
                  clip: bool = True, out: np.ndarray | None = None) -> np.ndarray:
    """Cut a ``width_irc`` int16 chunk around ``center_irc`` with the book's border rule.

    Near a border the window shifts to stay inside the volume; where the volume is
    smaller than the window along an axis, the missing part is filled with air.
    ``out`` (an int16 array of shape ``width_irc``) receives the chunk instead of a new array.
    """
    width = tuple(int(n) for n in width_irc)
    bounds = chunk_bounds(center_irc, width, hu.shape)
    region = hu[tuple(slice(start, end) for start, end in bounds)]
    if out is None:
        chunk = np.empty(width, dtype=np.int16)
    elif out.shape != width or out.dtype != np.int16:
        raise ValueError(f"out must be an int16 array of shape {width}, not {out.dtype} {out.shape}")
    else:
        chunk = out
    if region.shape != width:
        chunk.fill(HU_MIN)
    chunk[tuple(slice(0, n) for n in region.shape)] = region
    if clip:
        np.clip(chunk, HU_MIN, HU_MAX, out=chunk)
    return chunk


def load_ct(path: str | Path, series_uid: str | None = None) -> Ct:
    """Load a CT from a ``.mhd``/``.mha``, a NIfTI file or a DICOM series folder.

    ``series_uid`` selects a series when a DICOM folder holds several.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"CT {path} does not exist")
    if path.is_dir():
        image, chosen = read_dicom_series(path, series_uid)
        return _image_to_ct(image, path, chosen)
    name = path.name.lower()
    if name.endswith((".mhd", ".mha")):
        if name.endswith(".mhd"):
            check_metaimage_header(path)
        return _image_to_ct(_read_image(path), path, series_uid or path.stem)
    if name.endswith((".nii", ".nii.gz")):
        check_nifti_orientation(path)
        stem = path.name[: -len(".nii.gz")] if name.endswith(".nii.gz") else path.stem
        return _image_to_ct(_read_image(path), path, series_uid or stem)
    raise DataError(f"CT {path}: unknown format (expected .mhd, .mha, .nii, .nii.gz or a DICOM folder)")


def to_image(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """``array`` ``(I, R, C)`` as a SimpleITK image with ``geometry``'s origin, spacing and direction."""
    image = sitk.GetImageFromArray(array)
    image.SetOrigin(tuple(float(v) for v in geometry.origin_xyz))
    image.SetSpacing(tuple(float(v) for v in geometry.spacing_xyz))
    image.SetDirection(tuple(float(v) for v in geometry.direction.reshape(-1)))
    return image


def write_image(image: sitk.Image, path: str | os.PathLike) -> None:
    """``sitk.WriteImage`` (uncompressed); a failed write is an ``OSError`` naming the file and the reason.

    SimpleITK reports one (disk full, no permission) as a multi-line ``RuntimeError``.
    """
    try:
        sitk.WriteImage(image, str(path), useCompression=False)
    except RuntimeError as error:
        raise OSError(f"{Path(path).name}: {write_failure_reason(error)}") from error


def write_failure_reason(error: RuntimeError) -> str:
    """The one "Reason:" line of a failed ``sitk.WriteImage``'s multi-line ``RuntimeError``."""
    return next((line.removeprefix("Reason: ") for line in str(error).splitlines()
                 if line.startswith("Reason: ")), "SimpleITK could not write it")


def write_metaimage(array: np.ndarray, geometry: Geometry, path: str | os.PathLike) -> None:
    """Write ``array`` with ``geometry`` as uncompressed MetaImage ``path`` (``.mhd`` + ``.raw``).

    Both files are written into a staging folder beside ``path`` and moved into
    place only once both are complete, so an interrupted write leaves no torn CT.
    A failed write is a one-line :class:`~p2ch_luna.errors.LunaError`.
    """
    target = Path(path)
    staging = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".write-", dir=target.parent))
        write_image(to_image(array, geometry), staging / target.name)
        raw_name = target.with_suffix(".raw").name
        os.replace(staging / raw_name, target.with_suffix(".raw"))
        os.replace(staging / target.name, target)
    except OSError as error:
        raise LunaError(f"could not write {target}: {error.strerror or error}") from error
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


SERIES_PATTERNS = ("{uid}.mhd", "subset*/{uid}.mhd", "subset*/*/{uid}.mhd")
"""Where a series' ``.mhd`` may lie under a data root, first match wins: the root itself, the
LUNA16 ``subset<k>/`` folders, and one folder deeper (``subset0/subset0/`` from unzipping a
subset archive into a folder of its own name)."""


def find_series_path(data_root: str | Path, series_uid: str) -> Path:
    """Path of ``<series_uid>.mhd`` under ``data_root`` (see ``SERIES_PATTERNS``)."""
    root = Path(data_root)
    for pattern in SERIES_PATTERNS:
        for candidate in sorted(root.glob(pattern.format(uid=glob.escape(series_uid)))):
            if candidate.is_file():
                return candidate
    raise DataError(f"series UID {series_uid} not found under {root}/subset*/ (no {series_uid}.mhd)")


def list_series_on_disk(data_root: str | Path) -> dict[str, Path]:
    """Every series' ``.mhd`` under ``data_root`` (see ``SERIES_PATTERNS``), keyed by series UID."""
    root = Path(data_root)
    series: dict[str, Path] = {}
    for pattern in SERIES_PATTERNS:
        for path in sorted(root.glob(pattern.format(uid="*"))):
            if path.is_file():
                series.setdefault(path.stem, path)
    return series


def _read_image(path: Path) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise DataError(f"CT {path} could not be read: {simpleitk_message(error)}") from error


def _image_to_ct(image: sitk.Image, source: Path, series_uid: str) -> Ct:
    if image.GetDimension() != 3:
        raise DataError(f"CT {source} has {image.GetDimension()} dimensions, expected 3")
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetPixelID() not in _HU_PIXEL_TYPES:
        raise DataError(
            f"CT {source} has pixel type {image.GetPixelIDTypeAsString()}, "
            "expected scalar Hounsfield units (e.g. int16)"
        )
    geometry = _checked_geometry(source, image.GetOrigin(), image.GetSpacing(), image.GetDirection(),
                                 image.GetSize())
    values = sitk.GetArrayFromImage(image)
    hu = _to_int16(values, source)
    return Ct(hu=hu, geometry=geometry, series_uid=series_uid, source=source)


def read_geometry(path: str | Path) -> Geometry:
    """The geometry ``load_ct`` gives a ``.mhd``/``.mha``/NIfTI file, from its header alone (SimpleITK
    reads no voxels): milliseconds a file, for checks over a whole dataset."""
    path = Path(path)
    if path.name.lower().endswith(".mhd"):
        check_metaimage_header(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise DataError(f"CT {path} could not be read: {simpleitk_message(error)}") from error
    if reader.GetDimension() != 3:
        raise DataError(f"CT {path} has {reader.GetDimension()} dimensions, expected 3")
    return _checked_geometry(path, reader.GetOrigin(), reader.GetSpacing(), reader.GetDirection(), reader.GetSize())


def _checked_geometry(source: Path, origin: Sequence[float], spacing: Sequence[float], direction: Sequence[float],
                      size_xyz: Sequence[int]) -> Geometry:
    """SimpleITK's geometry of a 3-D image as a ``Geometry``; DataError naming ``source`` where it is unusable."""
    spacing = np.asarray(spacing, dtype=np.float64)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise DataError(f"CT {source} has invalid spacing {tuple(spacing)}: every value must be > 0")
    direction = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-6:
        raise DataError(f"CT {source} has a singular direction matrix {direction.ravel().tolist()}")
    origin = np.asarray(origin, dtype=np.float64)
    if not np.all(np.isfinite(origin)):
        raise DataError(f"CT {source} has a non-finite origin {tuple(origin)}")
    shape_irc = tuple(int(n) for n in reversed(size_xyz))
    if shape_irc[0] < MIN_SLICES:
        raise DataError(f"CT {source} has {shape_irc[0]} slice(s); at least {MIN_SLICES} are needed")
    return Geometry(origin, spacing, direction, shape_irc)


def _to_int16(values: np.ndarray, source: Path) -> np.ndarray:
    if values.dtype == np.int16:
        return values
    if np.issubdtype(values.dtype, np.floating):
        if not np.all(np.isfinite(values)):
            raise DataError(f"CT {source} contains NaN or infinite values")
        values = np.rint(values)
    low, high = values.min(), values.max()
    if low < _INT16_INFO.min or high > _INT16_INFO.max:
        log.warning("CT %s: values %s..%s clipped to the int16 range", source, low, high)
    return np.clip(values, _INT16_INFO.min, _INT16_INFO.max).astype(np.int16)
