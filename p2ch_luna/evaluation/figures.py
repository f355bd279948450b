"""Scores as pictures: the FROC curve."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from p2ch_luna.io.atomic import atomic_path
from p2ch_luna.metrics.froc import FrocResult

PLOT_CURVE_POINTS = 512
PLOT_MARGIN = 1.5
"""The x axis extends this factor beyond 1/8 and 8 FPs per scan."""


def plot_froc(result: FrocResult, path: str | Path, title: str = "FROC") -> None:
    """Draw the FROC curve (log-2 x axis, operating points marked, bootstrap band) to a PNG.

    Renders with the Agg canvas of a bare ``Figure``, so it works headless and
    leaves pyplot's backend alone; the file is written atomically.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    figure = Figure(figsize=(6, 4.5))
    axes = figure.subplots()
    points = list(result.sensitivities_at_operating_points)
    x_range = (points[0] / PLOT_MARGIN, points[-1] * PLOT_MARGIN)
    fps = np.geomspace(*x_range, PLOT_CURVE_POINTS)
    sensitivity = np.interp(fps, result.fps_per_scan, result.sensitivity)
    axes.plot(fps, sensitivity, lw=2, label=f"CPM {result.cpm:.3f}")
    axes.plot(points, list(result.sensitivities_at_operating_points.values()), "o", color="C0")
    if result.n_bootstrap > 0:
        axes.fill_between(
            result.bootstrap_fps_grid,
            result.bootstrap_sensitivity_low,
            result.bootstrap_sensitivity_high,
            alpha=0.2,
            color="C0",
            label=f"{result.confidence:.0%} bootstrap band",
        )
    axes.set_xscale("log", base=2)
    axes.set_xticks(points, [f"{p:g}" for p in points])
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlim(*x_range)
    axes.set_ylim(0.0, 1.0)
    axes.set_xlabel("Average number of false positives per scan")
    axes.set_ylabel("Sensitivity")
    axes.set_title(f"{title} ({result.n_nodules} nodules, {result.n_scans} scans)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    with atomic_path(path, suffix=".png") as tmp_path:
        figure.savefig(tmp_path, format="png", dpi=120)
