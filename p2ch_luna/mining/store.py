"""The mined-candidates table beside the cache: versioned, keyed by what made it, written atomically.

``<cache-dir>/mined/<key>/`` holds ``meta.json`` (the key and what it was made from), one
``series/<series_uid>.csv`` per mined series (so an interrupted run resumes where it stopped) and
``candidates.csv``, the whole table, written last. The key is a hash of the segmentation checkpoint's bytes,
the grouping parameters, the mined series (with the size and time of their files), the annotations file and
``MINING_VERSION``: change any of them and the table is mined anew. A table whose files do not parse, lack
columns or carry another key is not used (it is mined again).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from p2ch_luna.diagnose.pipeline import DiagnoseConfig
from p2ch_luna.io.atomic import atomic_write_text

log = logging.getLogger(__name__)

MINING_VERSION = 1
"""Bump when what a mined table holds changes (columns, labelling rule, grouping code)."""
MINED_COLUMNS = ("series_uid", "center_x", "center_y", "center_z", "diameter_mm", "voxel_count", "is_nodule")
TABLE_FILE = "candidates.csv"
META_FILE = "meta.json"
SERIES_FOLDER = "series"
KEY_LENGTH = 20
"""Hex digits of the key that name the folder (the full key is in ``meta.json``)."""


@dataclasses.dataclass(frozen=True)
class MiningParams:
    """The grouping that mining runs: the diagnosis' defaults (read from ``DiagnoseConfig``), so the table holds
    what diagnosis would."""

    segmentation_threshold: float = DiagnoseConfig.segmentation_threshold
    erosion_iterations: int = DiagnoseConfig.erosion_iterations
    grouping: str = DiagnoseConfig.grouping
    max_shell_fill: float | None = DiagnoseConfig.max_shell_fill
    min_diameter_mm: float = DiagnoseConfig.min_diameter_mm
    lung_margin_mm: float = DiagnoseConfig.lung_margin_mm


def series_stamp(path: Path) -> list[Any]:
    """What identifies a series file without reading its voxels: name, size and modification time of the
    file and, for a ``.mhd``, of its ``.raw``."""
    stamp: list[Any] = []
    for part in (path, path.with_suffix(".raw")):
        if part.is_file():
            stat = part.stat()
            stamp.extend([part.name, stat.st_size, stat.st_mtime_ns])
    return stamp


def mining_key(segmentation_digest: str, params: MiningParams, series: Mapping[str, Path],
               annotations_digest: str) -> str:
    """The hash that names a mined table (see the module docstring)."""
    payload = {
        "version": MINING_VERSION,
        "segmentation": segmentation_digest,
        "params": dataclasses.asdict(params),
        "series": {uid: series_stamp(Path(path)) for uid, path in sorted(series.items())},
        "annotations": annotations_digest,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def table_folder(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / "mined" / key[:KEY_LENGTH]


def read_checked(path: Path) -> pd.DataFrame | None:
    """A mined CSV with every column of ``MINED_COLUMNS``; None (with a warning) when it is unreadable."""
    try:
        frame = pd.read_csv(path, dtype={"series_uid": str})
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        log.warning("mined table %s is unreadable (%s); mining it again", path, error)
        return None
    missing = [column for column in MINED_COLUMNS if column not in frame.columns]
    if missing:
        log.warning("mined table %s lacks column(s) %s; mining it again", path, ", ".join(missing))
        return None
    if frame[list(MINED_COLUMNS)].isna().any().any():
        log.warning("mined table %s has empty values; mining it again", path)
        return None
    frame["is_nodule"] = frame["is_nodule"].astype(str).str.lower().isin(("true", "1"))
    return frame[list(MINED_COLUMNS)]


def load_table(folder: Path, key: str) -> pd.DataFrame | None:
    """The complete table in ``folder`` if it was made under ``key``; else None."""
    meta_path = folder / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("key") != key or not (folder / TABLE_FILE).is_file():
        return None
    return read_checked(folder / TABLE_FILE)


def load_series(folder: Path, series_uid: str) -> pd.DataFrame | None:
    """One series' mined rows from an earlier, interrupted run; None when absent or unusable."""
    path = folder / SERIES_FOLDER / f"{series_uid}.csv"
    return read_checked(path) if path.is_file() else None


def save_series(folder: Path, series_uid: str, table: pd.DataFrame) -> None:
    (folder / SERIES_FOLDER).mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / SERIES_FOLDER / f"{series_uid}.csv", table[list(MINED_COLUMNS)].to_csv(index=False))


def start_table(folder: Path, key: str, inputs: Mapping[str, Any]) -> None:
    """Claim ``folder`` for ``key``: a folder left by another key (a stale table) is emptied first."""
    meta_path = folder / META_FILE
    try:
        previous = json.loads(meta_path.read_text()).get("key")
    except (OSError, ValueError):
        previous = None
    if previous != key:
        for stale in (folder / TABLE_FILE, *sorted((folder / SERIES_FOLDER).glob("*.csv"))):
            stale.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(meta_path, json.dumps({"key": key, **inputs}, indent=2, sort_keys=True, default=str))


def finish_table(folder: Path, tables: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Join the series' tables into ``candidates.csv`` (atomically) and return it."""
    table = pd.concat(list(tables), ignore_index=True) if tables else pd.DataFrame(columns=list(MINED_COLUMNS))
    table = table[list(MINED_COLUMNS)]
    atomic_write_text(folder / TABLE_FILE, table.to_csv(index=False))
    return table
