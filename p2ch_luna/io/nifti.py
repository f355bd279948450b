"""NIfTI checks: a file with neither a qform nor an sform has no known orientation and is refused.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

from p2ch_luna.errors import DataError

NIFTI_QFORM_OFFSET = 252


def check_nifti_orientation(path: Path) -> None:
    """Refuse NIfTI files with neither a qform nor an sform: their orientation is unknown."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            header = handle.read(348)
    except OSError as error:
        raise DataError(f"CT {path} could not be read: {error}") from error
    if len(header) < 348:
        raise DataError(f"CT {path} is not a NIfTI file (header too short)")
    for endian in ("<", ">"):
        if struct.unpack(endian + "i", header[:4])[0] == 348:
            qform, sform = struct.unpack(endian + "hh", header[NIFTI_QFORM_OFFSET:NIFTI_QFORM_OFFSET + 4])
            if qform <= 0 and sform <= 0:
                raise DataError(f"CT {path} has no orientation (qform_code and sform_code are 0)")
            return
    raise DataError(f"CT {path} is not a NIfTI-1 file")
