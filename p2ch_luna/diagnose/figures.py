"""A PNG per finding: axial, coronal and sagittal views through it, marked with a circle of its size."""

from __future__ import annotations

import io
import logging
from typing import Any, Sequence

import numpy as np
import pandas as pd

from p2ch_luna.io.ct import HU_MIN, Ct

log = logging.getLogger(__name__)

MAX_FIGURES_PER_SERIES = 20
"""Figures are drawn for the most probable findings only (a poor model may report hundreds)."""
FIGURE_DPI = 80
FIGURE_WINDOW_HU = (-1000, 400)
"""Display window of the figures (lung window)."""
PNG_COMPRESS_LEVEL = 1
"""zlib level of the findings' PNGs: PIL's default (6) spends much of a figure's time encoding
for files only slightly smaller."""
FIGURE_VIEW_MM = 80.0
"""Distance shown on each side of a finding in each view, in millimetres (a 160 mm square)."""



def render_findings(ct: Ct, found: pd.DataFrame, lung_mask: np.ndarray | None = None) -> dict[str, bytes]:
    """A PNG per finding (the most probable first, at most ``MAX_FIGURES_PER_SERIES``), keyed by file name.

    One figure is drawn once and redrawn for each finding (:class:`FindingFigure`).
    """
    if len(found) > MAX_FIGURES_PER_SERIES:
        log.info("%s: figures for the %d most probable of %d findings", ct.series_uid, MAX_FIGURES_PER_SERIES,
                 len(found))
    shown = found.head(MAX_FIGURES_PER_SERIES)
    if shown.empty:
        return {}
    figure = FindingFigure(ct.geometry.spacing_irc)
    return {f"{ct.series_uid}_finding{number:03d}.png": figure.render(ct, row, number, lung_mask)
            for number, (_, row) in enumerate(shown.iterrows(), start=1)}


def render_finding(ct: Ct, row: pd.Series, number: int, lung_mask: np.ndarray | None = None) -> bytes:
    """Axial, coronal and sagittal views through a finding, marked with a circle of its size."""
    return FindingFigure(ct.geometry.spacing_irc).render(ct, row, number, lung_mask)


def view_window(plane: np.ndarray, center: tuple[int, int], half: tuple[int, int], fill: Any) -> np.ndarray:
    """The ``(2 * half + 1)``-pixel window of ``plane`` centred on ``center``; ``fill`` beyond its edges."""
    window = np.full((2 * half[0] + 1, 2 * half[1] + 1), fill, dtype=plane.dtype)
    source, target = [], []
    for axis in range(2):
        start = center[axis] - half[axis]
        low, high = max(start, 0), min(center[axis] + half[axis] + 1, plane.shape[axis])
        source.append(slice(low, max(high, low)))
        target.append(slice(low - start, max(high, low) - start))
    window[tuple(target)] = plane[tuple(source)]
    return window


class FindingFigure:
    """Axial, coronal and sagittal views up to ``FIGURE_VIEW_MM`` around a finding, for one CT's spacing.

    The figure, its axes and images are made once and only their contents
    change from one finding to the next: in matplotlib, building a figure and
    laying it out cost more than drawing it. Beyond the CT's edges the views
    show air.
    """

    # (name, vertical axis, horizontal axis) per view: axial (row, col), coronal (index, col), sagittal (index, row)
    VIEWS = (("axial", 1, 2), ("coronal", 0, 2), ("sagittal", 0, 1))

    def __init__(self, spacing_irc: Sequence[float]) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Ellipse

        self.spacing = np.asarray(spacing_irc, dtype=np.float64)
        self.half = np.maximum(np.rint(FIGURE_VIEW_MM / self.spacing), 1).astype(int)
        self.figure = Figure(figsize=(12, 4.4), dpi=FIGURE_DPI)
        FigureCanvasAgg(self.figure)
        self.figure.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.86, wspace=0.05)
        self.axes = self.figure.subplots(1, 3)
        self.images, self.circles, self.contours = [], [], [None, None, None]
        for axis, (name, vertical, horizontal) in zip(self.axes, self.VIEWS):
            shape = (2 * self.half[vertical] + 1, 2 * self.half[horizontal] + 1)
            self.images.append(axis.imshow(
                np.full(shape, HU_MIN, dtype=np.int16), cmap="gray", vmin=FIGURE_WINDOW_HU[0],
                vmax=FIGURE_WINDOW_HU[1], aspect=self.spacing[vertical] / self.spacing[horizontal],
                origin="lower" if vertical == 0 else "upper", interpolation="nearest"))
            circle = Ellipse((self.half[horizontal], self.half[vertical]), 1.0, 1.0, fill=False, color="red",
                             linewidth=1.2)
            axis.add_patch(circle)
            self.circles.append(circle)
            axis.set_autoscale_on(False)  # the lung contours must not move the view
            axis.set_title(name)
            axis.set_xticks([])
            axis.set_yticks([])

    def render(self, ct: Ct, row: pd.Series, number: int, lung_mask: np.ndarray | None = None) -> bytes:
        """The PNG of finding ``row`` (a candidate row of :mod:`p2ch_luna.diagnose`) of ``ct``."""
        center = np.clip(np.rint([row["index"], row["row"], row["col"]]).astype(int), 0, np.array(ct.shape) - 1)
        radius_mm = max(float(row["diameter_mm"]), 3.0) / 2 + 2.0
        for view, (axis, (_, vertical, horizontal)) in enumerate(zip(self.axes, self.VIEWS)):
            through = tuple(slice(None) if a in (vertical, horizontal) else int(center[a]) for a in range(3))
            window_center = (int(center[vertical]), int(center[horizontal]))
            window_half = (int(self.half[vertical]), int(self.half[horizontal]))
            self.images[view].set_data(view_window(ct.hu[through], window_center, window_half, HU_MIN))
            self.circles[view].set_width(2 * radius_mm / self.spacing[horizontal])
            self.circles[view].set_height(2 * radius_mm / self.spacing[vertical])
            if self.contours[view] is not None:
                self.contours[view].remove()
                self.contours[view] = None
            if lung_mask is not None:
                lungs = view_window(lung_mask[through], window_center, window_half, False)
                if lungs.any() and not lungs.all():
                    self.contours[view] = axis.contour(lungs.astype(np.float32), levels=[0.5], colors="tab:blue",
                                                       linewidths=0.6)
        malignancy = row["malignancy_probability"]
        self.figure.suptitle(
            f"{ct.series_uid} finding {number}: nodule {row['nodule_probability']:.2f}"
            + ("" if pd.isna(malignancy) else f", malignancy {malignancy:.2f}")
            + f", ~{row['diameter_mm']:.1f} mm at ({row['center_x']:.1f}, {row['center_y']:.1f}, "
            f"{row['center_z']:.1f}) mm", fontsize=9)
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL})
        return buffer.getvalue()
