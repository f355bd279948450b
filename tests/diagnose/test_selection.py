"""The split is part of the model: training records it, ``diagnose --validation`` follows it."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from p2ch_luna.data.luna import split_by_series
from p2ch_luna.data.series_split import SPLIT_KEY, SeriesSplit, recorded_split, series_sha256
from p2ch_luna.diagnose import cli as diagnose_cli
from p2ch_luna.diagnose.selection import validation_selection
from p2ch_luna.errors import DataError
from p2ch_luna.io.ct import list_series_on_disk
from p2ch_luna.models import build_model, load_checkpoint
from p2ch_luna.models.checkpoint import LoadedCheckpoint, checkpoint_path, save_checkpoint
from p2ch_luna.synth.generator import generate_dataset
from p2ch_luna.training import cli as training

SELECTION_LOGGER = "p2ch_luna.diagnose.selection"
TINY_NODULE = ["--model-kwargs", '{"conv_channels": 2, "depth": 2}', "--chunk-shape", "8", "16", "16",
               "--batch-size", "4", "--epoch-size", "16", "--val-size", "12", "--balanced"]
TINY_SEGMENTATION = ["--model-kwargs", '{"depth": 2, "wf": 2}', "--batch-size", "4", "--epoch-size", "8",
                     "--ratio", "0", "--val-negative-fraction", "0.05"]


@pytest.fixture(scope="module")
def trained(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One-epoch nodule (``--val-stride 5``) and segmentation (``--val-stride 3``) runs on the tiny set."""
    out = tmp_path_factory.mktemp("split_runs")
    folders = ["--data-root", str(tiny_dataset), "--cache-dir", str(out / "cache"), "--models-dir",
               str(out / "models"), "--runs-dir", str(out / "runs"), "--device", "cpu", "--epochs", "1",
               "--log-level", "WARNING"]
    assert training.main(["nodule", *folders, *TINY_NODULE, "--val-stride", "5"]) == 0
    assert training.main(["segmentation", *folders, *TINY_SEGMENTATION, "--val-stride", "3"]) == 0
    found = {task: sorted((out / "models").glob(f"{task}_*.best.state")) for task in ("nodule", "segmentation")}
    assert all(len(paths) == 1 for paths in found.values()), found
    return {"models": out / "models", **{task: paths[0] for task, paths in found.items()}}


@pytest.fixture(scope="module")
def grown_folder(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A copy of the tiny set with two more series that no checkpoint saw; returns it and their UIDs."""
    root = tmp_path_factory.mktemp("grown") / "luna"
    shutil.copytree(tiny_dataset, root)
    extra = tmp_path_factory.mktemp("extra")
    generate_dataset(extra, series=2, seed=7, shape=(96, 96), slices=(40, 50), progress=False)
    added = sorted(list_series_on_disk(extra))
    assert not set(added) & set(list_series_on_disk(tiny_dataset))
    target = root / "subset-added"
    target.mkdir()
    for uid in added:
        for suffix in (".mhd", ".raw"):
            shutil.copy2(list_series_on_disk(extra)[uid].with_suffix(suffix), target)
    return root, added


def _load(path: Path) -> LoadedCheckpoint:
    return load_checkpoint(path)


def _on_disk(root: Path) -> list[tuple[str, Path]]:
    return sorted(list_series_on_disk(root).items())


def test_training_records_its_split_in_every_checkpoint(tiny_dataset: Path, trained: dict[str, Path]) -> None:
    uids = sorted(list_series_on_disk(tiny_dataset))
    for task, stride in (("nodule", 5), ("segmentation", 3)):
        for path in (trained[task], trained[task].with_name(trained[task].name.replace(".best.", ".last."))):
            raw = _load(path).raw
            split = recorded_split(raw, path)
            assert split is not None and split.val_stride == stride, path
            train, validation = split_by_series(uids, stride)
            assert (list(split.train_series), list(split.validation_series)) == (train, validation)
            assert raw[SPLIT_KEY]["series_sha256"] == series_sha256(uids)


def test_validation_uses_the_recorded_split_and_names_unseen_series(
        trained: dict[str, Path], grown_folder: tuple[Path, list[str]], caplog: pytest.LogCaptureFixture) -> None:
    root, added = grown_folder
    nodule = _load(trained["nodule"])
    recorded = recorded_split(nodule.raw, nodule.path)
    with caplog.at_level(logging.INFO, logger=SELECTION_LOGGER):
        chosen = validation_selection(_on_disk(root), list_series_on_disk(root), {"nodule": nodule})
    assert [uid for uid, _ in chosen] == list(recorded.validation_series)
    # The book's rule over the grown folder would pick others: the recorded split is what decides.
    assert [uid for uid, _ in chosen] != split_by_series(list_series_on_disk(root), 5)[1]
    assert f"validation: 1 series from the split recorded in nodule checkpoint {nodule.path}" in caplog.text
    unseen = [r for r in caplog.records if r.levelno == logging.WARNING and "never seen" in r.getMessage()]
    assert len(unseen) == 1 and all(uid in unseen[0].getMessage() for uid in added)
    assert unseen[0].getMessage().startswith("2 series on disk were never seen")


def test_include_train_keeps_every_series_and_says_how_many_were_trained_on(
        trained: dict[str, Path], grown_folder: tuple[Path, list[str]], caplog: pytest.LogCaptureFixture) -> None:
    root, _ = grown_folder
    with caplog.at_level(logging.INFO, logger=SELECTION_LOGGER):
        chosen = validation_selection(_on_disk(root), list_series_on_disk(root), {"nodule": _load(trained["nodule"])},
                                      include_train=True)
    assert chosen == _on_disk(root)
    assert "--include-train: all 7 series on disk, 4 of them training series" in caplog.text


def test_segmentation_trained_on_a_validation_series_is_named_in_a_warning(
        trained: dict[str, Path], tiny_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    uids = sorted(list_series_on_disk(tiny_dataset))
    # The segmentation run (stride 3) validated on series 0 and 3: the nodule split (stride 5) validates on 0.
    # A segmentation checkpoint whose split trained on series 0 overlaps it.
    kwargs = {"depth": 2, "wf": 2, "in_channels": 7}
    overlapping = SeriesSplit.from_uids(uids[:3], uids[3:], None, "by hand")
    path = save_checkpoint(checkpoint_path(tmp_path, "segmentation", "t", "overlap", best=True),
                           build_model("unet", **kwargs), model_name="unet", model_kwargs=kwargs,
                           task="segmentation", epoch=1, samples_seen=0, config={}, metrics={},
                           extra={SPLIT_KEY: overlapping.to_record()})
    checkpoints = {"nodule": _load(trained["nodule"]), "segmentation": _load(trained["segmentation"])}
    with caplog.at_level(logging.INFO, logger=SELECTION_LOGGER):
        validation_selection(_on_disk(tiny_dataset), uids, checkpoints)
    assert "was trained on" not in caplog.text
    checkpoints["segmentation"] = _load(path)
    with caplog.at_level(logging.INFO, logger=SELECTION_LOGGER):
        validation_selection(_on_disk(tiny_dataset), uids, checkpoints)
    assert f"segmentation checkpoint {path} was trained on 1 of the 1 validation series" in caplog.text
    assert uids[0] in caplog.text


@pytest.mark.parametrize("config, stride", [({}, 10), ({"val_stride": 2}, 2)])
def test_a_checkpoint_without_a_split_falls_back_to_the_rule_and_says_so(
        tiny_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, config: dict, stride: int) -> None:
    torch.manual_seed(0)
    path = save_checkpoint(checkpoint_path(tmp_path, "nodule", "t", "old", best=True), build_model("luna"),
                           model_name="luna", model_kwargs={}, task="nodule", epoch=1, samples_seen=0,
                           config=config, metrics={})
    on_disk = list_series_on_disk(tiny_dataset)
    with caplog.at_level(logging.INFO, logger=SELECTION_LOGGER):
        chosen = validation_selection(_on_disk(tiny_dataset), on_disk, {"nodule": _load(path)})
    assert [uid for uid, _ in chosen] == split_by_series(on_disk, stride)[1]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"nodule checkpoint {path} records no split" in message
               and f"every {stride}-th series on disk" in message for message in warnings)


def test_a_corrupt_split_record_is_one_line_naming_the_checkpoint(tmp_path: Path) -> None:
    record = SeriesSplit.from_uids(["a", "b"], ["c"], 3).to_record()
    record["validation_series"] = ["c", "d"]
    with pytest.raises(DataError, match="model.state: its series_split lists do not match their series_sha256"):
        recorded_split({SPLIT_KEY: record}, tmp_path / "model.state")
    with pytest.raises(DataError, match="is not a list"):
        recorded_split({SPLIT_KEY: {"train_series": "abc", "validation_series": []}}, "x")


def test_diagnose_refuses_a_training_series_as_validation_in_one_line(
        trained: dict[str, Path], tiny_dataset: Path, capsys: pytest.CaptureFixture) -> None:
    split = recorded_split(_load(trained["nodule"]).raw, trained["nodule"])
    training_uid = split.train_series[1]
    code = diagnose_cli.main(["--validation", "--series-uid", f"{split.validation_series[0]},{training_uid}",
                              "--data-root", str(tiny_dataset), "--models-dir", str(trained["models"]),
                              "--log-level", "WARNING"])
    assert code == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("python -m p2ch_luna.diagnose: error: ")
    assert "1 requested series were training series under the split recorded in nodule checkpoint" in error[0]
    assert training_uid in error[0]


def test_diagnose_validation_on_a_grown_folder_uses_the_recorded_split(
        trained: dict[str, Path], grown_folder: tuple[Path, list[str]], tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    root, added = grown_folder
    split = recorded_split(_load(trained["nodule"]).raw, trained["nodule"])
    code = diagnose_cli.main(["--validation", "--data-root", str(root), "--models-dir", str(trained["models"]),
                              "--cache-dir", str(tmp_path / "cache"), "--segmentation-threshold", "0.9",
                              "--log-level", "INFO"])
    assert code == 0
    captured = capsys.readouterr()
    assert f"Summary: {len(split.validation_series)} CT(s)" in captured.out
    assert f"validation: 1 series from the split recorded in nodule checkpoint {trained['nodule']}" in captured.err
    assert "2 series on disk were never seen" in captured.err and all(uid in captured.err for uid in added)
