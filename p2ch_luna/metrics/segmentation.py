"""Pixel metrics of a segmentation: counts, dice, precision, recall and the book's rates."""

from __future__ import annotations

import numpy as np

from p2ch_luna.metrics.classification import ratio


def segmentation_counts(pred_mask: np.ndarray, label_mask: np.ndarray) -> tuple[int, int, int]:
    """Pixel ``(tp, fp, fn)`` of a predicted boolean mask against the label mask."""
    pred_mask = np.asarray(pred_mask, dtype=bool)
    label_mask = np.asarray(label_mask, dtype=bool)
    if pred_mask.shape != label_mask.shape:
        raise ValueError(f"mask shapes differ: {pred_mask.shape} vs {label_mask.shape}")
    tp = int(np.count_nonzero(pred_mask & label_mask))
    fp = int(np.count_nonzero(pred_mask & ~label_mask))
    fn = int(np.count_nonzero(~pred_mask & label_mask))
    return tp, fp, fn


def dice_score(pred_mask: np.ndarray, label_mask: np.ndarray) -> float:
    """Dice coefficient 2|P∩L| / (|P| + |L|); ``nan`` when both masks are empty."""
    tp, fp, fn = segmentation_counts(pred_mask, label_mask)
    return ratio(2 * tp, 2 * tp + fp + fn)


def segmentation_metrics(tp: float, fp: float, fn: float) -> dict[str, float]:
    """Pixel metrics from summed counts, with rates relative to label positives.

    As in the book's segmentation training, ``tp_rate``, ``fn_rate`` and
    ``fp_rate`` are all divided by the number of label pixels (``tp + fn``), so
    ``fp_rate`` can exceed 1.
    """
    label_positives = tp + fn
    return {
        "dice": ratio(2 * tp, 2 * tp + fp + fn),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, label_positives),
        "tp_rate": ratio(tp, label_positives),
        "fn_rate": ratio(fn, label_positives),
        "fp_rate": ratio(fp, label_positives),
    }
