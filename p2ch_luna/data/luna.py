"""The LUNA16 index: CSVs to one candidate table, and the train/validation split.

Files read from the data root:

- ``annotations.csv`` (``seriesuid,coordX,coordY,coordZ,diameter_mm``): nodules >= 3 mm;
- ``candidates_V2.csv`` (also inside the ``candidates_V2/`` folder its archive unpacks to)
  or else ``candidates.csv`` (``seriesuid,coordX,coordY,coordZ,class``);
- ``annotations_with_malignancy.csv`` (the book's, optional): ``mal_bool`` per nodule.
  Without it malignancy is unknown (``<NA>``), not False.

The candidate table has one row per candidate and one per annotation::

    series_uid, center_x, center_y, center_z   world centre (mm)
    is_nodule        candidate class (annotation rows: True)
    diameter_mm      diameter of the matching annotation, 0.0 when none
    is_malignant     nullable boolean: False for non-nodules, <NA> when unknown
    has_annotation   the row is, or matches, an annotated nodule
    source           "candidate" or "annotation"

A candidate matches an annotation when every axis of their distance is within
a quarter of the annotation's diameter (the book's chapter 10 rule). The
nodule classifier trains on annotation rows as positives and class-0
candidates as negatives (the book's chapter 14 choice); class-1 candidate rows
are kept for analysis.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from p2ch_luna.columns import XYZ_COLUMNS
from p2ch_luna.errors import DataError
from p2ch_luna.io.ct import list_series_on_disk

log = logging.getLogger(__name__)

ANNOTATIONS_FILE = "annotations.csv"
CANDIDATES_FILES = ("candidates_V2.csv", "candidates_V2/candidates_V2.csv", "candidates.csv")
"""Looked for in this order under the data root; the first that exists is read."""
MALIGNANCY_FILE = "annotations_with_malignancy.csv"
EXCLUDED_FILE = "annotations_excluded.csv"
"""LUNA16's findings that are neither nodules nor false positives in its FROC (optional)."""
VALIDATION_STRIDE = 10
"""Every 10th series (sorted by UID) is validation, as in the book."""
DIAMETER_MATCH_FRACTION = 0.25
"""A candidate takes an annotation's diameter within diameter/4 on every axis (book ch. 10)."""
MALIGNANCY_MATCH_FRACTION = 0.5
"""A malignancy row belongs to an annotation within its radius."""

TABLE_COLUMNS = ["series_uid", "center_x", "center_y", "center_z", "is_nodule",
                 "diameter_mm", "is_malignant", "has_annotation", "source"]


def read_csv_checked(path: str | Path, required_columns: Sequence[str],
                     numeric_columns: Sequence[str] = (), what: str = "CSV") -> pd.DataFrame:
    """Read a CSV and check its columns and numbers, with one-line errors naming the row.

    Blank lines are skipped; exact duplicate rows are dropped with a warning.
    Row numbers in messages are 1-based file lines (the header is line 1).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=True)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as error:
        raise DataError(f"{what} {path} could not be parsed: {str(error).splitlines()[0]}") from None
    if not isinstance(frame.index, pd.RangeIndex):  # pandas took the extra leading fields for an index
        raise DataError(f"{what} {path}: its first data row has more fields than the header's "
                        f"{len(frame.columns)} columns")
    frame.columns = [str(column).strip() for column in frame.columns]
    missing = [column for column in required_columns if column not in frame.columns]
    if missing:
        raise DataError(f"{what} {path} lacks column(s) {', '.join(missing)} (has: {', '.join(frame.columns)})")
    frame = frame[list(required_columns)].copy()
    for column in required_columns:
        frame[column] = frame[column].str.strip()
    line_numbers = frame.index.to_numpy() + 2
    for column in numeric_columns:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = ~np.isfinite(values.to_numpy(dtype=float, na_value=np.nan))
        if bad.any():
            first = int(np.argmax(bad))
            raise DataError(
                f"{what} {path} row {line_numbers[first]}: {column} = {frame[column].iloc[first]!r} is not a finite number"
            )
        frame[column] = values.astype(float)
    empty_uid = frame[required_columns[0]] == ""
    if empty_uid.any():
        first = int(np.argmax(empty_uid.to_numpy()))
        raise DataError(f"{what} {path} row {line_numbers[first]}: empty {required_columns[0]}")
    duplicated = frame.duplicated()
    if duplicated.any():
        log.warning("%s %s: dropped %d duplicate row(s), first at row %d", what, path,
                    int(duplicated.sum()), line_numbers[int(np.argmax(duplicated.to_numpy()))])
        frame = frame[~duplicated]
    return frame.reset_index(drop=True)


def _check_range(frame: pd.DataFrame, path: Path, column: str, valid: np.ndarray, expectation: str,
                 what: str) -> None:
    if not valid.all():
        first = int(np.argmax(~valid))
        raise DataError(f"{what} {path} row {first + 2}: {column} = {frame[column].iloc[first]} {expectation}")


def read_annotations(path: str | Path) -> pd.DataFrame:
    """``annotations.csv`` as ``series_uid, center_x/y/z, diameter_mm``."""
    path = Path(path)
    frame = read_csv_checked(path, ["seriesuid", *XYZ_COLUMNS, "diameter_mm"],
                             [*XYZ_COLUMNS, "diameter_mm"], what="annotations")
    _check_range(frame, path, "diameter_mm", frame["diameter_mm"].to_numpy() > 0, "must be > 0", "annotations")
    return _rename_coordinates(frame)


def read_candidates(path: str | Path) -> pd.DataFrame:
    """``candidates.csv`` as ``series_uid, center_x/y/z, is_nodule``."""
    path = Path(path)
    frame = read_csv_checked(path, ["seriesuid", *XYZ_COLUMNS, "class"], [*XYZ_COLUMNS, "class"],
                             what="candidates")
    _check_range(frame, path, "class", frame["class"].isin([0.0, 1.0]).to_numpy(), "must be 0 or 1", "candidates")
    frame["is_nodule"] = frame.pop("class").astype(bool)
    return _rename_coordinates(frame)


def read_malignancy(path: str | Path) -> pd.DataFrame:
    """The book's ``annotations_with_malignancy.csv`` as ``series_uid, center_x/y/z, diameter_mm, is_malignant``."""
    path = Path(path)
    frame = read_csv_checked(path, ["seriesuid", *XYZ_COLUMNS, "diameter_mm", "mal_bool"],
                             [*XYZ_COLUMNS, "diameter_mm"], what="malignancy annotations")
    flags = frame["mal_bool"].str.lower()
    valid = flags.isin(["true", "false", "1", "0"]).to_numpy()
    _check_range(frame, path, "mal_bool", valid, "must be True or False", "malignancy annotations")
    frame["is_malignant"] = flags.isin(["true", "1"])
    return _rename_coordinates(frame.drop(columns="mal_bool"))


def _rename_coordinates(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.rename(columns={"seriesuid": "series_uid", "coordX": "center_x",
                                 "coordY": "center_y", "coordZ": "center_z"})


def _centers(frame: pd.DataFrame) -> np.ndarray:
    return frame[["center_x", "center_y", "center_z"]].to_numpy(dtype=np.float64)


def attach_malignancy(annotations: pd.DataFrame, malignancy: pd.DataFrame | None) -> pd.Series:
    """Nullable malignancy per annotation: the nearest malignancy row within the radius."""
    result = pd.Series(pd.NA, index=annotations.index, dtype="boolean")
    if malignancy is None or malignancy.empty:
        return result
    grouped = dict(tuple(malignancy.groupby("series_uid", sort=False)))
    for uid, group in annotations.groupby("series_uid", sort=False):
        rows = grouped.get(uid)
        if rows is None:
            continue
        distance = np.linalg.norm(_centers(group)[:, None, :] - _centers(rows)[None, :, :], axis=2)
        nearest = distance.argmin(axis=1)
        close = distance[np.arange(len(group)), nearest] <= MALIGNANCY_MATCH_FRACTION * group["diameter_mm"].to_numpy()
        values = rows["is_malignant"].to_numpy()[nearest]
        result.loc[group.index[close]] = values[close]
    return result


def match_candidate_diameters(candidates: pd.DataFrame, annotations: pd.DataFrame) -> np.ndarray:
    """Index into ``annotations`` of each candidate's matching nodule, -1 for none (book ch. 10 rule)."""
    matched = np.full(len(candidates), -1, dtype=np.int64)
    annotation_groups = {uid: group.index.to_numpy() for uid, group in annotations.groupby("series_uid", sort=False)}
    annotation_centers = _centers(annotations)
    annotation_limits = annotations["diameter_mm"].to_numpy() * DIAMETER_MATCH_FRACTION
    positions = np.arange(len(candidates))
    for uid, group in candidates.groupby("series_uid", sort=False):
        rows = annotation_groups.get(uid)
        if rows is None:
            continue
        delta = np.abs(_centers(group)[:, None, :] - annotation_centers[rows][None, :, :])
        hits = np.all(delta <= annotation_limits[rows][None, :, None], axis=2)
        has_hit = hits.any(axis=1)
        first = hits.argmax(axis=1)
        group_positions = positions[candidates.index.get_indexer(group.index)]
        matched[group_positions[has_hit]] = rows[first[has_hit]]
    return matched


def find_candidates_file(data_root: Path) -> Path:
    for name in CANDIDATES_FILES:
        if (data_root / name).is_file():
            return data_root / name
    raise DataError(f"no {' or '.join(CANDIDATES_FILES)} in {data_root}")


def build_candidate_table(candidates: pd.DataFrame, annotations: pd.DataFrame,
                          malignancy: pd.DataFrame | None = None) -> pd.DataFrame:
    """Combine parsed CSVs into the candidate table described in the module docstring."""
    annotations = annotations.reset_index(drop=True)
    candidates = candidates.reset_index(drop=True)
    annotation_malignancy = attach_malignancy(annotations, malignancy)

    matched = match_candidate_diameters(candidates, annotations)
    has_match = matched >= 0
    diameters = np.where(has_match, annotations["diameter_mm"].to_numpy()[np.maximum(matched, 0)], 0.0)
    candidate_malignancy = pd.Series(False, index=candidates.index, dtype="boolean")
    nodule_rows = candidates["is_nodule"].to_numpy()
    candidate_malignancy[nodule_rows] = pd.NA
    match_rows = nodule_rows & has_match
    candidate_malignancy[match_rows] = annotation_malignancy.to_numpy()[matched[match_rows]]

    candidate_rows = pd.DataFrame({
        "series_uid": candidates["series_uid"],
        "center_x": candidates["center_x"], "center_y": candidates["center_y"], "center_z": candidates["center_z"],
        "is_nodule": candidates["is_nodule"].astype(bool),
        "diameter_mm": diameters,
        "is_malignant": candidate_malignancy,
        "has_annotation": has_match,
        "source": "candidate",
    })
    annotation_rows = pd.DataFrame({
        "series_uid": annotations["series_uid"],
        "center_x": annotations["center_x"], "center_y": annotations["center_y"], "center_z": annotations["center_z"],
        "is_nodule": True,
        "diameter_mm": annotations["diameter_mm"],
        "is_malignant": annotation_malignancy,
        "has_annotation": True,
        "source": "annotation",
    })
    table = pd.concat([annotation_rows, candidate_rows], ignore_index=True)
    table["is_nodule"] = table["is_nodule"].astype(bool)
    table["has_annotation"] = table["has_annotation"].astype(bool)
    table["is_malignant"] = table["is_malignant"].astype("boolean")
    # Deterministic order, largest nodules first as in the book.
    table = table.sort_values(["is_nodule", "diameter_mm", "series_uid", "center_x", "center_y", "center_z"],
                              ascending=[False, False, True, True, True, True], kind="mergesort")
    return table.reset_index(drop=True)[TABLE_COLUMNS]


def read_candidate_table(data_root: str | Path, require_on_disk: bool = True,
                         candidates_file: str | Path | None = None) -> pd.DataFrame:
    """Read the LUNA16 CSVs under ``data_root`` into the candidate table.

    With ``require_on_disk`` (the default) only series whose ``.mhd`` exists
    under ``data_root`` (``ct.SERIES_PATTERNS``: ``subset*/`` and the like) are kept.
    """
    root = Path(data_root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    annotations = read_annotations(root / ANNOTATIONS_FILE)
    candidates = read_candidates(Path(candidates_file) if candidates_file else find_candidates_file(root))
    malignancy_path = root / MALIGNANCY_FILE
    malignancy = read_malignancy(malignancy_path) if malignancy_path.is_file() else None
    if malignancy is None:
        log.info("no %s in %s: malignancy is unknown", MALIGNANCY_FILE, root)
    table = build_candidate_table(candidates, annotations, malignancy)
    if require_on_disk:
        on_disk = set(list_series_on_disk(root))
        keep = table["series_uid"].isin(on_disk)
        if not keep.all():
            log.info("%d of %d series in the CSVs are not on disk; their rows are skipped",
                     table.loc[~keep, "series_uid"].nunique(), table["series_uid"].nunique())
        table = table[keep].reset_index(drop=True)
    return table


def split_by_series(series_uids: Iterable[str], val_stride: int = VALIDATION_STRIDE) -> tuple[list[str], list[str]]:
    """Book split: sort the unique UIDs; every ``val_stride``-th (from the first) is validation."""
    if val_stride < 2:
        raise ValueError("val_stride must be at least 2")
    ordered = sorted(set(series_uids))
    validation = ordered[::val_stride]
    validation_set = set(validation)
    return [uid for uid in ordered if uid not in validation_set], validation
