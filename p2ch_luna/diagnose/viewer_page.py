"""What the viewer page (:mod:`p2ch_luna.viewer.page`) shows of a diagnosis: series, findings, truth, FROC."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from p2ch_luna import RESEARCH_NOTICE
from p2ch_luna.diagnose.pipeline import DiagnoseConfig, SeriesDiagnosis, findings
from p2ch_luna.io.atomic import atomic_write_text
from p2ch_luna.metrics.froc import FrocResult
from p2ch_luna.viewer.page import PAGE_FILE, render_page, series_folder, write_slices
from p2ch_luna.viewer.slices import CODE_SEGMENTS, WINDOW_PRESETS, ViewerSlices

log = logging.getLogger(__name__)


def write_viewer(folder: Path, results: Sequence[SeriesDiagnosis], nodules_of: Callable[[str], pd.DataFrame | None],
                 froc: FrocResult | None, config: DiagnoseConfig,
                 froc_image: str | None = None) -> int:
    """Write ``folder/index.html`` and its slices for the results that carry :class:`ViewerSlices`; returns bytes.

    ``froc_image`` names the FROC figure beside the page, shown with the CPM of ``froc``; ``nodules_of`` gives a series' annotated nodules scored against its
    findings (None without truth).
    """
    folder = Path(folder)
    shown = [result for result in results if result.viewer is not None]
    series = []
    total = 0
    for number, result in enumerate(shown):
        total += write_slices(folder / series_folder(number), result.viewer)
        series.append(series_data(result, nodules_of(result.series_uid), config, series_folder(number)))
    froc_data = None if froc is None else {"image": froc_image, **_finite(froc.summary())}
    page = render_page({
        "notice": RESEARCH_NOTICE,
        "nodule_threshold": config.nodule_threshold,
        "malignancy_threshold": config.malignancy_threshold,
        "code_segments": [list(segment) for segment in CODE_SEGMENTS],
        "windows": {name: list(window) for name, window in WINDOW_PRESETS.items()},
        "froc": froc_data,
        "series": series,
    })
    atomic_write_text(folder / PAGE_FILE, page)
    total += len(page.encode())
    log.info("viewer: %s and %d series' slices, %.1f MB", PAGE_FILE, len(series), total / 1e6)
    return total


def series_data(result: SeriesDiagnosis, truth: pd.DataFrame | None, config: DiagnoseConfig,
                folder: str) -> dict[str, Any]:
    """What the page knows of one series: geometry, which slices have masks, findings, truth."""
    slices: ViewerSlices = result.viewer
    found = findings(result, config).sort_values("nodule_probability", ascending=False, kind="mergesort")
    rows = []
    for number, (_, row) in enumerate(found.iterrows(), start=1):
        rows.append({
            "number": number,
            "probability": float(row["nodule_probability"]),
            "malignancy": _number(row.get("malignancy_probability")),
            "diameter_mm": float(row["diameter_mm"]),
            "xyz": [float(row["center_x"]), float(row["center_y"]), float(row["center_z"])],
            "irc": [float(row["index"]), float(row["row"]), float(row["col"])],
        })
    return {
        "uid": result.series_uid,
        "source": result.source,
        "folder": folder,
        "shape": [int(n) for n in result.shape_irc],
        "spacing": [float(v) for v in result.spacing_irc],
        "z_mm": _slice_z(result),
        "lung_slices": sorted(slices.lung_masks),
        "nodule_slices": sorted(slices.nodule_masks),
        "findings": rows,
        "truth": None if truth is None else _truth_rows(truth, result),
    }


def _truth_rows(truth: pd.DataFrame, result: SeriesDiagnosis) -> list[dict[str, Any]]:
    xyz = truth[["center_x", "center_y", "center_z"]].to_numpy(np.float64)
    irc = result.geometry.xyz_to_irc_continuous(xyz) if len(truth) else np.zeros((0, 3))
    rows = []
    for number, ((_, row), point) in enumerate(zip(truth.iterrows(), np.atleast_2d(irc)), start=1):
        rows.append({
            "number": number,
            "diameter_mm": float(row["diameter_mm"]),
            "xyz": [float(v) for v in row[["center_x", "center_y", "center_z"]]],
            "irc": [float(v) for v in point],
            "detected": bool(row["is_detected"]),
            "finding": int(row["finding"]),
            "probability": _number(row["nodule_probability"]),
            "distance_mm": _number(row["distance_mm"]),
        })
    return rows


def _slice_z(result: SeriesDiagnosis) -> list[float] | None:
    if result.geometry is None:
        return None
    count = result.shape_irc[0]
    centre = np.column_stack([np.arange(count), np.full(count, result.shape_irc[1] / 2),
                              np.full(count, result.shape_irc[2] / 2)])
    return [round(float(z), 2) for z in result.geometry.irc_to_xyz(centre)[:, 2]]


def _number(value: Any) -> float | None:
    """A float for JSON, None for a missing or non-finite value."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float (a CI of too few nodules) as None, for strict JSON."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return _number(value)
    return value
