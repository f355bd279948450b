"""Hand-computed cases for p2ch_luna.metrics, plus a reference port of the official LUNA16 matching."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from p2ch_luna import evaluate
from p2ch_luna.evaluation.figures import plot_froc
from p2ch_luna.evaluation.text import format_confusion_table
from p2ch_luna.metrics import froc as froc_module
from p2ch_luna.metrics.classification import (
    average_ranks,
    classification_metrics,
    precision_recall_curve,
    roc_auc,
    roc_curve,
)
from p2ch_luna.metrics.confusion import confusion_table
from p2ch_luna.metrics.froc import OPERATING_POINTS, froc, match_detections, match_nodules
from p2ch_luna.metrics.segmentation import dice_score, segmentation_metrics
from tests.locations import REPO

ANNOTATION_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
DETECTION_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "probability"]


def annotations_frame(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=ANNOTATION_COLUMNS)


def detections_frame(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=DETECTION_COLUMNS)


# --- classification ---------------------------------------------------------------


def test_classification_metrics_hand_case():
    labels = np.array([True, True, False, False, False])
    probabilities = np.array([0.9, 0.4, 0.6, 0.1, 0.5])  # 0.5 is not above the threshold
    result = classification_metrics(labels, probabilities, threshold=0.5)
    assert (result["tp"], result["fn"], result["fp"], result["tn"]) == (1, 1, 1, 2)
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["negative_accuracy"] == pytest.approx(2 / 3)
    assert result["positive_accuracy"] == pytest.approx(1 / 2)
    assert result["precision"] == pytest.approx(1 / 2)
    assert result["recall"] == pytest.approx(1 / 2)
    assert result["f1"] == pytest.approx(1 / 2)
    # Positive/negative pairs won: 0.9 beats all three negatives, 0.4 beats 0.1 -> 4 of 6.
    assert result["roc_auc"] == pytest.approx(4 / 6)


def test_classification_metrics_absent_class_is_nan():
    result = classification_metrics(np.array([True, True]), np.array([0.9, 0.2]))
    assert math.isnan(result["negative_accuracy"])
    assert math.isnan(result["roc_auc"])
    assert result["positive_accuracy"] == pytest.approx(0.5)
    assert math.isnan(classification_metrics(np.array([False]), np.array([0.1]))["precision"])


def test_roc_auc_ties_count_half():
    labels = np.array([1, 0, 1, 0], dtype=bool)
    scores = np.array([0.5, 0.5, 0.8, 0.2])
    # Pairs: (0.5 vs 0.5) = 1/2, (0.5 vs 0.2) = 1, (0.8 vs both) = 2  ->  3.5 / 4.
    assert roc_auc(labels, scores) == pytest.approx(0.875)


def test_average_ranks_are_scipys_and_diagnosis_does_not_import_scipy_stats():
    from scipy.stats import rankdata

    rng = np.random.default_rng(0)
    for size, levels in ((1, 2), (7, 2), (200, 5), (500, 10**6)):
        values = rng.integers(0, levels, size).astype(np.float64)
        np.testing.assert_array_equal(average_ranks(values), rankdata(values, method="average"))
    code = "import sys, p2ch_luna.diagnose.cli; print('scipy.stats' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_roc_curve_and_area_match_auc():
    labels = np.array([1, 0, 1, 0], dtype=bool)
    scores = np.array([0.5, 0.5, 0.8, 0.2])
    fpr, tpr, thresholds = roc_curve(labels, scores)
    np.testing.assert_allclose(thresholds, [np.inf, 0.8, 0.5, 0.2])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(labels, scores))


def test_precision_recall_curve_hand_case():
    labels = np.array([1, 0, 1, 0], dtype=bool)
    precision, recall, thresholds = precision_recall_curve(labels, np.array([0.5, 0.5, 0.8, 0.2]))
    np.testing.assert_allclose(thresholds, [0.8, 0.5, 0.2])
    np.testing.assert_allclose(precision, [1, 2 / 3, 1 / 2])
    np.testing.assert_allclose(recall, [0.5, 1, 1])


# --- segmentation -----------------------------------------------------------------


def test_segmentation_metrics_rates_relative_to_label_positives():
    result = segmentation_metrics(tp=6, fp=3, fn=2)
    assert result["dice"] == pytest.approx(12 / 17)
    assert result["precision"] == pytest.approx(6 / 9)
    assert result["recall"] == pytest.approx(6 / 8)
    assert result["tp_rate"] == pytest.approx(6 / 8)
    assert result["fn_rate"] == pytest.approx(2 / 8)
    assert result["fp_rate"] == pytest.approx(3 / 8)
    assert math.isnan(segmentation_metrics(0, 0, 0)["dice"])


def test_dice_score_on_masks():
    label = np.zeros((4, 4), dtype=bool)
    label[:2, :2] = True  # 4 pixels
    pred = np.zeros((4, 4), dtype=bool)
    pred[:2, 1:3] = True  # 4 pixels, 2 overlapping
    assert dice_score(pred, label) == pytest.approx(2 * 2 / 8)
    assert dice_score(label, label) == pytest.approx(1.0)


# --- LUNA16 matching and FROC -------------------------------------------------------


def test_perfect_detector_has_cpm_one():
    annotations = annotations_frame([("a", 0, 0, 0, 6), ("a", 50, 0, 0, 8), ("b", 10, 10, 10, 5)])
    detections = detections_frame([("a", 0, 0, 0, 0.9), ("a", 50, 0, 0, 0.8), ("b", 10, 10, 10, 0.7)])
    result = froc(annotations, detections, ["a", "b", "c"], n_bootstrap=50)
    assert result.cpm == pytest.approx(1.0)
    assert result.n_false_positives == 0
    assert result.ci_low == pytest.approx(1.0) and result.ci_high == pytest.approx(1.0)


def test_duplicate_hits_count_once_and_are_not_false_positives():
    annotations = annotations_frame([("a", 0, 0, 0, 10)])
    detections = detections_frame([("a", 2, 0, 0, 0.3), ("a", 1, 0, 0, 0.9)])
    matched = match_detections(annotations, detections)
    assert matched["is_hit"].tolist() == [False, True]
    assert matched["ignored"].tolist() == [True, False]
    assert matched["is_false_positive"].tolist() == [False, False]
    assert matched["matched_nodule_id"].tolist() == [0, 0]
    result = froc(annotations, detections, ["a"], n_bootstrap=0)
    assert result.n_false_positives == 0
    assert result.n_ignored == 1
    np.testing.assert_allclose(result.thresholds, [np.inf, 0.9])  # only the best hit enters the curve


def test_detection_outside_radius_is_false_positive():
    annotations = annotations_frame([("a", 0, 0, 0, 10)])
    # The official rule is distance < radius: exactly on the radius is already outside.
    detections = detections_frame([("a", 4.99, 0, 0, 0.5), ("a", 0, 5.0, 0, 0.6), ("a", 0, 0, 5.01, 0.7)])
    matched = match_detections(annotations, detections)
    assert matched["is_hit"].tolist() == [True, False, False]
    assert matched["is_false_positive"].tolist() == [False, True, True]
    assert matched["matched_nodule_id"].tolist() == [0, -1, -1]


def test_match_nodules_names_each_nodules_true_positive_and_the_false_positives_above_it():
    annotations = annotations_frame([("a", 0, 0, 0, 10), ("a", 50, 0, 0, 6), ("b", 0, 0, 0, 8), ("c", 0, 0, 0, 8)])
    excluded = annotations_frame([("a", 0, 80, 0, 10)])
    detections = detections_frame([
        ("a", 3, 4, 0, 0.6),  # hits nodule 0, 5 mm from its centre: less probable than the next
        ("a", 1, 0, 0, 0.7),  # nodule 0's true positive
        ("a", 0, 30, 0, 0.95),  # a false positive above both nodules of scan a
        ("a", 0, 80, 0, 0.99),  # on an excluded finding: not a false positive
        ("a", 50, 2, 0, 0.9),  # nodule 1's true positive
        ("a", 0, 40, 0, 0.8),  # a false positive between them
        ("b", 3.9, 0, 0, 0.1),  # nodule 2's true positive; scan b's false positive above it:
        ("b", 30, 0, 0, 0.5),
        ("c", 4.0, 0, 0, 0.9),  # exactly on nodule 3's radius: a false positive, the nodule is missed
    ])
    matched = match_nodules(annotations, detections, excluded)
    assert list(matched.columns[:5]) == list(annotations.columns)
    assert matched["is_detected"].tolist() == [True, True, True, False]
    assert matched["detection_id"].tolist() == [1, 4, 6, -1]
    np.testing.assert_allclose(matched["probability"], [0.7, 0.9, 0.1, np.nan])
    np.testing.assert_allclose(matched["distance_mm"], [1.0, 2.0, 3.9, np.nan])
    assert matched["false_positives_above"].tolist() == [2, 1, 1, -1]


def test_excluded_findings_ignore_marks_and_negative_diameter_means_10_mm():
    annotations = annotations_frame([("a", 0, 0, 0, 10)])
    excluded = annotations_frame([("a", 100, 0, 0, -1), ("a", 0, 100, 0, 4)])
    detections = detections_frame(
        [
            ("a", 104.9, 0, 0, 0.8),  # within the default 5 mm radius: ignored
            ("a", 105.1, 0, 0, 0.8),  # outside it: FP
            ("a", 0, 101.9, 0, 0.7),  # within the 2 mm radius: ignored
            ("a", 0, 0, 1, 0.6),  # hit of the included nodule
        ]
    )
    matched = match_detections(annotations, detections, excluded)
    assert matched["ignored"].tolist() == [True, False, True, False]
    assert matched["is_false_positive"].tolist() == [False, True, False, False]
    result = froc(annotations, detections, ["a"], excluded, n_bootstrap=0)
    assert (result.n_false_positives, result.n_ignored, result.n_nodules) == (1, 2, 1)


def test_fps_per_scan_count_scans_without_detections():
    annotations = annotations_frame([("a", 0, 0, 0, 10), ("d", 0, 0, 0, 10)])
    detections = detections_frame([("a", 0, 0, 0, 0.9), ("a", 50, 0, 0, 0.8), ("a", 80, 0, 0, 0.7)])
    result = froc(annotations, detections, ["a", "b", "c", "d"], n_bootstrap=0)
    np.testing.assert_allclose(result.fps_per_scan, [0, 0, 0.25, 0.5])
    np.testing.assert_allclose(result.sensitivity, [0, 0.5, 0.5, 0.5])  # the nodule in scan d is missed
    assert result.n_scans == 4 and result.n_nodules == 2


def staircase_case() -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """8 scans, one nodule each; FP blocks push the curve to each operating point in turn.

    Sorted by score: TP, FP, TP, FP, TP, 2 FP, TP, 4 FP, TP, 8 FP, TP, 16 FP, TP, 32 FP; the
    8th nodule is missed. Sensitivity at 1/8, 1/4, ... 8 FPs per scan: 2/8, 3/8, ..., 7/8, 7/8.
    """
    scans = [f"s{i}" for i in range(8)]
    annotations = annotations_frame([(uid, 0, 0, 0, 10) for uid in scans])
    rows = []
    score = 1.0
    fp_count = 0
    for i, block in enumerate([1, 1, 2, 4, 8, 16, 32]):
        score -= 0.001
        rows.append((scans[i], 0, 0, 0, score))
        for _ in range(block):
            score -= 0.001
            rows.append((scans[fp_count % 8], 200 + fp_count, 0, 0, score))
            fp_count += 1
    return annotations, detections_frame(rows), scans


def test_cpm_on_hand_built_curve():
    annotations, detections, scans = staircase_case()
    result = froc(annotations, detections, scans, n_bootstrap=0)
    expected = [2 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8, 7 / 8, 7 / 8]
    np.testing.assert_allclose(list(result.sensitivities_at_operating_points.values()), expected)
    assert result.cpm == pytest.approx(sum(expected) / 7)
    assert math.isnan(result.ci_low) and result.bootstrap_cpm.size == 0


def test_sensitivity_interpolates_between_curve_points():
    annotations = annotations_frame([("a", 0, 0, 0, 10), ("a", 50, 0, 0, 10)])
    detections = detections_frame([("a", 0, 0, 0, 0.9), ("a", 100, 0, 0, 0.8), ("a", 50, 0, 0, 0.1)])
    result = froc(annotations, detections, ["a"], n_bootstrap=0)
    # Curve: (0, 0) (0, 0.5) (1, 0.5) (1, 1): vertical at 1 FP, so 1/8 ... 1/2 read 0.5, >= 1 reads 1.
    assert result.sensitivities_at_operating_points[0.5] == pytest.approx(0.5)
    assert result.sensitivities_at_operating_points[1.0] == pytest.approx(1.0)
    fp_first = froc(annotations, detections.iloc[[1, 2]], ["a"], n_bootstrap=0)
    # Curve (0, 0) (1, 0) (1, 0.5): nothing before 1 FP per scan.
    assert fp_first.sensitivities_at_operating_points[0.5] == pytest.approx(0.0)


def test_interp_rows_matches_numpy_interp():
    rng = np.random.default_rng(3)
    xp = np.r_[0, np.sort(rng.integers(0, 6, size=20)) / 2.0][None, :].repeat(2, axis=0)
    fp = np.cumsum(rng.random((2, 21)), axis=1)
    x = np.array([0.125, 0.5, 1.0, 1.5, 2.0, 4.0, 8.0])
    got = froc_module._interp_rows(x, xp, fp)
    for row in range(2):
        np.testing.assert_allclose(got[row], np.interp(x, xp[row], fp[row]))


def random_case(seed: int, n_scans: int = 30, n_detections: int = 300):
    rng = np.random.default_rng(seed)
    scans = [f"1.2.{i}" for i in range(n_scans)]
    nodule_scans = rng.choice(scans, size=n_scans)
    annotations = annotations_frame(
        [(uid, *rng.uniform(-100, 100, 3), rng.uniform(3, 30)) for uid in nodule_scans]
    )
    excluded = annotations_frame([(uid, *rng.uniform(-100, 100, 3), -1.0) for uid in rng.choice(scans, 10)])
    rows = []
    for _ in range(n_detections):
        if rng.random() < 0.3:
            nodule = annotations.iloc[rng.integers(len(annotations))]
            center = nodule[["coordX", "coordY", "coordZ"]].to_numpy(float) + rng.normal(0, 4, 3)
            uid = nodule["seriesuid"]
        else:
            center, uid = rng.uniform(-100, 100, 3), rng.choice(scans)
        rows.append((uid, *center, round(float(rng.random()), 2)))  # rounding makes ties
    return annotations, detections_frame(rows), excluded, scans


def official_froc_entries(annotations, detections, excluded, scans):
    """Loop-by-loop port of the official matching: returns (FROC labels, scores, excluded flags)."""
    labels, scores, skip = [], [], []
    for uid in scans:
        candidates = {i: row for i, row in detections[detections.seriesuid == uid].iterrows()}
        remaining = dict(candidates)
        findings = [(row, "Included") for _, row in annotations[annotations.seriesuid == uid].iterrows()]
        findings += [(row, "Excluded") for _, row in excluded[excluded.seriesuid == uid].iterrows()]
        for nodule, state in findings:
            diameter = nodule.diameter_mm if nodule.diameter_mm >= 0 else 10.0
            matches = []
            for key, candidate in candidates.items():
                distance2 = sum((nodule[c] - candidate[c]) ** 2 for c in ("coordX", "coordY", "coordZ"))
                if distance2 < (diameter / 2) ** 2:
                    if state == "Included":
                        matches.append(candidate.probability)
                        remaining.pop(key, None)
                    elif key in remaining:
                        del remaining[key]
            if state == "Included":
                labels.append(1.0)
                scores.append(max(matches) if matches else -1e9)
                skip.append(not matches)
        for candidate in remaining.values():
            labels.append(0.0)
            scores.append(candidate.probability)
            skip.append(False)
    return np.array(labels), np.array(scores), np.array(skip)


def official_sensitivities(labels, scores, skip, n_scans):
    """Official computeFROC (roc_curve over the kept entries) read at the operating points."""
    kept_labels, kept_scores = labels[~skip].astype(bool), scores[~skip]
    fpr, tpr, _ = roc_curve(kept_labels, kept_scores)
    n_fp = np.count_nonzero(~kept_labels)
    n_tp = np.count_nonzero(kept_labels)
    fps = fpr * n_fp / n_scans if n_fp else np.zeros_like(fpr)
    sens = tpr * n_tp / labels.sum()
    return np.interp(OPERATING_POINTS, fps, sens)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_froc_matches_official_algorithm_on_random_data(seed):
    annotations, detections, excluded, scans = random_case(seed)
    result = froc(annotations, detections, scans, excluded, n_bootstrap=0, max_detections_per_scan=None)
    expected = official_sensitivities(*official_froc_entries(annotations, detections, excluded, scans), len(scans))
    np.testing.assert_allclose(list(result.sensitivities_at_operating_points.values()), expected)


def test_max_detections_per_scan_keeps_most_suspicious():
    annotations = annotations_frame([("a", 0, 0, 0, 10)])
    detections = detections_frame([("a", 100 + i, 0, 0, p) for i, p in enumerate([0.9, 0.8, 0.8, 0.7])])
    assert froc(annotations, detections, ["a"], n_bootstrap=0, max_detections_per_scan=2).n_false_positives == 1
    assert froc(annotations, detections, ["a"], n_bootstrap=0, max_detections_per_scan=3).n_false_positives == 3


class FixedCounts:
    """Stands in for a Generator: hands out predetermined scan draw counts."""

    def __init__(self, counts: np.ndarray):
        self.counts = counts

    def multinomial(self, n, pvals, size):
        assert self.counts.shape == (size, n)
        return self.counts


def test_bootstrap_replicates_equal_froc_on_resampled_scans():
    annotations, detections, excluded, scans = random_case(5, n_scans=6, n_detections=60)
    rng = np.random.default_rng(9)
    counts = rng.multinomial(len(scans), np.full(len(scans), 1 / len(scans)), size=4)
    result = froc(annotations, detections, scans, excluded, n_bootstrap=4, rng=FixedCounts(counts))
    for replicate, row in enumerate(counts):
        copies = [(uid, f"{uid}#{k}") for uid, n in zip(scans, row) for k in range(n)]

        def resample(frame):
            parts = [frame[frame.seriesuid == uid].assign(seriesuid=name) for uid, name in copies]
            return pd.concat(parts, ignore_index=True)

        direct = froc(
            resample(annotations), resample(detections), [name for _, name in copies], resample(excluded),
            n_bootstrap=0,
        )
        assert result.bootstrap_cpm[replicate] == pytest.approx(direct.cpm, nan_ok=True)


def test_bootstrap_ci_brackets_estimate_and_is_seeded():
    annotations, detections, excluded, scans = random_case(4, n_scans=40, n_detections=400)
    first = froc(annotations, detections, scans, excluded, n_bootstrap=200, rng=np.random.default_rng(7))
    again = froc(annotations, detections, scans, excluded, n_bootstrap=200, rng=np.random.default_rng(7))
    other = froc(annotations, detections, scans, excluded, n_bootstrap=200, rng=np.random.default_rng(8))
    assert first.ci_low < first.cpm < first.ci_high
    assert (first.ci_low, first.ci_high) == (again.ci_low, again.ci_high)
    np.testing.assert_array_equal(first.bootstrap_cpm, again.bootstrap_cpm)
    assert not np.array_equal(first.bootstrap_cpm, other.bootstrap_cpm)
    assert np.all(first.bootstrap_sensitivity_low <= first.bootstrap_sensitivity_high)


def test_plot_froc_writes_png(tmp_path):
    annotations, detections, excluded, scans = random_case(6, n_scans=10, n_detections=50)
    result = froc(annotations, detections, scans, excluded, n_bootstrap=20)
    path = tmp_path / "plots" / "froc.png"
    plot_froc(result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["froc.png"]  # no temporary file left


# --- the book's confusion table -----------------------------------------------------


def test_confusion_table_uses_book_07_diameter_rule():
    truth = pd.DataFrame(
        {
            "center_x": [0.0, 100.0, 200.0],
            "center_y": 0.0,
            "center_z": 0.0,
            "diameter_mm": [10.0, 10.0, 4.0],
            "is_malignant": [False, True, True],
        }
    )
    detections = pd.DataFrame(
        {
            # 6 mm from A: outside its radius but within 0.7 x 10 mm; 7.0 from A would not match.
            "center_x": [6.0, 1.0, 100.0, 50.0, 300.0, 202.8],
            "center_y": 0.0,
            "center_z": 0.0,
            "nodule_probability": [0.9, 0.3, 0.8, 0.9, 0.1, 0.6],
            "malignancy_probability": [0.2, 0.9, 0.7, 0.9, 0.9, 0.1],
        }
    )
    table = confusion_table(truth, detections)
    expected = np.array(
        [
            [0, 1, 1, 1],  # unmatched: filtered (300), benign (202.8 = 0.7 x 4 mm from C), malignant (50)
            [0, 0, 1, 0],  # A: best of "benign" (6 mm) and "filtered" (1 mm)
            [1, 0, 0, 1],  # B predicted malignant; C missed
        ]
    )
    np.testing.assert_array_equal(table, expected)
    moved = detections.assign(center_x=[7.0, 20.0, 100.0, 50.0, 300.0, 202.8])
    assert confusion_table(truth, moved)[1].tolist() == [1, 0, 0, 0]
    assert confusion_table(truth, moved)[0].tolist() == [0, 2, 2, 1]


def test_confusion_table_thresholds_and_series():
    truth = pd.DataFrame(
        {"series_uid": ["a"], "center_x": [0.0], "center_y": [0.0], "center_z": [0.0],
         "diameter_mm": [10.0], "is_malignant": [True]}
    )
    detections = pd.DataFrame(
        {"series_uid": ["a", "b"], "center_x": [0.0, 0.0], "center_y": [0.0, 0.0], "center_z": [0.0, 0.0],
         "nodule_probability": [0.7, 0.7], "malignancy_probability": [0.6, 0.6]}
    )
    table = confusion_table(truth, detections, nodule_threshold=0.5, malignancy_threshold=0.65)
    np.testing.assert_array_equal(table, [[0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 1, 0]])
    assert confusion_table(truth, detections, nodule_threshold=0.8)[2].tolist() == [0, 1, 0, 0]


def test_format_confusion_table():
    text = format_confusion_table(np.array([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]))
    lines = text.splitlines()
    assert len(lines) == 4
    assert "Complete miss" in lines[0] and "Pred. malignant" in lines[0]
    assert lines[1].split("|")[1].strip() == ""  # no complete-miss cell for non-nodules
    assert lines[3].split("|")[0].strip() == "Malignant" and lines[3].split("|")[-1].strip() == "11"


def test_evaluate_merges_folds_into_the_official_froc(tmp_path: Path) -> None:
    """Three folds' findings and series lists, merged by ``evaluate``, score as the official port scores the
    whole case (scans with no findings included through their fold's series list)."""
    annotations, detections, excluded, scans = random_case(4)
    annotations.to_csv(tmp_path / "annotations.csv", index=False)
    excluded.to_csv(tmp_path / "excluded.csv", index=False)
    argv = []
    for fold, fold_scans in enumerate([scans[0::3], scans[1::3], scans[2::3]]):
        detections[detections.seriesuid.isin(fold_scans)].to_csv(tmp_path / f"findings{fold}.csv", index=False)
        (tmp_path / f"series{fold}.csv").write_text("".join(f"{uid}\n" for uid in fold_scans))
        argv += [str(tmp_path / f"findings{fold}.csv")]
    for fold in range(3):
        argv += ["--series-list", str(tmp_path / f"series{fold}.csv")]
    output = tmp_path / "merged"
    assert evaluate.main([*argv, "--annotations", str(tmp_path / "annotations.csv"), "--annotations-excluded",
                          str(tmp_path / "excluded.csv"), "--bootstrap", "0", "--output", str(output)]) == 0
    saved = json.loads((output / "froc.json").read_text())
    expected = official_sensitivities(*official_froc_entries(annotations, detections, excluded, scans), len(scans))
    np.testing.assert_allclose(list(saved["sensitivities_at_operating_points"].values()), expected)
    assert saved["cpm"] == pytest.approx(float(np.mean(expected)))
    assert saved["n_scans"] == len(scans)


def test_evaluate_refuses_a_series_in_two_folds(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    annotations, detections, _, scans = random_case(5, n_scans=4, n_detections=20)
    annotations.to_csv(tmp_path / "annotations.csv", index=False)
    shared = detections.seriesuid.iloc[0]
    detections[detections.seriesuid == shared].to_csv(tmp_path / "a.csv", index=False)
    detections.to_csv(tmp_path / "b.csv", index=False)
    code = evaluate.main([str(tmp_path / "a.csv"), str(tmp_path / "b.csv"), "--annotations",
                          str(tmp_path / "annotations.csv"), "--bootstrap", "0"])
    error = capsys.readouterr().err.strip()
    assert code != 0 and len(error.splitlines()) == 1
    assert f"series {shared} is in two findings files" in error and "a.csv" in error and "b.csv" in error
    (tmp_path / "s1.csv").write_text(f"{scans[0]}\n{scans[1]}\n")
    (tmp_path / "s2.csv").write_text(f"{scans[1]}\n")
    code = evaluate.main([str(tmp_path / "a.csv"), "--annotations", str(tmp_path / "annotations.csv"),
                          "--series-list", str(tmp_path / "s1.csv"), "--series-list", str(tmp_path / "s2.csv")])
    assert code != 0 and f"series {scans[1]} is in two series lists" in capsys.readouterr().err
