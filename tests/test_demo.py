"""The README's main job, end to end at toy size: generate, train the whole recipe, diagnose, score."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from p2ch_luna import demo
from p2ch_luna.precision import resolve_precision


@pytest.mark.slow
def test_demo_runs_every_stage_and_writes_a_scored_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--work-dir", str(tmp_path), "--series", "12", "--shape", "96", "96", "--slices", "30", "40",
            "--epoch-sizes", "32", "64", "32", "--minutes", "1", "--log-level", "WARNING"]
    assert demo.main(argv) == 0
    output = capsys.readouterr().out
    assert "demo: synthetic data" in output and "CPM" in output
    report = json.loads((tmp_path / "diagnosis" / "report.json").read_text())
    assert report["froc"] is not None and 0.0 <= report["froc"]["cpm"] <= 1.0
    assert {model["task"] for model in report["models"].values()} == {"nodule", "segmentation", "malignancy"}
    state = json.loads((tmp_path / "models" / "recipe-state.json").read_text())
    assert {model["path"] for model in report["models"].values()} == set(state["stages"].values())
    assert (tmp_path / "diagnosis" / "findings.csv").is_file()
    assert report["config"]["amp"] is resolve_precision("auto", torch.device("cpu"))  # diagnose's default
    # A second run reuses the generated data instead of writing it again, trains afresh (not refused for
    # other settings: the state is new), and --amp reaches every stage.
    marker = tmp_path / "luna" / demo.DATASET_MARKER
    written = marker.stat().st_mtime_ns
    argv[argv.index("--minutes") + 1] = "0.8"
    assert demo.main([*argv, "--amp"]) == 0
    assert marker.stat().st_mtime_ns == written
    assert json.loads((tmp_path / "diagnosis" / "report.json").read_text())["config"]["amp"] is True
    for task in ("nodule", "segmentation", "malignancy"):
        newest = max((tmp_path / "models").glob(f"{task}_*.config.json"))
        assert json.loads(newest.read_text())["amp"] is True, newest
    timings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("demo: ") and "total" in line]
    assert len(timings) == 1 and "synthetic data" not in timings[0] and "diagnose" in timings[0]
