"""TensorBoard helpers: run folders, scalars, curves, histograms, config text and HParams.

The writer is always passed in (``torch.utils.tensorboard.SummaryWriter`` or
anything with its methods); nothing here opens one by itself except
:func:`open_writers`, which the entry point calls on rank 0 only.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from p2ch_luna.metrics.classification import roc_curve

log = logging.getLogger(__name__)

HISTOGRAM_BINS = 50
MODES = ("trn", "val")


def run_dirs(runs_dir: Path, tb_prefix: str, run_time: str, task_name: str, comment: str) -> dict[str, Path]:
    """``runs/<prefix>/<time>-<trn|val>-<task>-<comment>`` for each mode."""
    return {mode: Path(runs_dir) / tb_prefix / f"{run_time}-{mode}-{task_name}-{comment}" for mode in MODES}


def open_writers(dirs: Mapping[str, Path]) -> dict[str, Any]:
    """One SummaryWriter per mode (imported here: TensorBoard is only needed on rank 0)."""
    from torch.utils.tensorboard import SummaryWriter

    return {mode: SummaryWriter(log_dir=str(path)) for mode, path in dirs.items()}


def add_scalars(writer: Any, scalars: Mapping[str, float], step: int) -> None:
    """Write finite scalars (NaN ratios of empty classes are skipped)."""
    for tag, value in scalars.items():
        if value is not None and math.isfinite(float(value)):
            writer.add_scalar(tag, float(value), step)


def add_classification_curves(writer: Any, labels: np.ndarray, probabilities: np.ndarray, step: int) -> None:
    """PR curve, ROC curve figure and histograms of the predicted probability per class."""
    labels = np.asarray(labels, dtype=bool)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if labels.size == 0:
        return
    writer.add_pr_curve("pr", labels, probabilities, step)
    for name, mask in (("prob/neg", ~labels), ("prob/pos", labels)):
        if mask.any():
            writer.add_histogram(name, probabilities[mask], step, bins=np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1))
    if labels.any() and (~labels).any():
        writer.add_figure("roc", roc_figure(labels, probabilities), step)


def roc_figure(labels: np.ndarray, probabilities: np.ndarray) -> Any:
    """A matplotlib (Agg) ROC figure; the caller's writer closes it."""
    from matplotlib.figure import Figure

    fpr, tpr, _ = roc_curve(labels, probabilities)
    figure = Figure(figsize=(4, 4), dpi=100)
    axes = figure.add_subplot()
    axes.plot(fpr, tpr, lw=1.5)
    axes.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.01)
    figure.tight_layout()
    return figure


def add_config_text(writer: Any, config: Mapping[str, Any]) -> None:
    """The resolved config as a JSON code block on the TEXT tab."""
    text = json.dumps(config, indent=2, sort_keys=True, default=str)
    writer.add_text("config", "```\n" + text + "\n```", 0)


def add_hparams(writer: Any, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
    """HParams entry of the run (into the writer's own folder) so runs can be compared."""
    plain = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
             for key, value in hparams.items() if value is not None}
    finite = {f"hparam/{key}": float(value) for key, value in metrics.items()
              if isinstance(value, (int, float)) and math.isfinite(float(value))}
    writer.add_hparams(plain, finite, run_name=".")
