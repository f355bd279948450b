"""Synthetic chest CTs in the LUNA16 format (``python -m p2ch_luna.synth``) and nodules implanted into real CTs."""

from __future__ import annotations

from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """The ``python -m p2ch_luna.synth`` command (imported on call, so importing the package stays light)."""
    from p2ch_luna.synth.generator import main as run

    return run(argv)
