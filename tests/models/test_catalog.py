"""Checkpoints found by their contents (catalog), diagnose's model resolution, and the models command."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from p2ch_luna.diagnose.model_set import load_models
from p2ch_luna.errors import DataError
from p2ch_luna.models import LunaModel, UNetWrapper, build_model, save_checkpoint
from p2ch_luna.models import cli as models_cli
from p2ch_luna.models.catalog import find_checkpoints, newest_checkpoints
from p2ch_luna.paths import resolve_paths

TINY_KWARGS = {"input_shape": [16, 16, 16]}


def book_copies(book_checkpoints_dir: Path, folder: Path) -> dict[str, Path]:
    """The book's two files under names that say nothing, beside a file that is not a checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = {"segmentation": folder / "downloaded-1", "nodule": folder / "sub" / "model.pt"}
    copies["nodule"].parent.mkdir()
    for task, prefix in (("segmentation", "seg_"), ("nodule", "cls_")):
        (source,) = book_checkpoints_dir.glob(f"{prefix}*.best.state")
        shutil.copyfile(source, copies[task])
    (folder / "README.best.state").write_text("not a checkpoint\n")
    return copies


def test_diagnose_finds_the_books_models_under_any_name(book_checkpoints_dir: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    copies = book_copies(book_checkpoints_dir, tmp_path / "models")
    paths = resolve_paths(models_dir=tmp_path / "models", data_root=tmp_path)
    with caplog.at_level("INFO"):
        models = load_models(paths, None, None, None, torch.device("cpu"))
    assert models.segmentation.path == copies["segmentation"] and models.segmentation.is_book
    assert models.nodule.path == copies["nodule"] and models.nodule.is_book and models.malignancy is None
    assert isinstance(models.nodule.model, LunaModel) and isinstance(models.segmentation.model, UNetWrapper)
    with torch.no_grad():
        assert models.nodule.model(torch.zeros(1, 1, 32, 48, 48)).shape == (1, 2)
    assert f"using {copies['nodule']} as the nodule model" in caplog.text


def test_our_checkpoints_are_found_renamed_and_the_best_epoch_wins(tmp_path: Path) -> None:
    torch.manual_seed(0)
    folder = tmp_path / "models"
    unet = {"in_channels": 3, "depth": 2, "wf": 2}
    save_checkpoint(folder / "my-segmenter", build_model("unet", **unet), model_name="unet", model_kwargs=unet,
                    task="segmentation", epoch=1, samples_seen=8, config={}, metrics={})
    best = save_checkpoint(folder / "classifier-v1.bin", build_model("luna", **TINY_KWARGS), model_name="luna",
                           model_kwargs=TINY_KWARGS, task="nodule", epoch=2, samples_seen=16, config={},
                           metrics={}, extra={"best_epoch": 2, "best_score": 0.9, "score_name": "auc"})
    later = save_checkpoint(folder / "classifier-v2.bin", build_model("luna", **TINY_KWARGS), model_name="luna",
                            model_kwargs=TINY_KWARGS, task="nodule", epoch=3, samples_seen=24, config={},
                            metrics={}, extra={"best_epoch": 2, "best_score": 0.9, "score_name": "auc"})
    (folder / "notes.txt").write_text("hello\n")
    (folder / ".classifier-v3.bin.tmp").write_bytes(later.read_bytes())  # a write under way
    assert sorted(summary.path.name for summary in find_checkpoints(folder)) == [
        "classifier-v1.bin", "classifier-v2.bin", "my-segmenter"]
    newest = newest_checkpoints(folder)
    assert newest["nodule"].path == best  # v2 is newer but not its run's best epoch
    assert newest["segmentation"].path.name == "my-segmenter" and "malignancy" not in newest
    models = load_models(resolve_paths(models_dir=folder, data_root=tmp_path), None, None, None,
                         torch.device("cpu"))
    assert models.nodule.path == best and models.nodule.epoch == 2


def test_a_folder_without_a_segmenter_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.state").write_text("not a checkpoint\n")
    with pytest.raises(DataError, match="no segmentation checkpoint among the files under"):
        load_models(resolve_paths(models_dir=tmp_path, data_root=tmp_path), None, None, None, torch.device("cpu"))


def test_models_list_names_each_checkpoints_task(book_checkpoints_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "models"
    book_copies(book_checkpoints_dir, folder)
    config = {"paths": {"data_root": "/data/luna"}, "val_stride": 5}
    save_checkpoint(folder / "ours", build_model("luna", **TINY_KWARGS), model_name="luna",
                    model_kwargs=TINY_KWARGS, task="malignancy", epoch=4, samples_seen=40, config=config,
                    metrics={}, extra={"best_epoch": 3, "best_score": 0.8125, "score_name": "auc"})
    assert models_cli.main(["list", str(folder)]) == 0
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["downloaded-1"].split()[2:4] == ["segmentation", "unet"]
    assert rows["sub/model.pt"].split()[2:5] == ["nodule", "luna", "(book)"]
    assert "README.best.state" not in rows
    ours = rows["ours"]
    assert "malignancy" in ours and "/data/luna" in ours and "every 5th" in ours and "auc 0.8125 (epoch 3)" in ours


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_install_from_a_file_url_checks_the_hash(untrained_models: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    source = next(untrained_models.glob("nodule_*.best.state"))
    target = tmp_path / "installed"
    wrong = "0" * 64
    assert models_cli.main(["install", source.as_uri(), "--sha256", wrong, "--models-dir", str(target)]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "not the expected " + wrong in error and "nothing installed" in error
    assert list(target.iterdir()) == []
    assert models_cli.main(["install", source.as_uri(), "--sha256", _sha256(source).upper(),
                            "--models-dir", str(target), "--name", "nodule.pt"]) == 0
    assert "installed" in capsys.readouterr().out
    assert [path.name for path in target.iterdir()] == ["nodule.pt"]
    assert _sha256(target / "nodule.pt") == _sha256(source)
    assert newest_checkpoints(target)["nodule"].path == target / "nodule.pt"


def test_install_refuses_a_file_that_is_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "weights.state"
    source.write_bytes(b"not a checkpoint")
    target = tmp_path / "models"
    assert models_cli.main(["install", str(source), "--sha256", _sha256(source), "--models-dir", str(target)]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "is not a p2ch_luna or book checkpoint" in error
    assert list(target.iterdir()) == []
    assert models_cli.main(["install", str(source), "--sha256", "abc", "--models-dir", str(target)]) == 2
    assert "is not 64 hexadecimal digits" in capsys.readouterr().err


@pytest.mark.parametrize("action", ["list", "install"])
def test_each_action_explains_its_options(action: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        models_cli.main([action, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage:" in text and "--debug" in text
    if action == "install":
        assert "--sha256" in text and "--models-dir" in text and "--name" in text
