"""Binary masks as compressed NIfTI (``.nii.gz``) with the CT's origin, spacing and direction.

A nodule mask is mostly zeros: gzip makes it a small fraction of the
uncompressed MetaImage (``.mhd`` + ``.raw``) the same voxels would take.
The file is written under a temporary name ending in ``.nii.gz`` beside the
target (SimpleITK picks the format from the extension) and moved into place
with ``os.replace``, so a failed write leaves no partial file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from p2ch_luna.errors import LunaError
from p2ch_luna.geometry import Geometry
from p2ch_luna.io.atomic import atomic_path
from p2ch_luna.io.ct import to_image, write_failure_reason

NIFTI_SUFFIX = ".nii.gz"


def write_nifti_mask(mask: np.ndarray, geometry: Geometry, path: str | os.PathLike) -> None:
    """Write the ``(I, R, C)`` mask ``mask`` as uint8 gzip NIfTI ``path`` with ``geometry``; atomic."""
    target = Path(path)
    if not target.name.endswith(NIFTI_SUFFIX):
        raise ValueError(f"a NIfTI mask file name ends in {NIFTI_SUFFIX}: {target.name}")
    image = to_image(np.asarray(mask, dtype=np.uint8), geometry)
    with atomic_path(target, suffix=NIFTI_SUFFIX) as tmp_path:
        try:
            sitk.WriteImage(image, str(tmp_path), useCompression=True)
        except RuntimeError as error:
            raise LunaError(f"could not write {target}: {write_failure_reason(error)}") from error
