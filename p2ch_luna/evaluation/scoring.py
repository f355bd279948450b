"""Scores of candidates against truth: the book's confusion table per series, the LUNA16 FROC/CPM,
and which candidate finds each annotated nodule."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from p2ch_luna.evaluation.truth import Truth, luna_annotations, luna_detections
from p2ch_luna.metrics.confusion import confusion_table
from p2ch_luna.metrics.froc import FrocResult, froc, match_nodules


def series_confusion(truth: pd.DataFrame, candidates: pd.DataFrame, nodule_threshold: float,
                     malignancy_threshold: float) -> np.ndarray:
    """The book's confusion table for one series (no malignancy model: predicted benign, as the book)."""
    detections = candidates.assign(malignancy_probability=candidates["malignancy_probability"].fillna(0.0))
    return confusion_table(truth, detections, nodule_threshold, malignancy_threshold)


def luna_froc(truth: Truth, candidates: pd.DataFrame, series_uids: Sequence[str]) -> FrocResult:
    """LUNA16 FROC/CPM (with bootstrap CI) of all candidates over the series evaluated."""
    return froc(luna_annotations(truth.nodules), luna_detections(candidates), list(series_uids), truth.excluded)


def truth_matches(truth: Truth, candidates_by_series: Mapping[str, pd.DataFrame],
                  nodule_threshold: float) -> pd.DataFrame:
    """Every annotated nodule of the series in ``candidates_by_series`` with the candidate that finds it (LUNA16 rule).

    Each series' candidates are sorted by decreasing ``nodule_probability``, as a diagnosis gives them.

    One row per nodule (``series_uid, center_x/y/z, diameter_mm, is_malignant``) plus
    ``is_detected``, the candidate's ``nodule_probability``, ``malignancy_probability`` and
    ``distance_mm``, ``finding`` (its number among the series' findings, 0 when it is below
    the nodule threshold or missed) and ``false_positives_above`` (-1 when missed).
    """
    columns = ["series_uid", "center_x", "center_y", "center_z", "diameter_mm", "is_malignant"]
    nodules = truth.nodules[truth.nodules["series_uid"].isin(list(candidates_by_series))]
    nodules = nodules[columns].reset_index(drop=True)
    candidates = pd.concat([frame.assign(finding=np.arange(1, len(frame) + 1))
                            for frame in candidates_by_series.values()], ignore_index=True)
    matched = match_nodules(luna_annotations(nodules), luna_detections(candidates), truth.excluded)
    detected = matched["is_detected"].to_numpy()
    hit = candidates.iloc[matched["detection_id"].to_numpy()[detected]]
    nodule_probability = np.full(len(nodules), np.nan)
    malignancy_probability = np.full(len(nodules), np.nan)
    finding = np.zeros(len(nodules), dtype=np.int64)
    nodule_probability[detected] = hit["nodule_probability"].to_numpy(np.float64)
    malignancy_probability[detected] = hit["malignancy_probability"].to_numpy(np.float64)
    finding[detected] = np.where(nodule_probability[detected] >= nodule_threshold, hit["finding"], 0)
    return nodules.assign(
        is_detected=detected, nodule_probability=nodule_probability, malignancy_probability=malignancy_probability,
        distance_mm=matched["distance_mm"].to_numpy(), finding=finding,
        false_positives_above=matched["false_positives_above"].to_numpy(),
    )
