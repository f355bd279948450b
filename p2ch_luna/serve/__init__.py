"""HTTP service of the diagnosis: ``python -m p2ch_luna.serve --models-dir DIR`` (:mod:`p2ch_luna.serve.cli`)."""

from __future__ import annotations

from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """The ``python -m p2ch_luna.serve`` command (imported on call: FastAPI is an optional extra)."""
    from p2ch_luna.serve.cli import main as run

    return run(argv)
