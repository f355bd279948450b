"""Report summaries: figures counted from a hand-made report.json."""

from __future__ import annotations

import json
from pathlib import Path

from p2ch_luna.evaluation.summary import summarise_report, summary_table


def write_report(path: Path, froc: dict | None) -> Path:
    series = [
        {"candidates": [{"nodule_probability": p} for p in (0.9, 0.5, 0.2)],
         "nodules": [{"finding": 1}, {"finding": 0}]},
        {"candidates": [{"nodule_probability": 0.49}], "nodules": []},
    ]
    path.write_text(json.dumps({"series": series, "froc": froc}))
    return path


def test_findings_candidates_and_found_nodules_are_counted_per_ct(tmp_path: Path) -> None:
    summary = summarise_report(write_report(tmp_path / "report.json",
                                            {"cpm": 0.5, "ci_low": 0.25, "ci_high": 0.75}))
    assert (summary.candidates_per_ct, summary.findings_per_ct) == (2.0, 1.0)  # p >= 0.5 is a finding
    assert (summary.nodules_found, summary.nodules) == (1, 2)
    assert summary.cpm_text() == "0.500 (0.25-0.75)" and summary.found_text() == "1/2"
    assert summarise_report(tmp_path / "report.json", threshold=0.95).findings_per_ct == 0.0


def test_a_set_without_annotations_shows_dashes(tmp_path: Path) -> None:
    summary = summarise_report(write_report(tmp_path / "report.json", None))
    header, row = summary_table([("real CT", summary)])
    assert header.split()[:2] == ["set", "CPM"]
    assert summary.cpm is None and row.split() == ["real", "CT", "-", "2", "1.0", "1/2"]
