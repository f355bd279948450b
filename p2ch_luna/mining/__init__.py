"""Hard negatives from our own segmenter: ``python -m p2ch_luna.mining --segmentation-path S``.

The classic false-positive-reduction loop the book's chapter 14 discusses but does not close: run the
diagnosis' lungs → segmentation → grouping on the *training* series, label every candidate it makes by the
LUNA16 radius rule against the annotations, and store the table beside the cache. Nodule training then
draws part of its negatives from it (``training nodule --hard-negatives-from S``), so the classifier sees
the candidates diagnosis will hand it, and its positives at the centres the grouping gives them.
Validation series are never mined.
"""

from __future__ import annotations

from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """The ``python -m p2ch_luna.mining`` command (imported on call, so importing the package stays light)."""
    from p2ch_luna.mining.cli import main as run

    return run(argv)
