"""The p2ch_luna.evaluate command on small CSVs written to tmp_path."""

from __future__ import annotations

import json

import pytest

from p2ch_luna.evaluate import main

ANNOTATIONS = """seriesuid,coordX,coordY,coordZ,diameter_mm
1.2.3,0.0,0.0,0.0,10.0
1.2.3,50.0,0.0,0.0,8.0
1.2.4,10.0,10.0,10.0,6.0
"""
EXCLUDED = """seriesuid,coordX,coordY,coordZ,diameter_mm
1.2.4,-50.0,0.0,0.0,-1
"""
FINDINGS = """seriesuid,coordX,coordY,coordZ,probability
1.2.3,1.0,0.0,0.0,0.95
1.2.3,0.0,1.0,0.0,0.40
1.2.3,80.0,0.0,0.0,0.60
1.2.4,10.0,10.0,11.0,0.90
1.2.4,-52.0,0.0,0.0,0.99
1.2.5,0.0,0.0,0.0,0.30
"""


@pytest.fixture
def csvs(tmp_path):
    paths = {}
    for name, text in [("annotations", ANNOTATIONS), ("excluded", EXCLUDED), ("findings", FINDINGS)]:
        paths[name] = tmp_path / f"{name}.csv"
        paths[name].write_text(text)
    return paths


def test_evaluate_prints_cpm_and_writes_outputs(csvs, tmp_path, capsys):
    output = tmp_path / "out"
    code = main(
        [str(csvs["findings"]), "--annotations", str(csvs["annotations"]), "--excluded", str(csvs["excluded"]),
         "--bootstrap", "50", "--seed", "3", "--output", str(output)]
    )
    assert code == 0
    report = capsys.readouterr().out
    # Scans 1.2.3-1.2.5; FPs 0.60 and 0.30 -> 2/3 per scan at most; the 50 mm nodule is missed.
    assert "CPM: 0.6667" in report
    assert "95% CI" in report
    assert "Nodules detected: 2/3; false positives: 2; ignored marks: 2; scans: 3" in report
    saved = json.loads((output / "froc.json").read_text())
    assert saved["cpm"] == pytest.approx(2 / 3)
    assert saved["n_bootstrap"] == 50
    assert (output / "froc.png").read_bytes()[:4] == b"\x89PNG"
    nodules = (output / "nodules.csv").read_text().splitlines()
    assert nodules == [
        "seriesuid,coordX,coordY,coordZ,diameter_mm,is_detected,probability,distance_mm,false_positives_above",
        "1.2.3,0.0,0.0,0.0,10.0,True,0.95,1.0,0",
        "1.2.3,50.0,0.0,0.0,8.0,False,,,-1",
        "1.2.4,10.0,10.0,10.0,6.0,True,0.9,1.0,0",  # the 0.99 mark lies on an excluded finding
    ]


def test_evaluate_series_list_sets_the_fp_divisor(csvs, tmp_path, capsys):
    series_list = tmp_path / "seriesuids.csv"
    series_list.write_text("1.2.3\n1.2.4\n1.2.6\n1.2.7\n")
    code = main(
        [str(csvs["findings"]), "--annotations", str(csvs["annotations"]), "--series-list", str(series_list),
         "--bootstrap", "0"]
    )
    assert code == 0
    report = capsys.readouterr().out
    # 1.2.5 is not evaluated (its mark is dropped); the excluded file is not given, so -52 is an FP:
    # FPs 0.99 and 0.60 over 4 scans = 0.5 per scan at most.
    assert "scans: 4" in report
    assert "false positives: 2" in report
    assert "CI" not in report


def test_evaluate_missing_column_is_one_line_error(csvs, capsys):
    csvs["findings"].write_text(FINDINGS.replace("probability", "score"))
    code = main([str(csvs["findings"]), "--annotations", str(csvs["annotations"])])
    assert code == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "probability" in error and str(csvs["findings"]) in error


def test_evaluate_non_numeric_value_names_file_and_row(csvs, capsys):
    csvs["annotations"].write_text(ANNOTATIONS.replace("50.0,0.0,0.0,8.0", "50.0,zero,0.0,8.0"))
    code = main([str(csvs["findings"]), "--annotations", str(csvs["annotations"])])
    assert code == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert str(csvs["annotations"]) in error and "row 3" in error and "coordY" in error


def test_evaluate_missing_file_is_one_line_error(csvs, tmp_path, capsys):
    code = main([str(tmp_path / "nope.csv"), "--annotations", str(csvs["annotations"])])
    assert code == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "nope.csv" in error


def test_evaluate_empty_series_list_is_data_error(csvs, tmp_path, capsys):
    series_list = tmp_path / "seriesuids.csv"
    series_list.write_text("seriesuid\n\n")
    code = main([str(csvs["findings"]), "--annotations", str(csvs["annotations"]), "--series-list", str(series_list)])
    assert code == 1
    assert "names no series" in capsys.readouterr().err


def test_two_folds_merged_score_as_the_single_file(csvs, tmp_path, capsys):
    """FINDINGS split by series into two folds: the merge scores exactly as the one file (CPM 2/3 by hand)."""
    lines = FINDINGS.splitlines()
    header, rows = lines[0], lines[1:]
    first, second = tmp_path / "fold0.csv", tmp_path / "fold1.csv"
    first.write_text("\n".join([header, *(row for row in rows if row.startswith("1.2.3,"))]) + "\n")
    second.write_text("\n".join([header, *(row for row in rows if not row.startswith("1.2.3,"))]) + "\n")
    output = tmp_path / "merged"
    code = main([str(first), str(second), "--annotations", str(csvs["annotations"]), "--annotations-excluded",
                 str(csvs["excluded"]), "--bootstrap", "0", "--output", str(output)])
    assert code == 0
    report = capsys.readouterr().out
    assert "CPM: 0.6667" in report
    assert "Nodules detected: 2/3; false positives: 2; ignored marks: 2; scans: 3" in report
    assert json.loads((output / "froc.json").read_text())["cpm"] == pytest.approx(2 / 3)
