"""Choosing the best checkpoint: the validation figures that rank epochs, and the nodule task's FROC.

A task names the metrics that rank its checkpoints, most important first (:meth:`Task.selection`): the nodule
classifier ranks by the LUNA16 CPM of its validation candidates, ties broken by ROC AUC, then by the validation
loss; the segmenter, with ``--score-metric candidates``, by the share of validation nodules that
diagnosis' grouping makes a candidate of, ties broken by fewer candidates per CT, then by pixel recall; the other
tasks keep their single per-sample score. Higher is better except for the metrics in
:data:`LOWER_IS_BETTER`, and NaN counts as worst.

Why the loss: a few validation series saturate CPM and AUC at 1.0 within a few epochs, and without it the first
epoch to reach the ceiling was kept -- epoch 6 of 46 in a 15-minute recipe run, while the loss went on falling
from 0.08 to 0.002 (docs/benchmarks.md, "Ties of a saturated validation set").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import pandas as pd

from p2ch_luna.evaluation.truth import Truth, luna_annotations, luna_detections
from p2ch_luna.metrics.froc import OPERATING_POINTS, froc

CPM_KEY = "cpm"
"""Metric key of the LUNA16 CPM (mean sensitivity at 1/8 ... 8 false positives per scan)."""


def sensitivity_key(fps_per_scan: float) -> str:
    """Metric key of the FROC sensitivity at ``fps_per_scan`` false positives per scan (``sens_at_1fp``)."""
    return f"sens_at_{fps_per_scan:g}fp"


CANDIDATES_PER_CT_KEY = "candidates_per_ct"
"""Metric key of the candidates per validation CT that diagnosis' grouping makes of a segmenter's mask."""

LOWER_IS_BETTER = frozenset({"loss", CANDIDATES_PER_CT_KEY})
"""Metric keys ranked the other way round (smaller is better)."""

FROC_KEYS: tuple[str, ...] = (CPM_KEY, *(sensitivity_key(point) for point in OPERATING_POINTS))
"""Every metric key :func:`froc_metrics` returns."""


@dataclasses.dataclass(frozen=True)
class Scores:
    """The validation figures that rank one checkpoint: ``values[i]`` is metric ``names[i]``, most important
    first."""

    names: tuple[str, ...]
    values: tuple[float, ...]

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float], names: Sequence[str]) -> Scores:
        """The figures ``names`` of ``metrics`` (a missing one is NaN)."""
        return cls(tuple(names), tuple(float(metrics.get(name, math.nan)) for name in names))

    def ranked(self) -> tuple[float, ...]:
        """The values as compared, larger better: those of :data:`LOWER_IS_BETTER` negated, NaN replaced by -inf
        (worst)."""
        return tuple(-math.inf if math.isnan(value) else -value if name in LOWER_IS_BETTER else value
                     for name, value in zip(self.names, self.values))

    def describe(self) -> str:
        """``cpm 0.5000, roc_auc 0.9000`` for log lines."""
        return ", ".join(f"{name} {value:.4f}" for name, value in zip(self.names, self.values))


def is_better(new: Scores, best: Scores | None) -> bool:
    """Whether ``new`` outranks ``best``: compared figure by figure, the first difference decides (so the
    second figure breaks ties of the first); equal is not better. Anything beats no best (None)."""
    if best is None:
        return True
    if new.names != best.names:
        raise ValueError(f"scores ranked by {', '.join(new.names)} cannot be compared with {', '.join(best.names)}")
    return new.ranked() > best.ranked()


def froc_metrics(marks: pd.DataFrame, truth: Truth, series_uids: Sequence[str]) -> dict[str, float]:
    """LUNA16 CPM and FROC sensitivities of ``marks`` (``series_uid, center_x/y/z, nodule_probability``)
    against ``truth``'s nodules over the scans ``series_uids`` (false positives per scan divide by their
    number).

    The official rules of :func:`p2ch_luna.metrics.froc.froc`: a mark strictly within a nodule's radius hits it,
    a nodule's lower-scoring extra hits and marks on excluded findings are ignored, each scan keeps its 100 most
    probable marks. No bootstrap (it runs every validation epoch). NaN everywhere when the scans hold no nodule.
    """
    result = froc(luna_annotations(truth.nodules), luna_detections(marks), list(series_uids), truth.excluded,
                  n_bootstrap=0)
    at_points = result.sensitivities_at_operating_points
    return {CPM_KEY: result.cpm, **{sensitivity_key(point): at_points[point] for point in OPERATING_POINTS}}
