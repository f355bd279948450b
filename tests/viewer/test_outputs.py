"""diagnose --output writes the viewer page and every slice it names; --no-viewer writes neither."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
from PIL import Image

from p2ch_luna.diagnose import cli as diagnose_cli
from p2ch_luna.diagnose.report import REPORT_FILE
from p2ch_luna.viewer.page import PAGE_FILE, SLICES_FOLDER, slice_file


def _diagnose(tiny_dataset: Path, untrained_models: Path, out: Path, *extra: str) -> dict:
    uid = pd.read_csv(tiny_dataset / "annotations.csv")["seriesuid"].iloc[0]
    assert diagnose_cli.main(["--data-root", str(tiny_dataset), "--models-dir", str(untrained_models),
                              "--series-uid", uid, "--output", str(out), "--segmentation-threshold", "0.9",
                              *extra]) == 0
    return json.loads((out / REPORT_FILE).read_text())


def test_the_page_names_only_slices_that_are_there(tiny_dataset: Path, untrained_models: Path,
                                                   tmp_path: Path) -> None:
    report = _diagnose(tiny_dataset, untrained_models, tmp_path / "out")
    page = (tmp_path / "out" / PAGE_FILE).read_text()
    data = json.loads(re.search(r'id="viewer-data">(.*?)</script>', page, re.S).group(1))
    (series,) = data["series"]
    folder = tmp_path / "out" / series["folder"]
    assert series["shape"] == report["series"][0]["shape_irc"] and series["uid"] == report["series"][0]["series_uid"]
    assert sorted(p.name for p in folder.glob("ct*.png")) == [slice_file("ct", i) for i in range(series["shape"][0])]
    for kind in ("lung", "nodule"):
        assert sorted(p.name for p in folder.glob(f"{kind}*.png")) == [slice_file(kind, i)
                                                                       for i in series[f"{kind}_slices"]]
    assert series["lung_slices"]  # the synthetic CT has lungs
    with Image.open(folder / slice_file("ct", 0)) as image:
        assert image.mode == "L" and image.size == (series["shape"][2], series["shape"][1])
    assert report["series"][0]["timings"]["viewer_s"] > 0 and PAGE_FILE in report["files"]


def test_no_viewer_writes_no_page(tiny_dataset: Path, untrained_models: Path, tmp_path: Path) -> None:
    report = _diagnose(tiny_dataset, untrained_models, tmp_path / "out", "--no-viewer")
    assert not (tmp_path / "out" / PAGE_FILE).exists() and not (tmp_path / "out" / SLICES_FOLDER).exists()
    assert "viewer_s" not in report["series"][0]["timings"]
