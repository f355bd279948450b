"""A training run that fails before its first checkpoint leaves nothing in the models and runs folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2ch_luna.training import cli as training_cli
from p2ch_luna.training import loop


def _run(task: str, data_root: Path, tmp_path: Path, *options: str) -> int:
    return training_cli.main([task, "--data-root", str(data_root), "--cache-dir", str(tmp_path / "cache"),
                              "--models-dir", str(tmp_path / "models"), "--runs-dir", str(tmp_path / "runs"),
                              "--device", "cpu", "--log-level", "WARNING", "--chunk-shape", "16", "16", "16",
                              "--epoch-size", "8", "--batch-size", "4", *options])


def _left_behind(tmp_path: Path) -> list[str]:
    return sorted(str(path.relative_to(tmp_path)) for folder in ("models", "runs")
                  for path in (tmp_path / folder).rglob("*"))


def _one_line(capsys: pytest.CaptureFixture) -> str:
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1, error
    return error[0]


def test_a_missing_data_folder_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _run("nodule", tmp_path / "missing", tmp_path) == 1
    assert "missing" in _one_line(capsys)
    assert _left_behind(tmp_path) == []
    assert not (tmp_path / "models").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("task, flag", [("nodule", "--resume"), ("malignancy", "--finetune")])
def test_a_file_that_is_no_checkpoint_leaves_nothing(task: str, flag: str, tiny_dataset: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    not_a_checkpoint = tmp_path / "notes.state"
    not_a_checkpoint.write_text("not a checkpoint\n")
    assert _run(task, tiny_dataset, tmp_path, flag, str(not_a_checkpoint)) != 0
    assert str(not_a_checkpoint) in _one_line(capsys)
    assert _left_behind(tmp_path) == []


def test_ctrl_c_at_start_up_leaves_nothing_but_what_was_there(tiny_dataset: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    """Ctrl-C after the config and the event folders were written, before the first epoch: both go, and the
    folders' earlier contents stay."""
    earlier = tmp_path / "runs" / "earlier_run.txt"
    earlier.parent.mkdir()
    earlier.write_text("another run\n")
    written: list[Path] = []
    real_writers = loop.tblog.open_writers

    def open_writers_then_interrupt(*args, **kwargs):
        writers = real_writers(*args, **kwargs)
        written.extend([*(tmp_path / "models").glob("*.config.json"), *(tmp_path / "runs").rglob("*-trn-*")])
        return writers

    def interrupt(*args, **kwargs) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(loop.tblog, "open_writers", open_writers_then_interrupt)
    monkeypatch.setattr(loop, "set_sampler_epoch", interrupt)
    assert _run("nodule", tiny_dataset, tmp_path) == training_cli.EXIT_INTERRUPTED
    assert "interrupted" in _one_line(capsys)
    assert len(written) == 2  # a config and a TensorBoard run folder were there before the interruption
    assert _left_behind(tmp_path) == ["runs/earlier_run.txt"]


def test_an_unwritable_models_folder_is_refused_before_anything_is_written(tiny_dataset: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "models").write_text("a file, not a folder\n")
    assert _run("nodule", tiny_dataset, tmp_path) == 2
    assert "--models-dir" in _one_line(capsys)
    assert not (tmp_path / "runs").exists()
