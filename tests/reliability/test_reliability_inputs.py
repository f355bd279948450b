"""Bad input through the real commands: CT files given to diagnose, CSVs given to prepcache and training.

The readers' own unit tests (tests/io/test_ct.py, tests/data/test_luna.py, with hypothesis
fuzzing of MetaImage headers and CSVs) check every message; here each bad input
goes through a command: one error line naming the file, exit code 1, no
traceback and no output written half-way.
"""

from __future__ import annotations

import contextlib
import locale
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from p2ch_luna import prepcache
from p2ch_luna.data.luna import split_by_series
from p2ch_luna.diagnose import cli as diagnose_cli
from p2ch_luna.io.ct import list_series_on_disk
from p2ch_luna.training import cli as training
from tests.locations import SHARED_DATA
from tests.reliability.reliability_helpers import assert_one_line_error, diagnose_model_args, training_args

pytestmark = pytest.mark.reliability

SECOND_SERIES_UID = "1.2.826.0.1.3680043.2.1125.99.7"


# ---------------------------------------------------------------------------
# CT files given to diagnose --ct


def write_mhd(folder: Path, array: np.ndarray, spacing=(0.7, 0.7, 2.5)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    path = folder / "scan.mhd"
    sitk.WriteImage(image, str(path))
    return path


def small_ct(slices: int = 8) -> np.ndarray:
    return np.random.default_rng(0).integers(-1000, 1000, size=(slices, 16, 16)).astype(np.int16)


def set_header(path: Path, key: str, value: str) -> None:
    lines = [f"{key} = {value}" if line.split("=")[0].strip() == key else line
             for line in path.read_text().splitlines()]
    path.write_text("\n".join(lines) + "\n")


@contextlib.contextmanager
def keep_locale() -> Iterator[None]:
    """SimpleITK's DICOM writer (GDCM) sets the C locale, which would make later text files ASCII-only."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def write_dicom_series(folder: Path, series_uid: str, slices: int = 5, size: int = 16) -> None:
    """A tiny axial CT series, one file per slice, written with SimpleITK's DICOM writer."""
    with keep_locale():
        _write_dicom_series(folder, series_uid, slices, size)


def _write_dicom_series(folder: Path, series_uid: str, slices: int, size: int) -> None:
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(slices):
        image = sitk.GetImageFromArray(np.full((size, size), -500, dtype=np.int16))
        image.SetSpacing((0.7, 0.7))
        tags = {"0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{series_uid}.{k + 1}",
                "0020|000d": "1.2.826.0.1.3680043.2.1125.99", "0020|000e": series_uid, "0020|0013": str(k + 1),
                "0020|0032": f"-10\\-20\\{k * 2.5}", "0020|0037": "1\\0\\0\\0\\1\\0", "0018|0050": "2.5"}
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"extra{k:03d}.dcm"))
        writer.Execute(image)


def bad_ct(kind: str, folder: Path, cptac: Path | None) -> tuple[Path, str]:
    """(a bad CT, text the error must contain)."""
    if kind == "missing-raw":
        path = write_mhd(folder, small_ct())
        path.with_suffix(".raw").unlink()
        return path, "missing"
    if kind == "short-raw":
        path = write_mhd(folder, small_ct())
        raw = path.with_suffix(".raw")
        raw.write_bytes(raw.read_bytes()[:-100])
        return path, "truncated"
    if kind == "uchar":
        return write_mhd(folder, small_ct().astype(np.uint8)), "MET_UCHAR"
    if kind in ("zero-spacing", "negative-spacing"):
        path = write_mhd(folder, small_ct())
        set_header(path, "ElementSpacing", "0.7 0 2.5" if kind == "zero-spacing" else "0.7 0.7 -2.5")
        return path, "ElementSpacing"
    if kind == "one-slice":
        return write_mhd(folder, small_ct(slices=1)), "1 slice"
    if kind == "nifti-no-orientation":
        path = folder / "scan.nii"
        sitk.WriteImage(sitk.GetImageFromArray(small_ct()), str(path))
        data = bytearray(path.read_bytes())
        data[252:256] = bytes(4)  # qform_code and sform_code: no orientation at all
        path.write_bytes(bytes(data))
        return path, "no orientation"
    if kind == "not-a-ct":
        path = folder / "scan.mhd"
        path.write_bytes(b"\x89PNG\r\n\x1a\n not a header")
        return path, ""
    if kind == "no-dicom":
        (folder / "notes.txt").write_text("no images here\n")
        return folder, "no DICOM series"
    if cptac is None:
        pytest.skip("the CPTAC DICOM series is not available")
    files = sorted(cptac.iterdir())
    if kind == "dicom-gap":
        ordered = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(cptac))
        for index, name in enumerate(ordered):
            if index != len(ordered) // 2:
                os.symlink(name, folder / Path(name).name)
        return folder, "missing or duplicated slices"
    if kind == "dicom-two-series":
        for name in files:
            os.symlink(name, folder / name.name)
        write_dicom_series(folder, SECOND_SERIES_UID)
        return folder, "--series-uid"
    if kind == "dicom-not-ct":
        with keep_locale():
            for name in files[:5]:
                image = sitk.ReadImage(str(name))
                image.SetMetaData("0008|0060", "MR")
                writer = sitk.ImageFileWriter()
                writer.KeepOriginalImageUIDOn()
                writer.SetFileName(str(folder / name.name))
                writer.Execute(image)
        return folder, "no CT series"
    raise AssertionError(kind)


CT_CASES = ["missing-raw", "short-raw", "uchar", "zero-spacing", "negative-spacing", "one-slice",
            "nifti-no-orientation", "not-a-ct", "no-dicom", "dicom-gap", "dicom-two-series", "dicom-not-ct"]


@pytest.fixture()
def cptac_or_none() -> Path | None:
    """The real DICOM series (DICOM cases skip without it)."""
    folder = SHARED_DATA / "cptac-chest-ct"
    return folder if folder.is_dir() else None


@pytest.mark.parametrize("kind", CT_CASES)
def test_bad_ct_given_to_diagnose_is_a_one_line_error(kind: str, diagnosis_models: dict[str, Path], tmp_path: Path,
                                                      cptac_or_none: Path | None,
                                                      capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "input"
    folder.mkdir()
    path, expected = bad_ct(kind, folder, cptac_or_none)
    output = tmp_path / "report"
    code = diagnose_cli.main(["--ct", str(path), "--output", str(output), *diagnose_model_args(diagnosis_models)])
    assert_one_line_error(code, capsys.readouterr().err, str(path), expected, expected_code=1)
    assert not output.exists(), "diagnose wrote a report for a CT it could not read"


# ---------------------------------------------------------------------------
# CSVs given to prepcache


def edit_csv(path: Path, edit) -> None:
    lines = path.read_text().splitlines()
    path.write_bytes(("\n".join(edit(lines)) + "\n").encode("latin-1"))  # latin-1: "\xff" stays one raw byte


def replace_field(line: str, index: int, value: str) -> str:
    fields = line.split(",")
    fields[index] = value
    return ",".join(fields)


BAD_CSVS = {
    "missing-column": ("candidates.csv", lambda lines: [",".join(line.split(",")[:4]) for line in lines],
                       "lacks column(s) class"),
    "non-numeric": ("candidates.csv", lambda lines: [lines[0], lines[1], replace_field(lines[2], 1, "abc"),
                                                     *lines[3:]], "row 3: coordX = 'abc'"),
    "out-of-range-class": ("candidates.csv", lambda lines: [lines[0], replace_field(lines[1], 4, "2"), *lines[2:]],
                           "row 2: class"),
    "negative-diameter": ("annotations.csv", lambda lines: [lines[0], replace_field(lines[1], 4, "-3"),
                                                            *lines[2:]], "row 2: diameter_mm"),
    "not-a-csv": ("annotations.csv", lambda lines: ["\x00\x01 binary \xff"], "annotations.csv"),
}


def cached_volumes(cache_dir: Path) -> list[Path]:
    folder = cache_dir / "volumes"
    return list(folder.iterdir()) if folder.is_dir() else []


@pytest.mark.parametrize("kind", list(BAD_CSVS))
def test_bad_csv_given_to_prepcache_is_a_one_line_error(kind: str, luna_copy: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    name, edit, expected = BAD_CSVS[kind]
    edit_csv(luna_copy / name, edit)
    cache_dir = tmp_path / "cache"
    code = prepcache.main(["--data-root", str(luna_copy), "--cache-dir", str(cache_dir)])
    assert_one_line_error(code, capsys.readouterr().err, str(luna_copy / name), expected, expected_code=1)
    assert cached_volumes(cache_dir) == [], "prepcache cached series from a table it refused"


def with_blank_lines(lines: list[str]) -> list[str]:
    return [lines[0], "", *lines[1:3], "   ", "", *lines[3:], ""]


def with_duplicates(lines: list[str]) -> list[str]:
    return [*lines, lines[1], lines[2]]


def with_unknown_series(lines: list[str]) -> list[str]:
    return [*lines, replace_field(lines[1], 0, "1.2.3.4.5.not.on.disk")]


@pytest.mark.parametrize("edit, logged", [(with_blank_lines, None), (with_duplicates, "duplicate"),
                                          (with_unknown_series, None)],
                         ids=["blank-lines", "duplicate-rows", "series-not-on-disk"])
def test_tolerated_csv_quirks_still_cache_every_series(edit, logged: str | None, luna_copy: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    for name in ("candidates.csv", "annotations.csv"):
        edit_csv(luna_copy / name, edit)
    code = prepcache.main(["--data-root", str(luna_copy), "--cache-dir", str(tmp_path / "cache")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    series = len(list_series_on_disk(luna_copy))
    assert f"cached {series} of {series} series" in captured.out
    assert len(cached_volumes(tmp_path / "cache")) == series
    if logged:
        assert re.search(rf"WARNING .*{logged}", captured.err), captured.err


@pytest.mark.parametrize("loader", [[], ["--num-workers", "1"], ["--num-workers", "1", "--batch-ring"]],
                         ids=["in-process", "worker", "batch ring"])
def test_candidate_centres_outside_the_ct_are_left_out_with_a_warning(luna_copy: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture,
                                                                      loader: list[str]) -> None:
    """Every row of the validation series moved 5 m away: prepcache does not care, training leaves the rows out
    up front with a warning naming the series, and trains on the rest (also with loader workers)."""
    uid = split_by_series(sorted(list_series_on_disk(luna_copy)))[1][0]
    for name in ("candidates.csv", "annotations.csv", "annotations_with_malignancy.csv"):
        table = pd.read_csv(luna_copy / name, dtype={"seriesuid": str})
        table.loc[table["seriesuid"] == uid, "coordX"] += 5000.0
        table.to_csv(luna_copy / name, index=False)
    assert prepcache.main(["--data-root", str(luna_copy), "--cache-dir", str(tmp_path / "cache")]) == 0
    capsys.readouterr()

    code = training.main(training_args(luna_copy, tmp_path, "--epochs", "1", "--epoch-size", "4", *loader))
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    assert re.search(rf"WARNING .*row\(s\) left out: their centre lies outside their CT .*{uid}", err), err
    assert list((tmp_path / "models").glob("*.best.state"))


def test_series_uid_picks_one_series_of_a_mixed_dicom_folder(diagnosis_models: dict[str, Path], tmp_path: Path,
                                                             cptac_or_none: Path | None,
                                                             capsys: pytest.CaptureFixture) -> None:
    """The two-series error says "choose one with --series-uid": diagnose --ct must accept that choice."""
    path, _ = bad_ct("dicom-two-series", tmp_path, cptac_or_none)
    code = diagnose_cli.main(["--ct", str(path), "--series-uid", SECOND_SERIES_UID,
                          *diagnose_model_args(diagnosis_models)])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert SECOND_SERIES_UID in captured.out
