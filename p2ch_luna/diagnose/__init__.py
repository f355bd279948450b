"""Diagnosis: ``python -m p2ch_luna.diagnose``: lungs, segmentation, grouping, classification."""

from __future__ import annotations

from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """The ``python -m p2ch_luna.diagnose`` command (imported on call, so importing the package stays light)."""
    from p2ch_luna.diagnose.cli import main as run

    return run(argv)
