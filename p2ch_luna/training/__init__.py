"""Training: ``python -m p2ch_luna.training TASK`` (nodule, malignancy, segmentation).

The options and their checks live in :mod:`p2ch_luna.training.cli`, the run (set-up, resume, epochs,
checkpoints) in :mod:`p2ch_luna.training.loop`, one epoch's training and validation in
:mod:`p2ch_luna.training.engine`, the tasks in :mod:`p2ch_luna.training.tasks`.
"""

from __future__ import annotations

from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """The ``python -m p2ch_luna.training`` command (imported on call, so importing the package stays light)."""
    from p2ch_luna.training.cli import main as run

    return run(argv)
