"""The README's main job, end to end at toy size: generate, train the whole recipe, diagnose, score."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from p2ch_luna import demo
from p2ch_luna.precision import resolve_precision
from tests.locations import SHARED_DATA

CPTAC = SHARED_DATA / "cptac-chest-ct"


@pytest.mark.slow
def test_demo_runs_every_stage_and_writes_a_scored_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--work-dir", str(tmp_path), "--series", "12", "--shape", "96", "96", "--slices", "30", "40",
            "--epoch-sizes", "32", "64", "32", "--minutes", "1", "--log-level", "WARNING"]
    assert demo.main([*argv, "--shifted-series", "2"]) == 0
    output = capsys.readouterr().out
    assert "demo: synthetic data" in output and "CPM" in output
    table = {line.split()[0] for line in output.splitlines() if line.startswith("  ")}
    assert {"set", "held-out", "shifted"} <= table and "implanted" not in table, output
    shifted = json.loads((tmp_path / "generalisation" / "shifted" / "report.json").read_text())
    assert len(shifted["series"]) == 2 and shifted["froc"] is not None
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
    # The real CT: CPTAC where it is at hand, else one of the demo's own small series, whose lungs are too
    # small for a 14 mm nodule: then the implanted set is skipped with a warning and the rest still comes.
    real_ct = CPTAC if CPTAC.is_dir() else sorted((tmp_path / "luna").glob("subset*/*.mhd"))[0]
    real_ct = ["--real-ct", str(real_ct), "--implanted-copies", "1"]
    assert demo.main([*argv, "--amp", "--shifted-series", "0", *real_ct]) == 0
    assert marker.stat().st_mtime_ns == written
    assert json.loads((tmp_path / "diagnosis" / "report.json").read_text())["config"]["amp"] is True
    for task in ("nodule", "segmentation", "malignancy"):
        newest = max((tmp_path / "models").glob(f"{task}_*.config.json"))
        assert json.loads(newest.read_text())["amp"] is True, newest
    captured = capsys.readouterr()
    output = captured.out
    timings = [line for line in output.splitlines() if line.startswith("demo: ") and "total" in line]
    assert len(timings) == 1 and "synthetic data" not in timings[0] and "diagnose" in timings[0]
    table = [line.split() for line in output.splitlines() if line.startswith("  ")]
    assert "shifted" not in {row[0] for row in table}
    assert ["real", "CT", "-"] == next(row for row in table if row[0] == "real")[:3]  # no annotations: no CPM
    if CPTAC.is_dir():  # implanted: 3 known nodules
        implanted = json.loads((tmp_path / "generalisation" / "implanted" / "report.json").read_text())
        assert sum(len(entry["nodules"]) for entry in implanted["series"]) == 3
        assert "implanted" in {row[0] for row in table}
    else:
        assert "demo: no implanted set:" in captured.err and "implanted" not in {row[0] for row in table}
