"""One submission from several folds' findings: LUNA16's ten-fold protocol scores them as one.

Each fold's ``findings.csv`` holds the detections of the series it held out; the folds are disjoint,
so a series found in two files means two runs scored it (a fold diagnosed twice, or folds drawn from
different splits), and the merge refuses it rather than let one scan count twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from p2ch_luna.columns import SERIES_COLUMN
from p2ch_luna.errors import DataError


def check_disjoint(series_by_source: Sequence[tuple[Path, Sequence[str]]], what: str) -> None:
    """A DataError naming the first series that two sources both hold (and both sources)."""
    owner: dict[str, Path] = {}
    for source, uids in series_by_source:
        for uid in dict.fromkeys(uids):
            if uid in owner:
                raise DataError(f"series {uid} is in two {what}: {owner[uid]} and {source} "
                                "(each fold's series must be scored once)")
            owner[uid] = source


def merge_findings(findings: Sequence[tuple[Path, pd.DataFrame]]) -> pd.DataFrame:
    """The rows of every ``(path, findings)`` in order, as one table; each series must lie in one file only."""
    check_disjoint([(path, frame[SERIES_COLUMN].astype(str).tolist()) for path, frame in findings],
                   "findings files")
    return pd.concat([frame for _, frame in findings], ignore_index=True)


def merge_series_lists(series_lists: Sequence[tuple[Path, Sequence[str]]]) -> list[str]:
    """The UIDs of every list, in order; each series must lie in one list only."""
    check_disjoint(series_lists, "series lists")
    return [uid for _, uids in series_lists for uid in uids]
