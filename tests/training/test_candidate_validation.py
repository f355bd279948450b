"""The segmenter chosen by its candidates (``training segmentation --score-metric candidates``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from p2ch_luna import training
from p2ch_luna.evaluation.truth import Truth
from p2ch_luna.io.ct import list_series_on_disk
from p2ch_luna.models.checkpoint import load_checkpoint
from p2ch_luna.training.selection import Scores, is_better
from p2ch_luna.training.tasks.candidate_validation import CandidateValidation, chosen_series
from tests.training.test_training import event_tags, only_file

SELECTION = ("candidate_recall", "candidates_per_ct", "recall")


class Threshold(nn.Module):
    """A 'segmenter' marking the pixels of the centre slice above ``hu`` (nothing when ``hu`` is None)."""

    def __init__(self, hu: float | None, context: int = 1) -> None:
        super().__init__()
        self.in_channels = 2 * context + 1
        self.hu = hu

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        centre = inputs[:, self.in_channels // 2 : self.in_channels // 2 + 1]
        if self.hu is None:
            return torch.full_like(centre, -20.0)
        return torch.where(centre > self.hu, 20.0, -20.0)


def test_series_with_nodules_come_first_up_to_the_cap() -> None:
    truth = Truth(pd.DataFrame({"series_uid": ["1.9", "1.4"], "center_x": [0.0, 0.0], "center_y": [0.0, 0.0],
                                "center_z": [0.0, 0.0], "diameter_mm": [5.0, 5.0]}))
    assert chosen_series(["1.2", "1.9", "1.4", "1.1"], truth, 3) == ["1.4", "1.9", "1.1"]
    assert chosen_series(["1.2", "1.9"], truth, 1) == ["1.9"]


def test_a_segmenter_that_marks_the_nodules_outranks_one_that_marks_nothing(tiny_dataset: Path) -> None:
    uids = sorted(list_series_on_disk(tiny_dataset))
    validation = CandidateValidation(tiny_dataset, uids, max_series=2)
    assert len(validation.series_uids) == 2
    assert all(validation.truth.has_series(uid) for uid in validation.series_uids)
    silent = validation.metrics(Threshold(None), torch.device("cpu"))
    assert silent == {"candidate_recall": 0.0, "candidates_per_ct": 0.0}
    marking = validation.metrics(Threshold(-600.0), torch.device("cpu"))
    assert marking["candidate_recall"] == 1.0
    assert marking["candidates_per_ct"] > 0
    assert is_better(Scores.from_metrics({**marking, "recall": 0.1}, SELECTION),
                     Scores.from_metrics({**silent, "recall": 0.9}, SELECTION))
    # Equal recall: the segmenter with fewer candidates per CT wins, whatever its pixel recall.
    fewer = {**marking, "candidates_per_ct": marking["candidates_per_ct"] - 1, "recall": 0.1}
    assert is_better(Scores.from_metrics(fewer, SELECTION), Scores.from_metrics({**marking, "recall": 0.9}, SELECTION))


def test_the_model_is_left_in_training_mode(tiny_dataset: Path) -> None:
    model = Threshold(-600.0).train()
    CandidateValidation(tiny_dataset, sorted(list_series_on_disk(tiny_dataset)), max_series=1).metrics(
        model, torch.device("cpu"))
    assert model.training


def test_training_selects_by_candidates_and_records_them(tiny_dataset: Path, tmp_path: Path) -> None:
    assert training.main([
        "segmentation", "--data-root", str(tiny_dataset), "--cache-dir", str(tmp_path / "cache"),
        "--models-dir", str(tmp_path / "models"), "--runs-dir", str(tmp_path / "runs"), "--epochs", "2",
        "--epoch-size", "16", "--batch-size", "4", "--val-stride", "3", "--score-metric", "candidates",
        "--candidate-val-series", "1", "--device", "cpu", "--comment", "cand"]) == 0
    best = load_checkpoint(only_file(tmp_path / "models", "segmentation_*_cand.best.state"))
    assert best.raw["selection"] == list(SELECTION)
    assert set(best.metrics) >= {"candidate_recall", "candidates_per_ct"}
    assert best.metrics["candidates_per_ct"] >= 0
    val_run = only_file(tmp_path / "runs" / "p2ch_luna", "*-val-segmentation-cand")
    assert {"candidates/recall", "candidates/per_ct"} <= set(event_tags(val_run)["scalars"])


def test_candidate_val_series_must_be_positive(tiny_dataset: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code = training.main(["segmentation", "--data-root", str(tiny_dataset), "--models-dir", str(tmp_path),
                          "--score-metric", "candidates", "--candidate-val-series", "0"])
    assert code != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].endswith("--candidate-val-series must be >= 1, not 0")
