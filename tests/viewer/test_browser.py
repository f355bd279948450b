"""The viewer page of a diagnosed synthetic CT in headless Chromium: loads cleanly, lists the findings of
report.json, jumps to a finding's slice on a click, scrolls with the wheel, switches windows, renders."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from p2ch_luna.diagnose import cli as diagnose_cli
from p2ch_luna.diagnose.report import REPORT_FILE
from p2ch_luna.viewer.page import PAGE_FILE
from tests.viewer.webdriver import CHROMEDRIVER, CHROMIUM, chromium_session

pytestmark = pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                                reason=f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}); "
                                       ".ci/run installs them")

SCREENSHOT_MIN_STD = 20.0
"""Grey-level spread of the slice's part of the screenshot: a blank or one-colour view has about 0."""


@pytest.fixture(scope="module")
def diagnosed(tiny_dataset: Path, untrained_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of two annotated synthetic series, diagnosed with untrained models (findings at 0.2),
    into a folder that holds the page of an earlier run (its slices are replaced)."""
    uids = pd.read_csv(tiny_dataset / "annotations.csv")["seriesuid"].drop_duplicates().iloc[:2]
    out = tmp_path_factory.mktemp("viewer") / "out"
    common = ["--data-root", str(tiny_dataset), "--models-dir", str(untrained_models), "--cache-dir",
              str(out.parent / "cache"), "--output", str(out), "--segmentation-threshold", "0.9"]
    assert diagnose_cli.main([*common, "--series-uid", uids.iloc[1]]) == 0
    assert (out / "viewer" / "series000").is_dir()
    assert diagnose_cli.main([*common, "--series-uid", ",".join(uids), "--nodule-threshold", "0.2"]) == 0
    assert not list(out.parent.glob(".out.*")) and not list(out.glob(".*"))  # no staging folder left
    return out


def _severe(entries: list[dict]) -> list[str]:
    return [entry["message"] for entry in entries if entry.get("level") == "SEVERE"]


def test_the_page_shows_the_findings_and_jumps_to_a_clicked_one(diagnosed: Path, tmp_path: Path) -> None:
    report = json.loads((diagnosed / REPORT_FILE).read_text())
    series, other = report["series"]
    threshold = report["config"]["nodule_threshold"]
    expected = sorted((c for c in series["candidates"] if c["nodule_probability"] >= threshold),
                      key=lambda c: -c["nodule_probability"])
    assert len(expected) >= 2
    with chromium_session(tmp_path / "profile") as browser:
        browser.navigate((diagnosed / PAGE_FILE).resolve().as_uri())
        assert browser.wait_for("return document.body.dataset.ready === 'true'")
        loaded = browser.wait_for("const ct = document.getElementById('ct');"
                                  "return ct.complete && ct.naturalWidth > 0 && ct.naturalWidth")
        assert loaded == series["shape_irc"][2]
        rows = browser.execute("return [...document.querySelectorAll('#findings tbody tr')].map(r => "
                               "[Number(r.dataset.number), Number(r.dataset.probability), Number(r.dataset.slice)])")
        assert [number for number, _, _ in rows] == list(range(1, len(expected) + 1))
        np.testing.assert_allclose([p for _, p, _ in rows], [c["nodule_probability"] for c in expected])
        slices = [min(max(round(c["index"]), 0), series["shape_irc"][0] - 1) for c in expected]
        assert [s for _, _, s in rows] == slices
        slider = "return Number(document.getElementById('slice').value)"
        assert browser.execute(slider) == slices[0]  # the most probable finding is shown first
        target = next(number for number, (_, _, s) in enumerate(rows, start=1) if s != slices[0])
        browser.click(f"#findings tbody tr[data-number='{target}']")
        assert browser.execute(slider) == slices[target - 1]
        assert browser.execute("return document.querySelector('#findings tr.selected').dataset.number") == str(target)
        assert browser.execute("return document.querySelectorAll('#marks ellipse.mark-finding.selected').length") == 1
        browser.wheel("#view", 120)
        assert browser.execute(slider) == min(slices[target - 1] + 1, series["shape_irc"][0] - 1)
        # Truth: every annotated nodule listed, found or missed as report.json says; the FROC figure shown.
        truth = browser.execute("return [...document.querySelectorAll('#truth tbody tr td:nth-child(2)')]"
                                ".map(td => td.textContent)")
        assert truth == ["found" if n["finding"] > 0 else "missed" for n in series["nodules"]]
        assert browser.wait_for("const f = document.getElementById('froc'); return f.complete && f.naturalWidth > 0")
        window_table = "return document.querySelector('#window-filter feFuncR').getAttribute('tableValues')"
        lung_table = browser.execute(window_table)
        browser.click("button[data-window='mediastinum']")
        mediastinum_table = browser.execute(window_table)
        assert mediastinum_table != lung_table and mediastinum_table.split()[127] == "0.0000"  # -160 HU: black
        browser.click("button[data-window='lung']")
        assert browser.wait_for("return [...document.images].filter(i => i.style.display !== 'none' && i.src)"
                                ".every(i => i.complete && i.naturalWidth > 0)")
        browser.click("#series option[value='1']")  # the second series: its slices and its findings
        assert browser.execute("return Number(document.getElementById('slice').max)") == other["shape_irc"][0] - 1
        assert browser.execute("return document.querySelectorAll('#findings tbody tr').length") == sum(
            c["nodule_probability"] >= threshold for c in other["candidates"])
        assert browser.wait_for("const ct = document.getElementById('ct');"
                                "return ct.complete && ct.src.includes('/viewer/series001/')")
        view = browser.execute("const r = document.getElementById('view').getBoundingClientRect();"
                               "return [r.left, r.top, r.right, r.bottom]")
        screenshot = Image.open(io.BytesIO(browser.screenshot())).convert("L")
        errors = _severe(browser.console_log())
    assert errors == []
    pixels = np.asarray(screenshot.crop(tuple(round(v) for v in view)), dtype=np.float64)
    assert pixels.size > 0 and pixels.std() > SCREENSHOT_MIN_STD


def test_a_missing_slice_is_a_console_error(diagnosed: Path, tmp_path: Path) -> None:
    """The console check sees a slice the page cannot load (so the clean page above is clean)."""
    copy = tmp_path / "out"
    shutil.copytree(diagnosed, copy)
    report = json.loads((copy / REPORT_FILE).read_text())
    found = [c for c in report["series"][0]["candidates"] if c["nodule_probability"] >= 0.2]
    (copy / "viewer" / "series000" / f"ct{round(found[0]['index']):04d}.png").unlink()
    with chromium_session(tmp_path / "profile") as browser:
        browser.navigate((copy / PAGE_FILE).resolve().as_uri())
        assert browser.wait_for("return document.body.dataset.ready === 'true'")
        assert browser.wait_for("return document.getElementById('ct').complete")
        errors = _severe(browser.console_log())
    assert any("ERR_FILE_NOT_FOUND" in message for message in errors), errors
