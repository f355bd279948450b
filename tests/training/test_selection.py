"""Model selection: the ranking rule, the validation FROC, and a real nodule run choosing its best by CPM."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from p2ch_luna.evaluation.truth import Truth
from p2ch_luna.training import cli as training
from p2ch_luna.training.loop import resumed_best_scores
from p2ch_luna.training.selection import Scores, froc_metrics, is_better
from tests.training.test_training import only_file, tiny_args

NODULE_RANKING = ("cpm", "roc_auc")


def scores(cpm: float, roc_auc: float) -> Scores:
    return Scores(NODULE_RANKING, (cpm, roc_auc))


def test_the_higher_cpm_wins_whatever_the_auc() -> None:
    assert is_better(scores(0.6, 0.70), scores(0.5, 0.99))
    assert not is_better(scores(0.5, 0.99), scores(0.6, 0.70))


def test_auc_breaks_a_cpm_tie_and_equal_is_not_better() -> None:
    assert is_better(scores(0.5, 0.9), scores(0.5, 0.8))
    assert not is_better(scores(0.5, 0.8), scores(0.5, 0.9))
    assert not is_better(scores(0.5, 0.8), scores(0.5, 0.8))


def test_the_lower_loss_breaks_a_tie_of_a_saturated_validation_set() -> None:
    ranking = ("cpm", "roc_auc", "loss")
    early, later = Scores(ranking, (1.0, 1.0, 0.08)), Scores(ranking, (1.0, 1.0, 0.002))
    assert is_better(later, early)
    assert not is_better(early, later)
    assert is_better(Scores(ranking, (0.9, 1.0, 0.5)), Scores(ranking, (0.8, 1.0, 0.001)))  # CPM still first
    assert is_better(Scores(ranking, (1.0, 1.0, 0.5)), Scores(ranking, (1.0, 1.0, math.nan)))  # NaN is worst
    assert later.ranked() == (1.0, 1.0, -0.002)


def test_nan_is_worst_and_anything_beats_no_best() -> None:
    assert is_better(scores(0.0, 0.5), scores(math.nan, 0.99))
    assert not is_better(scores(math.nan, 0.99), scores(0.0, 0.5))
    assert is_better(scores(math.nan, math.nan), None)
    with pytest.raises(ValueError, match="roc_auc"):
        is_better(Scores(("roc_auc",), (0.9,)), scores(0.5, 0.5))


def test_resume_restores_the_best_scores_or_starts_afresh_under_another_rule() -> None:
    saved = {"score_name": "cpm", "best_score": 0.5, "selection": ["cpm", "roc_auc"], "best_scores": [0.5, 0.8]}
    assert resumed_best_scores(saved, NODULE_RANKING) == scores(0.5, 0.8)
    old_rule = {"score_name": "roc_auc", "best_score": 0.97}  # a checkpoint ranked by AUC alone
    assert resumed_best_scores(old_rule, NODULE_RANKING) is None
    assert resumed_best_scores(old_rule, ("roc_auc",)) == Scores(("roc_auc",), (0.97,))


def test_froc_of_a_hand_made_validation_set() -> None:
    # Series a: nodule at the origin (10 mm); series b: nodule at x = 50 (6 mm).
    truth = Truth(nodules=pd.DataFrame({
        "series_uid": ["a", "b"], "center_x": [0.0, 50.0], "center_y": [0.0, 0.0], "center_z": [0.0, 0.0],
        "diameter_mm": [10.0, 6.0], "is_malignant": [False, False]}))
    marks = pd.DataFrame([
        ("a", 0.0, 0.0, 0.0, 0.9),    # hit of a's nodule
        ("a", 2.0, 0.0, 0.0, 0.85),   # a second, lower hit of it: ignored, not a false positive
        ("a", 20.0, 0.0, 0.0, 0.8),   # false positive
        ("b", 50.0, 2.0, 0.0, 0.3),   # hit of b's nodule (2 mm < 3 mm radius)
        ("b", 50.0, 3.0, 0.0, 0.95),  # on the radius, not strictly within: false positive
        ("b", -40.0, 0.0, 0.0, 0.5),  # false positive
    ], columns=["series_uid", "center_x", "center_y", "center_z", "nodule_probability"])
    metrics = froc_metrics(marks, truth, ["a", "b"])
    # By decreasing probability: FP .95, TP .9, FP .8, FP .5, TP .3 over 2 scans and 2 nodules, so the curve
    # runs (0, 0) (0.5, 0) (0.5, 0.5) (1, 0.5) (1.5, 0.5) (1.5, 1); at 1/8 ... 8 FPs per scan it reads
    # 0, 0, 0.5, 0.5, 1, 1, 1 (at a repeated FP count the higher point).
    expected = [0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.0]
    assert [metrics[key] for key in ("sens_at_0.125fp", "sens_at_0.25fp", "sens_at_0.5fp", "sens_at_1fp",
                                     "sens_at_2fp", "sens_at_4fp", "sens_at_8fp")] == pytest.approx(expected)
    assert metrics["cpm"] == pytest.approx(4.0 / 7.0)
    # A third, empty validation series doubles nothing but the FPs per scan: 4 FPs over 3 scans.
    three_scans = froc_metrics(marks, truth, ["a", "b", "c"])
    assert three_scans["sens_at_1fp"] == pytest.approx(1.0) and three_scans["sens_at_0.25fp"] == 0.0


def test_a_nodule_run_logs_froc_and_keeps_the_epoch_with_the_best_cpm(tiny_dataset: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from p2ch_luna.models import load_checkpoint

    out = tmp_path / "run"
    args = tiny_args(tiny_dataset, out, "--epochs", "3", "--comment", "froc")
    args[args.index("--val-size") + 1] = "100000"  # every validation row
    assert training.main(args) == 0
    val = only_file(out / "runs" / "p2ch_luna", "*-val-nodule-froc")
    accumulator = EventAccumulator(str(val), size_guidance={"scalars": 0})
    accumulator.Reload()
    cpm = [event.value for event in accumulator.Scalars("froc/cpm")]
    auc = [event.value for event in accumulator.Scalars("auc/roc")]
    loss = [event.value for event in accumulator.Scalars("loss/all")]
    assert len(cpm) == 3 and len(accumulator.Scalars("froc/sens_at_1fp")) == 3
    assert all(0.0 <= value <= 1.0 for value in cpm)

    best = torch.load(only_file(out / "models", "*_froc.best.state"), weights_only=True)
    ranked = max(range(3), key=lambda epoch: (cpm[epoch], auc[epoch], -loss[epoch]))
    assert best["epoch"] == ranked + 1
    assert best["metrics"]["cpm"] == pytest.approx(cpm[ranked])
    assert best["selection"] == ["cpm", "roc_auc", "loss"]
    assert best["best_scores"] == pytest.approx([cpm[ranked], auc[ranked], loss[ranked]], rel=1e-5)
    last = load_checkpoint(only_file(out / "models", "*_froc.last.state"))
    assert last.metrics["cpm"] == pytest.approx(cpm[-1]) and "sens_at_0.125fp" in last.metrics


def test_validation_froc_scores_the_evaluated_rows_against_the_annotations(tiny_dataset: Path,
                                                                          tmp_path: Path) -> None:
    from p2ch_luna.paths import resolve_paths
    from p2ch_luna.training.config import TrainConfig
    from p2ch_luna.training.tasks import RunContext
    from p2ch_luna.training.tasks.classification import ClassificationOptions, NoduleTask

    paths = resolve_paths(tiny_dataset, tmp_path / "cache", tmp_path / "models", tmp_path / "runs")
    config = TrainConfig(task="nodule", paths=paths, val_stride=3,
                         task_options=ClassificationOptions(chunk_shape=(8, 16, 16)))
    task = NoduleTask(RunContext(config, torch.device("cpu")))
    labels = task.datasets()[1].labels
    assert labels.any() and (~labels).any()
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(labels), generator=generator)  # as gathered: any order, rows named by "index"
    is_positive = torch.from_numpy(labels[order.numpy()])
    noise = 0.9 * torch.rand(len(labels), generator=generator)  # distinct negative scores below 0.9
    perfect = {"index": order, "probability": torch.where(is_positive, 1.0, noise)}
    assert task.validation_metrics(perfect)["cpm"] == pytest.approx(1.0)
    below_every_negative = {"index": order, "probability": torch.where(is_positive, 0.0, 0.1 + noise)}
    metrics = task.validation_metrics(below_every_negative)
    assert metrics["cpm"] == 0.0 and metrics["sens_at_8fp"] == 0.0
