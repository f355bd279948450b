"""``p2ch_luna.cv`` at toy size: two folds trained and diagnosed for real, merged, and resumed fold by fold."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from p2ch_luna import cv
from p2ch_luna.errors import LunaError
from tests.training.test_training import TINY_CHUNK, TINY_MODEL

TRAIN_ARGS = "--batch-size 4 --val-size 12"
NODULE_ARGS = f"--balanced --model-kwargs '{TINY_MODEL}' {' '.join(TINY_CHUNK)}"


def cv_args(data_root: Path, work_dir: Path, segmentation: Path, folds: str, *extra: str) -> list[str]:
    return ["--work-dir", str(work_dir), "--data-root", str(data_root), "--cache-dir", str(work_dir / "cache"),
            "--folds", folds, "--segmentation-path", str(segmentation), "--epochs", "1", "--epoch-size", "8",
            "--device", "cpu", "--train-args", TRAIN_ARGS, "--nodule-args", NODULE_ARGS, "--bootstrap", "20",
            "--log-level", "WARNING", *extra]


def test_cv_runs_folds_merges_them_and_skips_completed_folds(tiny_dataset: Path, untrained_models: Path,
                                                             tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    segmentation = next(untrained_models.glob("segmentation_*.best.state"))
    work = tmp_path / "cv"
    assert cv.main(cv_args(tiny_dataset, work, segmentation, "0")) == 0
    state = json.loads((work / cv.STATE_FILE).read_text())
    fold0 = state["folds"]["0"]
    assert fold0["complete"] is True and Path(fold0["findings"]).is_file()
    assert Path(fold0["series_list"]).read_text().split() == sorted(
        path.stem for path in (tiny_dataset / "subset0").glob("*.mhd"))
    findings_written = Path(fold0["findings"]).stat().st_mtime_ns
    nodule_checkpoint = fold0["nodule"]
    assert nodule_checkpoint.endswith("_cv-fold0.best.state")

    # Fold 0 is complete: a run over folds 0 and 1 trains and diagnoses fold 1 only, then merges both.
    assert cv.main(cv_args(tiny_dataset, work, segmentation, "0-1")) == 0
    state = json.loads((work / cv.STATE_FILE).read_text())
    assert state["folds"]["0"]["nodule"] == nodule_checkpoint
    assert Path(state["folds"]["0"]["findings"]).stat().st_mtime_ns == findings_written
    assert state["folds"]["1"]["complete"] is True and state["folds"]["1"]["nodule"] != nodule_checkpoint
    assert sorted(path.name for path in work.glob("fold*/models/nodule_*.best.state")) != []
    assert len(list((work / "fold0" / "models").glob("nodule_*.best.state"))) == 1
    merged = json.loads((work / cv.EVALUATION_FOLDER / "froc.json").read_text())
    assert merged["n_scans"] == 2 and merged["n_bootstrap"] == 20
    assert "CPM" in capsys.readouterr().out

    # Other settings into the same folder are refused in one line.
    assert cv.main(cv_args(tiny_dataset, work, segmentation, "0-1", "--epochs", "2")) != 0
    assert "other settings (epochs)" in capsys.readouterr().err


def test_cv_needs_a_segmenter(tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cv.main(["--work-dir", str(tmp_path), "--data-root", str(tiny_dataset)]) != 0
    assert "exactly one of --train-segmentation or --segmentation-path" in capsys.readouterr().err


def test_parse_folds() -> None:
    assert cv.parse_folds("0-9") == tuple(range(10))
    assert cv.parse_folds("5,0,2-3") == (0, 2, 3, 5)
    with pytest.raises(Exception):
        cv.parse_folds("8-10")


def test_a_launcher_runs_each_stage_as_a_subprocess(tmp_path: Path) -> None:
    """``--launcher PREFIX`` runs ``PREFIX -m MODULE ARGS`` (torchrun in real use; the interpreter here)."""
    findings = tmp_path / "findings.csv"
    findings.write_text("seriesuid,coordX,coordY,coordZ,probability\n1.2.3,0,0,0,0.9\n")
    annotations = tmp_path / "annotations.csv"
    annotations.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.3,0,0,1,6\n")
    output = tmp_path / "scored"
    run_stage = cv.StageRunner(shlex.join([sys.executable]))
    run_stage("score", "p2ch_luna.evaluate", None, [str(findings), "--annotations", str(annotations),
                                                     "--bootstrap", "0", "--output", str(output)])
    assert json.loads((output / "froc.json").read_text())["cpm"] == pytest.approx(1.0)
    with pytest.raises(LunaError, match="cv stage 'bad' failed with exit code 2"):
        run_stage("bad", "p2ch_luna.evaluate", None, ["--no-such-option"])
