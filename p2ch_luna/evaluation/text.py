"""Scores as text: the book's confusion table and a FROC summary."""

from __future__ import annotations

import numpy as np

from p2ch_luna.metrics.confusion import CONFUSION_COLUMNS, CONFUSION_ROWS
from p2ch_luna.metrics.froc import FrocResult


def format_froc(result: FrocResult) -> str:
    """A FROC as text: CPM with CI, the sensitivity at the seven operating points, counts."""
    lines = [
        f"CPM: {result.cpm:.4f}"
        + (
            f"  ({result.confidence:.0%} CI {result.ci_low:.4f} - {result.ci_high:.4f}, "
            f"{result.n_bootstrap} bootstrap samples over scans)"
            if result.n_bootstrap > 0
            else ""
        ),
        "Sensitivity at average FPs per scan:",
    ]
    lines += [f"  {point:>6g}: {value:.4f}" for point, value in result.sensitivities_at_operating_points.items()]
    lines.append(
        f"Nodules detected: {result.n_detected_nodules}/{result.n_nodules}; "
        f"false positives: {result.n_false_positives}; ignored marks: {result.n_ignored}; "
        f"scans: {result.n_scans}"
    )
    return "\n".join(lines)


def format_confusion_table(table: np.ndarray) -> str:
    """The confusion table as aligned text (the non-nodule complete-miss cell is blank)."""
    table = np.asarray(table)
    width = max(len(name) for name in (*CONFUSION_ROWS, *CONFUSION_COLUMNS, str(table.max(initial=0))))
    cell = f"{{:>{width}}}"
    lines = [" | ".join(cell.format(text) for text in ("", *CONFUSION_COLUMNS))]
    for i, (name, counts) in enumerate(zip(CONFUSION_ROWS, table)):
        values = ["" if i == 0 and j == 0 else str(int(count)) for j, count in enumerate(counts)]
        lines.append(" | ".join(cell.format(text) for text in (name, *values)))
    return "\n".join(lines)
