"""MetaImage (``.mhd``) header checks: what SimpleITK would report as a C++ exception, or not at all (a short
``.raw``, zero spacing, a type that cannot hold Hounsfield units), as one-line DataErrors naming the file.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from p2ch_luna.errors import DataError

METAIMAGE_ELEMENT_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4,
    "MET_UINT": 4, "MET_LONG": 8, "MET_ULONG": 8, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4, "MET_DOUBLE": 8,
}

METAIMAGE_HU_TYPES = {"MET_SHORT", "MET_USHORT", "MET_INT", "MET_UINT", "MET_FLOAT", "MET_DOUBLE"}


def read_metaimage_header(path: Path) -> dict[str, str]:
    """The ``key = value`` pairs of a MetaImage header (up to ``ElementDataFile``)."""
    try:
        raw = path.read_bytes()[:65536]
    except OSError as error:
        raise DataError(f"CT {path} could not be read: {error.strerror}") from error
    header: dict[str, str] = {}
    for line_number, line in enumerate(raw.decode("latin-1").splitlines(), start=1):
        if not line.strip():
            continue
        key, separator, value = line.partition("=")
        if not separator:
            raise DataError(f"CT header {path} line {line_number}: expected 'Key = Value', got {line.strip()[:60]!r}")
        header[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break
    return header


def parse_numbers(path: Path, header: dict[str, str], key: str, count: int, kind: type) -> list:
    text = header.get(key)
    if text is None:
        raise DataError(f"CT header {path} has no {key}")
    try:
        numbers = [kind(token) for token in text.split()]
    except ValueError:
        raise DataError(f"CT header {path}: {key} = {text!r} is not {count} numbers") from None
    if len(numbers) != count:
        raise DataError(f"CT header {path}: {key} = {text!r} is not {count} numbers")
    return numbers


def check_metaimage_header(path: Path) -> None:
    header = read_metaimage_header(path)
    ndims = parse_numbers(path, header, "NDims", 1, int)[0]
    if ndims != 3:
        raise DataError(f"CT header {path}: NDims = {ndims}, expected 3")
    dims = parse_numbers(path, header, "DimSize", 3, int)
    if min(dims) <= 0:
        raise DataError(f"CT header {path}: DimSize = {dims} must be positive")
    spacing_key = "ElementSpacing" if "ElementSpacing" in header else "ElementSize"
    if spacing_key in header:
        spacing = parse_numbers(path, header, spacing_key, 3, float)
        if not all(np.isfinite(spacing)) or min(spacing) <= 0:
            raise DataError(f"CT header {path}: {spacing_key} = {spacing} must be > 0")
    element_type = header.get("ElementType")
    if element_type not in METAIMAGE_ELEMENT_BYTES:
        raise DataError(f"CT header {path}: unknown ElementType {element_type!r}")
    if element_type not in METAIMAGE_HU_TYPES:
        raise DataError(f"CT header {path}: ElementType {element_type} cannot hold Hounsfield units (expected MET_SHORT)")
    if "ElementNumberOfChannels" in header and parse_numbers(path, header, "ElementNumberOfChannels", 1, int) != [1]:
        raise DataError(f"CT header {path}: more than one channel per voxel")
    data_file = header.get("ElementDataFile")
    if not data_file:
        raise DataError(f"CT header {path} has no ElementDataFile")
    compressed = header.get("CompressedData", "False").lower() == "true"
    if data_file == "LOCAL" or compressed or data_file.startswith("LIST") or "%" in data_file:
        return
    raw_path = path.parent / data_file
    if not raw_path.is_file():
        raise DataError(f"CT {path}: its data file {raw_path} is missing")
    expected = math.prod(dims) * METAIMAGE_ELEMENT_BYTES[element_type]  # Python ints: no overflow
    header_size = parse_numbers(path, header, "HeaderSize", 1, int)[0] if "HeaderSize" in header else 0
    actual = raw_path.stat().st_size - max(header_size, 0)
    if actual < expected:
        raise DataError(f"CT {path}: data file {raw_path} holds {actual} bytes, expected {expected} (truncated)")
