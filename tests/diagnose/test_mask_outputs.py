"""diagnose's mask outputs: --mask-format picks NIfTI, DICOM-SEG or both; report.json names them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from p2ch_luna.diagnose import cli as diagnose_cli
from p2ch_luna.diagnose import grouping, pipeline, report
from p2ch_luna.errors import UsageError
from p2ch_luna.io.ct import Ct, load_ct
from p2ch_luna.io.dicom_seg import read_seg_mask
from p2ch_luna.synth.masks import sample_nodule_mask


def _with_mask(ct: Ct, source: Path, mask: np.ndarray) -> pipeline.SeriesDiagnosis:
    return pipeline.SeriesDiagnosis(
        series_uid=ct.series_uid, source=str(source), shape_irc=ct.shape, spacing_irc=tuple(ct.geometry.spacing_irc),
        lung_volume_ml=0.0, candidates=grouping._empty_candidates(), timings={"total_s": 0.0},
        geometry=ct.geometry, mask_bits=np.packbits(mask))


def _write(out: Path, result: pipeline.SeriesDiagnosis, mask_format: str) -> dict:
    config = pipeline.DiagnoseConfig()
    summary = report.Summary(config=config, models={}, device="cpu", world_size=1, wall_s=0.0)
    report.write_outputs(out, [result], report.Scores(), config, summary, mask_format)
    return json.loads((out / report.REPORT_FILE).read_text())


def test_both_mask_formats_of_the_real_dicom_ct_hold_the_mask(cptac_dir: Path, tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    ct = load_ct(cptac_dir)
    mask = sample_nodule_mask(ct.shape)
    written = _write(tmp_path / "out", _with_mask(ct, cptac_dir, mask), "both")
    seg = tmp_path / "out" / f"{ct.series_uid}{report.SEG_SUFFIX}"
    nifti = tmp_path / "out" / f"{ct.series_uid}{report.MASK_SUFFIX}"
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(nifti))), mask)
    np.testing.assert_array_equal(read_seg_mask(seg, ct.shape, ct.geometry), mask)
    assert pydicom.dcmread(seg).ReferencedSeriesSequence[0].SeriesInstanceUID == ct.series_uid
    assert "SERIES" + report.SEG_SUFFIX in written["files"] and "SERIES" + report.MASK_SUFFIX in written["files"]


def test_dicom_seg_of_a_metaimage_ct_has_new_uids_and_no_nifti(tiny_dataset: Path, tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    path = sorted(tiny_dataset.glob("subset*/*.mhd"))[0]
    ct = load_ct(path)
    mask = np.zeros(ct.shape, dtype=np.uint8)
    mask[ct.shape[0] // 2, 5:9, 5:9] = 1
    _write(tmp_path / "out", _with_mask(ct, path, mask), "dicom-seg")
    (seg,) = (tmp_path / "out").glob("*_mask*")
    assert seg.name == f"{ct.series_uid}{report.SEG_SUFFIX}"
    ds = pydicom.dcmread(seg)
    assert "ReferencedSeriesSequence" not in ds and int(ds.NumberOfFrames) == 1
    np.testing.assert_array_equal(read_seg_mask(seg, ct.shape, ct.geometry), mask)


def test_mask_format_is_an_option_with_help_and_needs_output() -> None:
    parser = diagnose_cli.build_parser()
    assert "--mask-format" in parser.format_help()
    assert parser.parse_args(["--mask-format", "both"]).mask_format == "both"
    with pytest.raises(SystemExit):
        parser.parse_args(["--mask-format", "dicom"])
    with pytest.raises(UsageError, match="--save-mask needs --output"):
        diagnose_cli._diagnose(parser.parse_args(["--mask-format", "dicom-seg"]))
