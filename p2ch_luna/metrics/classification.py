"""Classification metrics: accuracy per class, precision/recall/F1, exact ROC AUC and curves."""

from __future__ import annotations

import numpy as np

DEFAULT_CLASSIFICATION_THRESHOLD = 0.5


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, ``nan`` when the denominator is 0."""
    return float(numerator) / float(denominator) if denominator else float("nan")


def classification_metrics(
    labels: np.ndarray,
    probabilities: np.ndarray,
    threshold: float = DEFAULT_CLASSIFICATION_THRESHOLD,
) -> dict[str, float]:
    """Confusion counts and the ratios the book logs, for binary predictions.

    A sample is predicted positive when its probability is above ``threshold``
    (the book's ``> threshold`` rule). ``positive_accuracy`` equals recall;
    ``roc_auc`` is threshold-free.
    """
    labels = np.asarray(labels, dtype=bool).ravel()
    probabilities = np.asarray(probabilities, dtype=np.float64).ravel()
    if labels.shape != probabilities.shape:
        raise ValueError(f"labels {labels.shape} and probabilities {probabilities.shape} differ in shape")
    predicted = probabilities > threshold
    tp = int(np.count_nonzero(predicted & labels))
    fp = int(np.count_nonzero(predicted & ~labels))
    tn = int(np.count_nonzero(~predicted & ~labels))
    fn = int(np.count_nonzero(~predicted & labels))
    return {
        "accuracy": ratio(tp + tn, labels.size),
        "negative_accuracy": ratio(tn, tn + fp),
        "positive_accuracy": ratio(tp, tp + fn),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "roc_auc": roc_auc(labels, probabilities),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` (1-D, no NaN), tied values sharing the mean of their ranks: what
    ``scipy.stats.rankdata(values, method="average")`` gives, without importing ``scipy.stats`` (a share of
    diagnosis' start-up: docs/benchmarks.md, "Start-up without scipy.stats")."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.concatenate(([0], np.flatnonzero(ordered[1:] != ordered[:-1]) + 1))
    ends = np.append(starts[1:], values.size)
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact area under the ROC curve (Mann-Whitney U, ties get the average rank).

    Equals the probability that a random positive scores above a random negative,
    ties counting one half; ``nan`` when only one class is present.
    """
    labels = np.asarray(labels, dtype=bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_positive = int(np.count_nonzero(labels))
    n_negative = labels.size - n_positive
    if n_positive == 0 or n_negative == 0:
        return float("nan")
    ranks = average_ranks(scores)
    rank_sum = float(ranks[labels].sum())
    return (rank_sum - n_positive * (n_positive + 1) / 2.0) / (n_positive * n_negative)


def _cumulative_counts(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True/false positive counts at each distinct score, highest score first."""
    labels = np.asarray(labels, dtype=bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    sorted_labels = labels[order]
    last_of_tie = np.r_[np.diff(sorted_scores) != 0, True] if sorted_scores.size else np.zeros(0, bool)
    tps = np.cumsum(sorted_labels)[last_of_tie]
    fps = np.cumsum(~sorted_labels)[last_of_tie]
    return tps, fps, sorted_scores[last_of_tie]


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points for every distinct score, predicting positive when ``score >= threshold``.

    Returns ``(fpr, tpr, thresholds)`` starting at ``(0, 0, inf)``; thresholds
    decrease. A rate is ``nan`` when its class is absent.
    """
    tps, fps, thresholds = _cumulative_counts(labels, scores)
    tps = np.r_[0, tps].astype(np.float64)
    fps = np.r_[0, fps].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tps / tps[-1] if tps[-1] else np.full_like(tps, np.nan)
        fpr = fps / fps[-1] if fps[-1] else np.full_like(fps, np.nan)
    return fpr, tpr, np.r_[np.inf, thresholds]


def precision_recall_curve(
    labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall when predicting positive for ``score >= threshold``.

    Returns ``(precision, recall, thresholds)`` with one entry per distinct score,
    highest threshold first (recall increases along the arrays). Recall is ``nan``
    when there are no positives.
    """
    tps, fps, thresholds = _cumulative_counts(labels, scores)
    tps = tps.astype(np.float64)
    n_positive = tps[-1] if tps.size else 0.0
    precision = tps / (tps + fps)
    recall = tps / n_positive if n_positive else np.full_like(tps, np.nan)
    return precision, recall, thresholds
