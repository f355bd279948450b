"""Truth for scoring: a data root's annotated nodules (with malignancy) and excluded findings,
and the conversions to the LUNA16 evaluation's table formats."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pandas as pd

from p2ch_luna.columns import XYZ_COLUMNS
from p2ch_luna.data.luna import (
    ANNOTATIONS_FILE,
    EXCLUDED_FILE,
    MALIGNANCY_FILE,
    attach_malignancy,
    read_annotations,
    read_csv_checked,
    read_malignancy,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Truth:
    """Annotated nodules (``series_uid, center_x/y/z, diameter_mm, is_malignant``) and excluded findings."""

    nodules: pd.DataFrame
    excluded: pd.DataFrame | None = None

    def for_series(self, series_uid: str) -> pd.DataFrame:
        return self.nodules[self.nodules["series_uid"] == series_uid]

    def has_series(self, series_uid: str) -> bool:
        return bool((self.nodules["series_uid"] == series_uid).any())


def read_truth(data_root: Path, excluded_path: Path | None = None) -> Truth | None:
    """Annotations of ``data_root`` with malignancy attached; None when it has no annotations.csv.

    The FROC's excluded findings come from ``excluded_path``, else from ``annotations_excluded.csv`` in
    ``data_root`` when it is there (as the official LUNA16 evaluation always uses it)."""
    annotations_path = data_root / ANNOTATIONS_FILE
    if not annotations_path.is_file():
        return None
    nodules = read_annotations(annotations_path)
    malignancy_path = data_root / MALIGNANCY_FILE
    malignancy = read_malignancy(malignancy_path) if malignancy_path.is_file() else None
    nodules["is_malignant"] = attach_malignancy(nodules, malignancy)
    excluded = None
    if excluded_path is None and (data_root / EXCLUDED_FILE).is_file():
        excluded_path = data_root / EXCLUDED_FILE
        log.info("FROC: marks on the findings of %s are ignored, as in the LUNA16 evaluation", excluded_path)
    if excluded_path is not None:
        excluded = read_csv_checked(excluded_path, ["seriesuid", *XYZ_COLUMNS, "diameter_mm"],
                                    [*XYZ_COLUMNS, "diameter_mm"], what="excluded annotations")
    return Truth(nodules=nodules, excluded=excluded)


def luna_detections(candidates: pd.DataFrame) -> pd.DataFrame:
    """Candidates in the LUNA16 submission format (probability = nodule probability)."""
    return pd.DataFrame({
        "seriesuid": candidates["series_uid"].astype(str),
        "coordX": candidates["center_x"], "coordY": candidates["center_y"], "coordZ": candidates["center_z"],
        "probability": candidates["nodule_probability"],
    })


def luna_annotations(nodules: pd.DataFrame) -> pd.DataFrame:
    """Truth nodules in the LUNA16 annotations format."""
    return pd.DataFrame({
        "seriesuid": nodules["series_uid"].astype(str), "coordX": nodules["center_x"],
        "coordY": nodules["center_y"], "coordZ": nodules["center_z"], "diameter_mm": nodules["diameter_mm"],
    })
