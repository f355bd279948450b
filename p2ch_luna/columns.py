"""Column names of the tables passed between stages, and the check that a table has them.

LUNA16's CSVs and submissions name a series ``seriesuid`` and a centre ``coordX/Y/Z`` (world mm);
our candidate and nodule tables use ``series_uid`` and ``center_x/y/z``.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

SERIES_COLUMN = "seriesuid"
XYZ_COLUMNS = ("coordX", "coordY", "coordZ")
DIAMETER_COLUMN = "diameter_mm"
PROBABILITY_COLUMN = "probability"
CENTER_COLUMNS = ("center_x", "center_y", "center_z")


def require_columns(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    """Raise ValueError naming the columns of ``columns`` that ``frame`` (described as ``what``) lacks."""
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {', '.join(missing)}")
