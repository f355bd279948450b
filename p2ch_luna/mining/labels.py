"""Labels of mined candidates by the LUNA16 radius rule (pure)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from p2ch_luna.evaluation.truth import Truth, luna_annotations, luna_detections
from p2ch_luna.metrics.froc import EXCLUDED_DEFAULT_DIAMETER_MM, radius_hits

NODULE_COLUMN = "is_nodule"


def label_by_radius(candidates: pd.DataFrame, truth: Truth) -> pd.DataFrame:
    """``candidates`` (``series_uid, center_x/y/z, ...``) with ``is_nodule``: the centre lies strictly within an
    annotated nodule's radius, as a LUNA16 hit. Candidates on an excluded finding (``truth.excluded``) are
    neither nodules nor non-nodules there, so they are left out, as the evaluation ignores them."""
    if candidates.empty:
        return candidates.assign(**{NODULE_COLUMN: np.zeros(0, dtype=bool)})
    detections = luna_detections(candidates.assign(nodule_probability=0.0)).reset_index(drop=True)
    is_nodule = np.zeros(len(candidates), dtype=bool)
    ignored = np.zeros(len(candidates), dtype=bool)
    for series_uid, rows in detections.groupby("seriesuid", sort=False).indices.items():
        nodules = luna_annotations(truth.for_series(series_uid))
        if len(nodules):
            is_nodule[rows] = radius_hits(nodules, detections.iloc[rows]).any(axis=0)
        if truth.excluded is not None:
            excluded = truth.excluded[truth.excluded["seriesuid"] == series_uid]
            if len(excluded):
                ignored[rows] = radius_hits(excluded, detections.iloc[rows], EXCLUDED_DEFAULT_DIAMETER_MM).any(axis=0)
    keep = is_nodule | ~ignored
    labelled = candidates.assign(**{NODULE_COLUMN: is_nodule})
    return labelled[keep].reset_index(drop=True)
