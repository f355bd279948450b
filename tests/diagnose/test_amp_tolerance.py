"""bfloat16 against float32 on a real CT with the book's classifier, at the stated tolerance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from p2ch_luna.diagnose import classify
from p2ch_luna.diagnose.lungs import find_lungs
from p2ch_luna.io.ct import load_ct
from p2ch_luna.models.checkpoint import load_checkpoint
from p2ch_luna.precision import BFLOAT16_PROBABILITY_TOLERANCE

BOOK_CLASSIFIER = "cls_2020-02-06_14.16.55_final-nodule-nonnodule.best.state"


def test_bfloat16_nodule_probabilities_stay_within_the_tolerance_of_float32(cptac_dir: Path,
                                                                            book_checkpoints_dir: Path) -> None:
    ct = load_ct(cptac_dir)
    lungs = find_lungs(ct.hu, tuple(float(v) for v in ct.geometry.spacing_irc))
    dense = np.argwhere(lungs.mask & (ct.hu >= -300))  # vessel cross-sections: what diagnosis classifies
    rng = np.random.default_rng(0)
    centers = dense[rng.choice(len(dense), size=48, replace=False)]
    model = load_checkpoint(book_checkpoints_dir / BOOK_CLASSIFIER).model
    cpu = torch.device("cpu")
    full = classify.classify_chunks(ct.hu, centers, model, 16, cpu, flips=True)
    half = classify.classify_chunks(ct.hu, centers, model, 16, cpu, amp=True, flips=True)
    assert np.ptp(full) > 0.1  # the sample spans probabilities, not only near-zero ones
    assert np.max(np.abs(half - full)) <= BFLOAT16_PROBABILITY_TOLERANCE
    clear = np.abs(full - 0.5) > BFLOAT16_PROBABILITY_TOLERANCE
    assert np.array_equal((half >= 0.5)[clear], (full >= 0.5)[clear])
