"""LUNA16's official folds: the split of ``--fold K``, what checkpoints record of it, and who follows it."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from p2ch_luna.data.folds import fold_argument, fold_of_path, fold_series, split_by_fold
from p2ch_luna.data.series_split import FOLD_RULE, SPLIT_KEY, SeriesSplit, recorded_split
from p2ch_luna.diagnose import cli as diagnose_cli
from p2ch_luna.diagnose.selection import validation_selection
from p2ch_luna.errors import DataError
from p2ch_luna.io.ct import list_series_on_disk
from p2ch_luna.models import load_checkpoint
from p2ch_luna.paths import paths_from_args
from p2ch_luna.training import cli as training
from tests.training.test_training import only_file, tiny_args


def subset_uids(data_root: Path, fold: int) -> list[str]:
    """The UIDs of ``subset<fold>/`` read straight from the folder."""
    return sorted(path.stem for path in (data_root / f"subset{fold}").glob("*.mhd"))


def test_fold_split_holds_out_exactly_that_subset(tiny_dataset: Path) -> None:
    on_disk = list_series_on_disk(tiny_dataset)
    assert len({fold_of_path(path, tiny_dataset) for path in on_disk.values()}) >= 3  # several subsets
    for fold in (0, 2):
        expected = subset_uids(tiny_dataset, fold)
        assert expected and fold_series(on_disk, tiny_dataset, fold) == expected
        train, validation = split_by_fold(on_disk, on_disk, tiny_dataset, fold)
        assert validation == expected and sorted(train + validation) == sorted(on_disk)
    with pytest.raises(DataError, match="fold 9: no series under"):
        fold_series(on_disk, tiny_dataset, 9)


def test_fold_of_path_reads_the_first_folder_under_the_root(tmp_path: Path) -> None:
    assert fold_of_path(tmp_path / "subset3" / "x.mhd", tmp_path) == 3
    assert fold_of_path(tmp_path / "subset3" / "subset3" / "x.mhd", tmp_path) == 3
    assert fold_of_path(tmp_path / "x.mhd", tmp_path) is None
    assert fold_of_path(tmp_path / "other" / "x.mhd", tmp_path) is None
    assert fold_argument("7") == 7
    for bad in ("10", "-1", "one"):
        with pytest.raises(argparse.ArgumentTypeError):
            fold_argument(bad)


def test_fold_record_round_trips() -> None:
    split = SeriesSplit.for_fold(["b", "a"], ["c"], 4)
    record = split.to_record()
    assert record["fold"] == 4 and record["rule"] == FOLD_RULE and record["val_stride"] is None
    assert recorded_split({SPLIT_KEY: record}, "x") == split
    with pytest.raises(DataError, match="fold is not a fold number"):
        recorded_split({SPLIT_KEY: {**record, "fold": "4"}}, "x")


def test_training_with_fold_records_it_and_diagnose_validation_follows(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert training.main(tiny_args(tiny_dataset, out, "--fold", "2", "--comment", "fold2")) == 0
    loaded = load_checkpoint(only_file(out / "models", "nodule_*_fold2.best.state"))
    split = recorded_split(loaded.raw, loaded.path)
    assert split is not None and split.fold == 2 and split.rule == FOLD_RULE
    assert list(split.validation_series) == subset_uids(tiny_dataset, 2)
    assert loaded.config["fold"] == 2
    on_disk = list_series_on_disk(tiny_dataset)
    chosen = validation_selection(sorted(on_disk.items()), on_disk, {"nodule": loaded})
    assert [uid for uid, _ in chosen] == subset_uids(tiny_dataset, 2)


def test_diagnose_fold_selects_that_subset(tiny_dataset: Path) -> None:
    for fold in ("0", "3"):
        args = diagnose_cli.build_parser().parse_args(["--fold", fold, "--data-root", str(tiny_dataset)])
        chosen = diagnose_cli.select_series(args, paths_from_args(args))
        assert [uid for uid, _ in chosen] == subset_uids(tiny_dataset, int(fold))
    args = diagnose_cli.build_parser().parse_args(["--fold", "3", "--validation", "--data-root", str(tiny_dataset)])
    with pytest.raises(Exception, match="exactly one of --series-uid, --ct, --validation or --fold"):
        diagnose_cli.select_series(args, paths_from_args(args))


def test_segmentation_training_with_fold_records_it(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "seg"
    assert training.main([
        "segmentation", "--data-root", str(tiny_dataset), "--cache-dir", str(tmp_path / "cache"),
        "--models-dir", str(out / "models"), "--runs-dir", str(out / "runs"), "--device", "cpu", "--epochs", "1",
        "--epoch-size", "8", "--batch-size", "4", "--ratio", "0", "--val-negative-fraction", "0.05",
        "--model-kwargs", '{"depth": 2, "wf": 2}', "--fold", "1", "--comment", "segfold", "--log-level", "WARNING",
    ]) == 0
    loaded = load_checkpoint(only_file(out / "models", "segmentation_*_segfold.best.state"))
    split = recorded_split(loaded.raw, loaded.path)
    assert split is not None and split.fold == 1
    assert list(split.validation_series) == subset_uids(tiny_dataset, 1)
    others = set(list_series_on_disk(tiny_dataset)) - set(subset_uids(tiny_dataset, 1))
    assert sorted(split.train_series) == sorted(others)
