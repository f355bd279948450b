"""The book's chapter-14 confusion table (``p2ch14/diagnose.py: match_and_score``)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from p2ch_luna.columns import CENTER_COLUMNS, require_columns
from p2ch_luna.metrics.classification import DEFAULT_CLASSIFICATION_THRESHOLD

BOOK_MATCH_DIAMETER_FRACTION = 0.7
CONFUSION_ROWS = ("Non-nodule", "Benign", "Malignant")
CONFUSION_COLUMNS = ("Complete miss", "Filtered out", "Pred. benign", "Pred. malignant")


def confusion_table(
    truth: pd.DataFrame,
    detections: pd.DataFrame,
    nodule_threshold: float = DEFAULT_CLASSIFICATION_THRESHOLD,
    malignancy_threshold: float = DEFAULT_CLASSIFICATION_THRESHOLD,
) -> np.ndarray:
    """The book's chapter-14 3x4 diagnosis table (``p2ch14/diagnose.py: match_and_score``).

    Rows (truth): non-nodule, benign, malignant. Columns: complete miss, filtered
    out (nodule probability below ``nodule_threshold``), predicted benign,
    predicted malignant (malignancy probability at or above ``malignancy_threshold``).

    ``truth`` holds one row per nodule annotation (``center_x/y/z``,
    ``diameter_mm``, ``is_malignant``; rows with ``is_nodule`` False are dropped
    when that column exists); ``detections`` holds ``center_x/y/z``,
    ``nodule_probability``, ``malignancy_probability``. With a ``series_uid``
    column in both, matching stays within a scan.

    Matching uses the book's looser rule: a detection matches a nodule when
    its centre is closer than 0.7 x the diameter (the LUNA16 FROC of
    :func:`froc` uses the radius, 0.5 x diameter). A nodule goes to the column
    of its most advanced matching detection (complete miss when none); a
    detection matching several nodules counts for each; detections matching no
    nodule fill the non-nodule row, whose complete-miss cell stays 0. Unlike
    the book, the malignancy threshold really is ``malignancy_threshold`` (the
    book compares against the nodule threshold).
    """
    require_columns(truth, [*CENTER_COLUMNS, "diameter_mm", "is_malignant"], "truth")
    require_columns(detections, [*CENTER_COLUMNS, "nodule_probability", "malignancy_probability"], "detections")
    if "is_nodule" in truth.columns:
        truth = truth[truth["is_nodule"].astype(bool)]
    detected_class = np.where(
        detections["nodule_probability"].to_numpy(np.float64) < nodule_threshold,
        1,
        np.where(detections["malignancy_probability"].to_numpy(np.float64) < malignancy_threshold, 2, 3),
    )
    truth_row = np.where(truth["is_malignant"].fillna(False).to_numpy(bool), 2, 1)
    truth_xyz = truth.loc[:, list(CENTER_COLUMNS)].to_numpy(np.float64)
    detection_xyz = detections.loc[:, list(CENTER_COLUMNS)].to_numpy(np.float64)
    distances = np.linalg.norm(truth_xyz[:, None, :] - detection_xyz[None, :, :], axis=-1)
    matches = distances < BOOK_MATCH_DIAMETER_FRACTION * truth["diameter_mm"].to_numpy(np.float64)[:, None]
    if "series_uid" in truth.columns and "series_uid" in detections.columns:
        matches &= truth["series_uid"].to_numpy()[:, None] == detections["series_uid"].to_numpy()[None, :]

    table = np.zeros((len(CONFUSION_ROWS), len(CONFUSION_COLUMNS)), dtype=np.int64)
    nodule_class = np.where(matches, detected_class[None, :], 0).max(axis=1, initial=0)
    np.add.at(table, (truth_row, nodule_class), 1)
    unmatched = ~matches.any(axis=0)
    np.add.at(table, (0, detected_class[unmatched]), 1)
    return table
