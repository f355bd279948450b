"""The segmenter judged by what diagnosis hands the classifier (``training segmentation --score-metric candidates``).

Pixel recall, the book's selection, rewards a segmenter for marking more, however many candidates diagnosis then
groups from its mask; it kept the first epoch in the recipe runs measured. This validation runs diagnosis' own lungs →
segmentation → grouping (the mining code, :func:`p2ch_luna.mining.run.candidates_in_lungs`) on whole validation
CTs each validation epoch and reports ``candidate_recall`` (annotated nodules that at least one candidate hits by
the LUNA16 radius rule) and ``candidates_per_ct``. The best checkpoint is the one with the highest candidate
recall, ties broken by fewer candidates per CT, then by pixel recall. Measured: docs/benchmarks.md,
"Segmenter chosen by its candidates".

At most ``max_series`` validation series are run (those holding annotated nodules first, in UID order), so an
epoch's cost stays bounded on a large validation split (real LUNA16's has about 89 series). Their lung regions
are found once and kept bit-packed; the CTs are read from disk each epoch.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from p2ch_luna.errors import DataError
from p2ch_luna.evaluation.truth import Truth, read_truth
from p2ch_luna.io.ct import Ct, list_series_on_disk, load_ct
from p2ch_luna.mining.run import candidates_in_lungs, lung_mask, nodules_with_a_candidate
from p2ch_luna.mining.store import MiningParams
from p2ch_luna.training.selection import CANDIDATES_PER_CT_KEY

log = logging.getLogger(__name__)

CANDIDATE_RECALL_KEY = "candidate_recall"
DEFAULT_MAX_SERIES = 4
"""Validation CTs segmented per validation epoch (their cost per epoch: docs/benchmarks.md, "Segmenter chosen by
its candidates")."""


def chosen_series(series_uids: Sequence[str], truth: Truth, max_series: int) -> list[str]:
    """Up to ``max_series`` of ``series_uids``: those with annotated nodules first, each group in UID order."""
    return sorted(series_uids, key=lambda uid: (not truth.has_series(uid), uid))[:max_series]


class CandidateValidation:
    """Candidate recall and candidates per CT of a segmenter on fixed validation CTs."""

    def __init__(self, data_root: Path, series_uids: Sequence[str], max_series: int = DEFAULT_MAX_SERIES,
                 params: MiningParams = MiningParams()) -> None:
        truth = read_truth(data_root)
        if truth is None:
            raise DataError(f"--score-metric candidates needs {data_root}/annotations.csv")
        self.truth = truth
        self.params = params
        on_disk = list_series_on_disk(data_root)
        self.series_uids = chosen_series([uid for uid in series_uids if uid in on_disk], truth, max_series)
        if not self.series_uids:
            raise DataError(f"--score-metric candidates: no validation series on disk under {data_root}")
        self.paths = {uid: on_disk[uid] for uid in self.series_uids}
        self._lungs: dict[str, tuple[np.ndarray, tuple[int, ...]]] = {}
        nodules = int(self.truth.nodules["series_uid"].isin(self.series_uids).sum())
        log.info("candidate validation: %d series holding %d annotated nodules%s", len(self.series_uids), nodules,
                 "" if nodules else " (candidate recall is NaN: the candidate count alone ranks checkpoints)")

    def _lung_region(self, ct: Ct, series_uid: str) -> np.ndarray:
        if series_uid not in self._lungs:
            mask = lung_mask(ct, self.params)
            self._lungs[series_uid] = (np.packbits(mask, axis=None), mask.shape)
        packed, shape = self._lungs[series_uid]
        return np.unpackbits(packed, count=math.prod(shape)).reshape(shape).astype(bool)

    def candidates(self, model: nn.Module, device: torch.device) -> pd.DataFrame:
        """The candidates diagnosis would classify in the validation CTs with ``model`` (left in its mode)."""
        was_training = model.training
        model.eval()
        tables = []
        try:
            with torch.inference_mode():
                for series_uid in self.series_uids:
                    ct = load_ct(self.paths[series_uid], series_uid)
                    tables.append(candidates_in_lungs(ct, self._lung_region(ct, series_uid), model, self.params,
                                                      device))
        finally:
            model.train(was_training)
        return pd.concat(tables, ignore_index=True)

    def metrics(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """``candidate_recall`` (NaN without annotated nodules) and ``candidates_per_ct`` of ``model``."""
        table = self.candidates(model, device)
        hit, total = nodules_with_a_candidate(table, self.truth, self.series_uids)
        return {CANDIDATE_RECALL_KEY: hit / total if total else math.nan,
                CANDIDATES_PER_CT_KEY: len(table) / len(self.series_uids)}
