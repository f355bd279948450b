"""LUNA16 detection scoring: matching marks to nodules, the FROC curve, CPM and its bootstrap interval.

Follows the challenge's official ``noduleCADEvaluationLUNA16.py``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from p2ch_luna.columns import DIAMETER_COLUMN, PROBABILITY_COLUMN, SERIES_COLUMN, XYZ_COLUMNS, require_columns

log = logging.getLogger(__name__)

# LUNA16 evaluation constants (noduleCADEvaluationLUNA16.py).
OPERATING_POINTS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # average false positives per scan
EXCLUDED_DEFAULT_DIAMETER_MM = 10.0  # excluded findings with diameter < 0 get this diameter
LUNA16_MAX_DETECTIONS_PER_SCAN = 100  # the official script keeps the 100 most suspicious marks
DEFAULT_BOOTSTRAP_SAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95
DEFAULT_BOOTSTRAP_SEED = 0
BOOTSTRAP_GRID_POINTS = 64  # FPs-per-scan points of the bootstrap band
BOOTSTRAP_CHUNK_ELEMENTS = 4_000_000  # bootstrap rows x FROC entries held in memory at once


def _cap_detections(detections: pd.DataFrame, max_per_scan: int | None) -> pd.DataFrame:
    """Keep at most ``max_per_scan`` marks per scan, as the official script does.

    In a scan with more marks, only marks scoring strictly above the
    ``(max_per_scan + 1)``-th highest probability are kept (ties at the cut go).
    """
    if not max_per_scan or detections.empty:
        return detections
    probabilities = detections[PROBABILITY_COLUMN].to_numpy(np.float64)
    keep = np.ones(len(detections), dtype=bool)
    for rows in detections.groupby(SERIES_COLUMN, sort=False).indices.values():
        if len(rows) > max_per_scan:
            cut = np.sort(probabilities[rows])[::-1][max_per_scan]
            keep[rows] = probabilities[rows] > cut
    return detections[keep]


def radius_hits(nodules: pd.DataFrame, detections: pd.DataFrame, default_diameter: float | None = None) -> np.ndarray:
    """Boolean (nodule, detection) matrix of LUNA16-format tables: detection centre strictly within the nodule's
    radius (``default_diameter`` replaces negative diameters, as for excluded findings)."""
    nodule_xyz = nodules.loc[:, list(XYZ_COLUMNS)].to_numpy(np.float64)
    detection_xyz = detections.loc[:, list(XYZ_COLUMNS)].to_numpy(np.float64)
    diameters = nodules[DIAMETER_COLUMN].to_numpy(np.float64)
    if default_diameter is not None:
        diameters = np.where(diameters < 0.0, default_diameter, diameters)
    squared = ((nodule_xyz[:, None, :] - detection_xyz[None, :, :]) ** 2).sum(axis=-1)
    return squared < (diameters[:, None] / 2.0) ** 2


def _match(
    annotations: pd.DataFrame,
    detections: pd.DataFrame,
    excluded: pd.DataFrame | None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Match detections to nodules scan by scan; returns (detection table, nodule table)."""
    require_columns(annotations, [SERIES_COLUMN, *XYZ_COLUMNS, DIAMETER_COLUMN], "annotations")
    require_columns(detections, [SERIES_COLUMN, *XYZ_COLUMNS, PROBABILITY_COLUMN], "detections")
    if excluded is None:
        excluded = annotations.iloc[0:0]
    require_columns(excluded, [SERIES_COLUMN, *XYZ_COLUMNS, DIAMETER_COLUMN], "excluded annotations")

    detections = detections.reset_index(drop=True)
    probabilities = detections[PROBABILITY_COLUMN].to_numpy(np.float64)
    n_detections = len(detections)
    matched_nodule_id = np.full(n_detections, -1, dtype=np.int64)
    is_hit = np.zeros(n_detections, dtype=bool)
    on_excluded = np.zeros(n_detections, dtype=bool)
    nodule_score = np.full(len(annotations), np.nan)
    nodule_detection = np.full(len(annotations), -1, dtype=np.int64)

    nodule_rows = annotations.reset_index(drop=True).groupby(SERIES_COLUMN, sort=False).indices
    excluded_rows = excluded.reset_index(drop=True).groupby(SERIES_COLUMN, sort=False).indices
    for series_uid, rows in detections.groupby(SERIES_COLUMN, sort=False).indices.items():
        scan_detections = detections.iloc[rows]
        if series_uid in nodule_rows:
            nodule_ids = nodule_rows[series_uid]
            hits = radius_hits(annotations.iloc[nodule_ids], scan_detections, default_diameter=None)
            first_hit = np.where(hits.any(axis=0), hits.argmax(axis=0), -1)
            matched_nodule_id[rows] = np.where(first_hit >= 0, nodule_ids[np.maximum(first_hit, 0)], -1)
            for nodule_id, nodule_hits in zip(nodule_ids, hits):
                if nodule_hits.any():
                    hit_rows = rows[nodule_hits]
                    best = hit_rows[np.argmax(probabilities[hit_rows])]
                    is_hit[best] = True
                    nodule_score[nodule_id] = probabilities[best]
                    nodule_detection[nodule_id] = best
        if series_uid in excluded_rows:
            hits = radius_hits(excluded.iloc[excluded_rows[series_uid]], scan_detections, EXCLUDED_DEFAULT_DIAMETER_MM)
            on_excluded[rows] = hits.any(axis=0)

    matched = matched_nodule_id >= 0
    ignored = (matched & ~is_hit) | (~matched & on_excluded)
    detection_table = detections.assign(
        is_hit=is_hit,
        matched_nodule_id=matched_nodule_id,
        ignored=ignored,
        is_false_positive=~matched & ~on_excluded,
    )
    nodule_table = pd.DataFrame(
        {
            SERIES_COLUMN: annotations[SERIES_COLUMN].to_numpy(),
            "is_detected": nodule_detection >= 0,
            "probability": nodule_score,
            "detection_id": nodule_detection,
        }
    )
    return detection_table, nodule_table


def match_detections(
    annotations: pd.DataFrame,
    detections: pd.DataFrame,
    excluded: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Classify each detection against the LUNA16 annotations (official rules).

    A detection hits a nodule when its centre lies strictly within the nodule's
    radius (``distance < diameter_mm / 2``). Added columns, one row per detection
    in input order:

    - ``matched_nodule_id``: row position in ``annotations`` of the first nodule
      it hits, or -1;
    - ``is_hit``: it is the highest-scoring hit of a nodule, so it is that
      nodule's true positive;
    - ``ignored``: neither TP nor FP: a lower-scoring duplicate hit of a nodule,
      or a mark on an excluded finding (``excluded``; a negative diameter there
      means a fixed 10 mm diameter);
    - ``is_false_positive``: everything else.
    """
    return _match(annotations, detections, excluded)[0]


def match_nodules(
    annotations: pd.DataFrame,
    detections: pd.DataFrame,
    excluded: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Each annotated nodule's true positive under the LUNA16 rules, and what outranks it.

    One row per annotation, in input order: its own columns plus

    - ``is_detected``: some detection lies strictly within its radius;
    - ``detection_id``: row position in ``detections`` of the most probable of those
      (the FROC's true positive), -1 when missed;
    - ``probability`` and ``distance_mm`` (from the nodule's centre) of that detection,
      ``nan`` when missed;
    - ``false_positives_above``: false positives of the same scan with a strictly higher
      probability (0: the nodule is found before any false positive), -1 when missed.

    Every detection counts here; :func:`froc` keeps a scan's 100 most probable, as the
    official evaluation does.
    """
    annotations = annotations.reset_index(drop=True)
    detection_table, nodule_table = _match(annotations, detections, excluded)
    detection_id = nodule_table["detection_id"].to_numpy()
    detected = detection_id >= 0
    nodule_xyz = annotations.loc[:, list(XYZ_COLUMNS)].to_numpy(np.float64)
    detection_xyz = detection_table.loc[:, list(XYZ_COLUMNS)].to_numpy(np.float64)
    distance = np.full(len(annotations), np.nan)
    distance[detected] = np.linalg.norm(nodule_xyz[detected] - detection_xyz[detection_id[detected]], axis=1)
    false_positives = detection_table[detection_table["is_false_positive"]]
    fp_scores = false_positives.groupby(SERIES_COLUMN, sort=False)[PROBABILITY_COLUMN].apply(np.asarray).to_dict()
    above = np.full(len(annotations), -1, dtype=np.int64)
    for row in np.flatnonzero(detected):
        scores = fp_scores.get(annotations.at[row, SERIES_COLUMN], np.zeros(0))
        above[row] = int(np.count_nonzero(scores > nodule_table.at[row, "probability"]))
    return annotations.assign(
        is_detected=detected,
        detection_id=detection_id,
        probability=nodule_table["probability"].to_numpy(),
        distance_mm=distance,
        false_positives_above=above,
    )


@dataclass(frozen=True)
class FrocResult:
    """A FROC curve, its CPM and the bootstrap confidence interval of the CPM."""

    fps_per_scan: np.ndarray
    sensitivity: np.ndarray
    thresholds: np.ndarray
    cpm: float
    sensitivities_at_operating_points: dict[float, float]
    n_nodules: int
    n_detected_nodules: int
    n_scans: int
    n_false_positives: int
    n_ignored: int
    confidence: float
    ci_low: float
    ci_high: float
    n_bootstrap: int
    bootstrap_cpm: np.ndarray = field(repr=False)
    bootstrap_fps_grid: np.ndarray = field(repr=False)
    bootstrap_sensitivity_low: np.ndarray = field(repr=False)
    bootstrap_sensitivity_high: np.ndarray = field(repr=False)

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures: CPM, CI, operating points and counts (no curves)."""
        return {
            "cpm": self.cpm,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "confidence": self.confidence,
            "n_bootstrap": self.n_bootstrap,
            "sensitivities_at_operating_points": {
                str(point): value for point, value in self.sensitivities_at_operating_points.items()
            },
            "n_nodules": self.n_nodules,
            "n_detected_nodules": self.n_detected_nodules,
            "n_scans": self.n_scans,
            "n_false_positives": self.n_false_positives,
            "n_ignored": self.n_ignored,
        }

    def to_dict(self) -> dict[str, Any]:
        """:meth:`summary` plus the curve and the bootstrap band, as lists."""
        return {
            **self.summary(),
            "curve": {
                "fps_per_scan": self.fps_per_scan.tolist(),
                "sensitivity": self.sensitivity.tolist(),
                "thresholds": [None if not np.isfinite(t) else float(t) for t in self.thresholds],
            },
            "bootstrap_band": {
                "fps_per_scan": self.bootstrap_fps_grid.tolist(),
                "sensitivity_low": self.bootstrap_sensitivity_low.tolist(),
                "sensitivity_high": self.bootstrap_sensitivity_high.tolist(),
            },
        }


def _interp_rows(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """``np.interp(x, xp[i], fp[i])`` for every row ``i`` at once.

    ``xp`` rows must be non-decreasing and start at or below ``min(x)``. Like
    ``np.interp``, at a repeated ``xp`` value the last (highest) point is used and
    beyond the last point the last value is returned.
    """
    last = np.stack([np.searchsorted(row, x, side="right") - 1 for row in xp])
    following = np.minimum(last + 1, xp.shape[1] - 1)
    x0 = np.take_along_axis(xp, last, axis=1)
    x1 = np.take_along_axis(xp, following, axis=1)
    y0 = np.take_along_axis(fp, last, axis=1)
    y1 = np.take_along_axis(fp, following, axis=1)
    span = x1 - x0
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.where(span > 0, (y1 - y0) / np.where(span > 0, span, 1.0), 0.0)
    return y0 + slope * (x[None, :] - x0)


@dataclass(frozen=True)
class _FrocEntries:
    """FROC entries sorted by decreasing score: each detected nodule (its best score) and each FP."""

    scores: np.ndarray
    is_true_positive: np.ndarray
    scan: np.ndarray  # index into the evaluated scans
    tie_ends: np.ndarray  # last entry of each run of equal scores
    nodules_per_scan: np.ndarray  # detected or not


def _froc_entries(detection_table: pd.DataFrame, nodule_table: pd.DataFrame, scan_ids: list[str]) -> _FrocEntries:
    false_positives = detection_table[detection_table["is_false_positive"]]
    detected = nodule_table[nodule_table["is_detected"]]
    scan_index = {uid: i for i, uid in enumerate(scan_ids)}
    scores = np.r_[
        detected["probability"].to_numpy(np.float64),
        false_positives[PROBABILITY_COLUMN].to_numpy(np.float64),
    ]
    is_true_positive = np.r_[np.ones(len(detected), bool), np.zeros(len(false_positives), bool)]
    scan = np.r_[
        detected[SERIES_COLUMN].map(scan_index).to_numpy(np.int64),
        false_positives[SERIES_COLUMN].map(scan_index).to_numpy(np.int64),
    ]
    order = np.argsort(-scores, kind="stable")
    scores = scores[order]
    nodule_scans = nodule_table[SERIES_COLUMN].map(scan_index).to_numpy(np.int64)
    return _FrocEntries(
        scores=scores,
        is_true_positive=is_true_positive[order],
        scan=scan[order],
        tie_ends=np.flatnonzero(np.r_[np.diff(scores) != 0, True]) if scores.size else np.zeros(0, np.int64),
        nodules_per_scan=np.bincount(nodule_scans, minlength=len(scan_ids)).astype(np.float64),
    )


def _froc_curves(
    entry_weights: np.ndarray, entries: _FrocEntries, scan_counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """FROC curves, one per row of ``scan_counts`` (how often each scan is drawn).

    ``entry_weights`` is ``scan_counts`` per entry. A curve starts at (0, 0) and
    has one point per distinct score, as the official script's ``roc_curve``
    call gives; FPs are averaged over the number of scans drawn.
    """
    tp = np.cumsum(entry_weights * entries.is_true_positive, axis=1)[:, entries.tie_ends]
    fp = np.cumsum(entry_weights * ~entries.is_true_positive, axis=1)[:, entries.tie_ends]
    zeros = np.zeros((entry_weights.shape[0], 1))
    n_nodules = np.atleast_2d(scan_counts) @ entries.nodules_per_scan
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = np.hstack([zeros, tp]) / n_nodules[:, None]
    return np.hstack([zeros, fp]) / entries.nodules_per_scan.size, sensitivity


def froc(
    annotations: pd.DataFrame,
    detections: pd.DataFrame,
    series_uids: Sequence[str],
    excluded: pd.DataFrame | None = None,
    *,
    n_bootstrap: int = DEFAULT_BOOTSTRAP_SAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    rng: np.random.Generator | None = None,
    max_detections_per_scan: int | None = LUNA16_MAX_DETECTIONS_PER_SCAN,
) -> FrocResult:
    """LUNA16 FROC analysis and CPM over the scans ``series_uids``.

    Follows ``noduleCADEvaluationLUNA16.py``: only the listed scans count (FPs
    per scan divide by their number, with or without detections); each scan
    keeps its ``max_detections_per_scan`` most suspicious marks (official: 100;
    None keeps all); hits, duplicates and excluded findings as in
    :func:`match_detections`; a missed nodule lowers sensitivity at every
    threshold. CPM is the mean sensitivity at 1/8 ... 8 FPs per scan, read from
    the curve with linear interpolation (``np.interp``). The CI resamples scans
    with replacement ``n_bootstrap`` times and takes the official percentile
    indices of the sorted bootstrap CPMs.
    """
    rng = np.random.default_rng(DEFAULT_BOOTSTRAP_SEED) if rng is None else rng
    scan_ids = list(dict.fromkeys(str(uid) for uid in series_uids))
    n_scans = len(scan_ids)
    if n_scans == 0:
        raise ValueError("froc needs at least one scan")
    require_columns(detections, [SERIES_COLUMN, PROBABILITY_COLUMN], "detections")
    require_columns(annotations, [SERIES_COLUMN], "annotations")
    detections = detections.assign(**{SERIES_COLUMN: detections[SERIES_COLUMN].astype(str)})
    annotations = annotations.assign(**{SERIES_COLUMN: annotations[SERIES_COLUMN].astype(str)})
    if excluded is not None:
        require_columns(excluded, [SERIES_COLUMN], "excluded annotations")
        excluded = excluded.assign(**{SERIES_COLUMN: excluded[SERIES_COLUMN].astype(str)})
    in_scans = detections[SERIES_COLUMN].isin(scan_ids)
    if not in_scans.all():
        log.warning("ignoring %d detection(s) on scans outside the evaluated list", int((~in_scans).sum()))
    detections = _cap_detections(detections[in_scans], max_detections_per_scan)
    annotations = annotations[annotations[SERIES_COLUMN].isin(scan_ids)].reset_index(drop=True)
    detection_table, nodule_table = _match(annotations, detections, excluded)
    entries = _froc_entries(detection_table, nodule_table, scan_ids)
    points = np.asarray(OPERATING_POINTS)
    fps, sensitivity = _froc_curves(np.ones((1, entries.scores.size)), entries, np.ones(n_scans))
    at_points = _interp_rows(points, fps, sensitivity)[0]
    grid = np.geomspace(OPERATING_POINTS[0], OPERATING_POINTS[-1], BOOTSTRAP_GRID_POINTS)
    bootstrap_cpm, band = _bootstrap(rng, n_bootstrap, entries, np.r_[points, grid])
    ci_low, ci_high = _percentile_interval(bootstrap_cpm, confidence)
    band_low = np.array([_percentile_interval(column, confidence)[0] for column in band.T])
    band_high = np.array([_percentile_interval(column, confidence)[1] for column in band.T])
    return FrocResult(
        fps_per_scan=fps[0],
        sensitivity=sensitivity[0],
        thresholds=np.r_[np.inf, entries.scores[entries.tie_ends]],
        cpm=float(at_points.mean()),
        sensitivities_at_operating_points={p: float(s) for p, s in zip(OPERATING_POINTS, at_points)},
        n_nodules=len(nodule_table),
        n_detected_nodules=int(nodule_table["is_detected"].sum()),
        n_scans=n_scans,
        n_false_positives=int(detection_table["is_false_positive"].sum()),
        n_ignored=int(detection_table["ignored"].sum()),
        confidence=confidence,
        ci_low=ci_low,
        ci_high=ci_high,
        n_bootstrap=n_bootstrap,
        bootstrap_cpm=bootstrap_cpm,
        bootstrap_fps_grid=grid,
        bootstrap_sensitivity_low=band_low[len(points):],
        bootstrap_sensitivity_high=band_high[len(points):],
    )


def _bootstrap(
    rng: np.random.Generator, n_bootstrap: int, entries: _FrocEntries, x: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap CPMs and sensitivities at ``x`` (the operating points first).

    Each replicate draws the scans with replacement; a scan drawn k times
    contributes its entries k times, which is the official script's concatenation.
    """
    n_scans = entries.nodules_per_scan.size
    if n_bootstrap <= 0:
        return np.zeros(0), np.zeros((0, x.size))
    counts = rng.multinomial(n_scans, np.full(n_scans, 1.0 / n_scans), size=n_bootstrap).astype(np.float64)
    chunk = max(1, BOOTSTRAP_CHUNK_ELEMENTS // max(1, entries.scan.size))
    sensitivities = []
    for start in range(0, n_bootstrap, chunk):
        scan_counts = counts[start : start + chunk]
        fps, sensitivity = _froc_curves(scan_counts[:, entries.scan], entries, scan_counts)
        sensitivities.append(_interp_rows(x, fps, sensitivity))
    at_x = np.vstack(sensitivities)
    return at_x[:, : len(OPERATING_POINTS)].mean(axis=1), at_x


def _percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """Official LUNA16 bounds: sorted[floor(a n)] and sorted[floor((1 - a) n)], a = (1 - confidence) / 2.

    Replicates with an undefined value (no nodule drawn) are left out.
    """
    finite = np.sort(values[np.isfinite(values)])
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = (1.0 - confidence) / 2.0
    low = finite[int(np.floor(tail * finite.size))]
    high = finite[min(int(np.floor((1.0 - tail) * finite.size)), finite.size - 1)]
    return float(low), float(high)
