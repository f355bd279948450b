"""``python -m p2ch_luna.training all``: the whole recipe in order, resumable, within a --minutes budget."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from p2ch_luna.training import cli as training
from p2ch_luna.training import recipe
from p2ch_luna.training.loop import next_epoch_fits


def test_epoch_sizes_scale_with_the_nodules_within_bounds() -> None:
    assert recipe.epoch_sizes(1) == {"segmentation": 640, "nodule": 2000, "malignancy": 500}
    assert recipe.epoch_sizes(100) == {"segmentation": 4000, "nodule": 10000, "malignancy": 6000}
    assert recipe.epoch_sizes(10_000) == {"segmentation": 8000, "nodule": 20000, "malignancy": 6000}


def test_budget_split_shares_the_minutes_left() -> None:
    split = recipe.budget_split(10.0)
    assert split == pytest.approx({"segmentation": 2.5, "nodule": 5.5, "malignancy": 1.5})
    assert sum(split.values()) < 10.0
    assert min(recipe.budget_split(0.01).values()) == 0.1


def test_an_epoch_is_begun_only_when_it_fits() -> None:
    assert next_epoch_fits(50.0, 9.0, 1.0) and not next_epoch_fits(50.0, 11.0, 1.0)
    assert next_epoch_fits(1e9, 1e9, None)


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["all", "--data-root", str(data), "--cache-dir", str(out / "cache"), "--models-dir", str(out / "models"),
            "--runs-dir", str(out / "runs"), "--device", "cpu", "--epoch-sizes", "32", "64", "32", *extra]


def test_the_recipe_trains_every_stage_in_budget_and_a_rerun_skips_them(
        tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert training.main(_argv(tiny_dataset, tmp_path, "--minutes", "1.0")) == 0
    captured = capsys.readouterr()
    state = json.loads((tmp_path / "models" / recipe.STATE_FILE).read_text())
    trained = list(recipe.STAGES) if recipe.malignancy_skip_reason(tiny_dataset) is None else list(recipe.STAGES[:2])
    assert list(state["stages"]) == trained
    for stage, checkpoint in state["stages"].items():
        assert Path(checkpoint).is_file() and Path(checkpoint).name.startswith(stage)
        assert f"{stage}: {checkpoint}" in captured.out
    assert "minutes left after the cache; split segmentation" in captured.err
    assert "would end past --max-minutes" in captured.err  # the budget, not the 200 epochs, ended the runs
    assert "--hard-negatives-from" not in captured.err and "mined " in captured.err  # the nodule stage mined
    nodule_config = json.loads(Path(state["stages"]["nodule"].replace(".best.state", ".config.json")).read_text())
    assert nodule_config["max_minutes"] == pytest.approx(0.55 * 1.0, rel=0.1)
    assert nodule_config["task_options"]["hard_negatives_from"] == state["stages"]["segmentation"]
    segmentation_config = json.loads(Path(state["stages"]["segmentation"].replace(".best.state", ".config.json"))
                                     .read_text())
    assert segmentation_config["task_options"]["score_metric"] == "candidates"
    assert "new best: candidate_recall" in captured.err
    if "malignancy" in state["stages"]:
        malignancy_config = json.loads(Path(state["stages"]["malignancy"].replace(".best.state", ".config.json"))
                                       .read_text())
        assert malignancy_config["task_options"]["finetune"] == state["stages"]["nodule"]
    else:
        assert "recipe: malignancy skipped: the training series of" in captured.err

    # A rerun with the same settings trains nothing; other settings are refused.
    assert training.main(_argv(tiny_dataset, tmp_path, "--minutes", "1.0")) == 0
    assert capsys.readouterr().err.count("already trained") == len(trained)
    assert training.main(_argv(tiny_dataset, tmp_path, "--minutes", "1.0", "--seed", "3")) == 2
    assert "other settings (seed)" in capsys.readouterr().err
    assert training.main(_argv(tiny_dataset, tmp_path, "--minutes", "1.0", "--book")) == 2
    assert "other settings (book)" in capsys.readouterr().err


def test_the_book_recipe_trains_on_candidates_csv_chosen_by_roc_auc_uncalibrated(
        tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert training.main(_argv(tiny_dataset, tmp_path, "--minutes", "0.5", "--book")) == 0
    err = capsys.readouterr().err
    state = json.loads((tmp_path / "models" / recipe.STATE_FILE).read_text())
    assert state["settings"]["book"] is True and "book-recipe" in Path(state["stages"]["nodule"]).name
    options = json.loads(Path(state["stages"]["nodule"].replace(".best.state", ".config.json")).read_text())[
        "task_options"]
    assert (options["hard_negatives_from"], options["select_by"], options["calibrate"]) == (None, "roc_auc", False)
    segmentation = json.loads(Path(state["stages"]["segmentation"].replace(".best.state", ".config.json")).read_text())
    assert segmentation["task_options"]["score_metric"] == "recall"
    assert "mined " not in err and "new best: roc_auc" in err and "new best: cpm" not in err


def test_a_folder_without_annotations_stops_with_one_line(tiny_dataset: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    (data / "annotations.csv").unlink()
    assert training.main(_argv(data, tmp_path)) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no annotations.csv" in err[0] and "Traceback" not in err[0]
    assert training.main(_argv(data, tmp_path, "--minutes", "0")) == 2
