"""Outputs of ``p2ch_luna.diagnose``: the scores, the console report, report.json, findings.csv, nodules.csv, the mask.

findings.csv is the LUNA16 submission file: every scored candidate with its
nodule probability. nodules.csv holds only the findings (candidates at or above
the nodule threshold) with their malignancy, diameter and world and voxel centre.
The mask is gzip NIfTI with the CT's geometry, and/or a DICOM-SEG (``--mask-format``) that
references the CT's series when the CT was a DICOM folder (:mod:`p2ch_luna.io.dicom_seg`).

Files are staged in a temporary folder next to the output folder and then moved
in one by one with ``os.replace``: an error before the move leaves the output
folder untouched, and no file in it is ever half written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from p2ch_luna import RESEARCH_NOTICE
from p2ch_luna.diagnose.pipeline import DiagnoseConfig, SeriesDiagnosis, findings
from p2ch_luna.diagnose.viewer_page import write_viewer
from p2ch_luna.errors import LunaError
from p2ch_luna.evaluation.figures import plot_froc
from p2ch_luna.evaluation.scoring import luna_froc, series_confusion, truth_matches
from p2ch_luna.evaluation.text import format_confusion_table, format_froc
from p2ch_luna.evaluation.truth import Truth, luna_detections
from p2ch_luna.io.dicom_seg import DCM_SUFFIX, read_dicom_source, write_dicom_seg
from p2ch_luna.io.mask import NIFTI_SUFFIX, write_nifti_mask
from p2ch_luna.metrics.froc import FrocResult
from p2ch_luna.viewer.page import PAGE_FILE, SLICES_FOLDER

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"
FINDINGS_FILE = "findings.csv"
NODULES_FILE = "nodules.csv"
MASK_SUFFIX = "_mask" + NIFTI_SUFFIX
SEG_SUFFIX = "_mask" + DCM_SUFFIX
MASK_FORMATS = ("nifti", "dicom-seg", "both")
NODULE_COLUMNS = ["seriesuid", "finding", "nodule_probability", "malignancy_probability", "diameter_mm",
                  "center_x", "center_y", "center_z", "index", "row", "col"]
OUTPUT_FILES = {
    FINDINGS_FILE: "every scored candidate, LUNA16 submission format (seriesuid, coordX/Y/Z mm, probability)",
    NODULES_FILE: "the findings only (nodule probability at or above the threshold): probabilities, diameter, "
                  "world centre (mm) and voxel centre (index, row, col)",
    "SERIES" + MASK_SUFFIX: "with --save-mask: the nodule segmentation mask, gzip NIfTI with the CT's geometry",
    PAGE_FILE: f"unless --no-viewer: a page of the slices, masks, findings and truth, with its PNGs in "
               f"{SLICES_FOLDER}/ (python -m p2ch_luna.view DIR)",
    "SERIES" + SEG_SUFFIX: "with --mask-format dicom-seg or both: the nodule segmentation mask as DICOM-SEG "
                           "(referencing the CT's series when it was DICOM)",
}
FROC_FILE = "froc.png"


@dataclasses.dataclass
class Scores:
    """Scores against truth: the book's confusion table per series and in total, and the FROC."""

    per_series: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    total: np.ndarray | None = None
    froc: FrocResult | None = None
    nodules: pd.DataFrame | None = None
    """Each annotated nodule of the scored series and the candidate that finds it (:func:`p2ch_luna.evaluation.scoring.truth_matches`)."""

    def nodules_of(self, series_uid: str) -> pd.DataFrame | None:
        if self.nodules is None:
            return None
        return self.nodules[self.nodules["series_uid"] == series_uid]


@dataclasses.dataclass
class Summary:
    """Run-wide facts for the report: settings, models, device, wall time."""

    config: DiagnoseConfig
    models: dict[str, Any]
    device: str
    world_size: int
    wall_s: float


def score(results: Sequence[SeriesDiagnosis], truth: Truth | None, scored_uids: Sequence[str],
          config: DiagnoseConfig) -> Scores:
    """Confusion tables for the series in ``scored_uids`` and the FROC over them (when nodules exist)."""
    wanted = set(scored_uids)
    scored = [result for result in results if result.series_uid in wanted]
    if truth is None or not scored:
        return Scores()
    per_series = {r.series_uid: series_confusion(truth.for_series(r.series_uid), r.candidates,
                                                   config.nodule_threshold, config.malignancy_threshold)
                  for r in scored}
    total = np.sum(list(per_series.values()), axis=0)
    uids = [r.series_uid for r in scored]
    has_nodules = truth.nodules["series_uid"].isin(uids).any()
    if not has_nodules:
        return Scores(per_series=per_series, total=total)
    froc = luna_froc(truth, pd.concat([r.candidates for r in scored]), uids)
    return Scores(per_series=per_series, total=total, froc=froc, nodules=truth_matches(truth, {r.series_uid: r.candidates for r in scored}, config.nodule_threshold))


# ---------------------------------------------------------------------------
# Console


def format_finding(number: int, row: pd.Series) -> str:
    malignancy = row["malignancy_probability"]
    malignancy_text = "   n/a" if pd.isna(malignancy) else f"{malignancy:6.3f}"
    return (f"  #{number:<3d} nodule {row['nodule_probability']:.3f}  malignancy {malignancy_text}  "
            f"at ({row['center_x']:7.1f}, {row['center_y']:7.1f}, {row['center_z']:7.1f}) mm  "
            f"voxel ({row['index']:.0f}, {row['row']:.0f}, {row['col']:.0f})  ~{row['diameter_mm']:.1f} mm")


def format_truth(row: pd.Series) -> str:
    """One annotated nodule and how it was found."""
    where = (f"  truth {row['diameter_mm']:4.1f} mm at ({row['center_x']:7.1f}, {row['center_y']:7.1f}, "
             f"{row['center_z']:7.1f}) mm: ")
    if not row["is_detected"]:
        return where + f"missed (no candidate within {row['diameter_mm'] / 2:.1f} mm)"
    found = f"finding #{row['finding']}" if row["finding"] > 0 else "a candidate below the threshold"
    above = row["false_positives_above"]
    return (where + f"{found}, nodule {row['nodule_probability']:.3f}, {row['distance_mm']:.1f} mm from its centre, "
            f"{above} false positive{'' if above == 1 else 's'} above it")


def format_report(results: Sequence[SeriesDiagnosis], scores: Scores, config: DiagnoseConfig,
                  summary: Summary) -> str:
    """The printed report: findings per series, confusion tables, FROC, one summary line."""
    lines = []
    n_findings = n_malignant = n_candidates = 0
    for result in results:
        found = findings(result, config)
        malignant = int((found["malignancy_probability"] >= config.malignancy_threshold).sum())
        n_findings += len(found)
        n_malignant += malignant
        n_candidates += len(result.candidates)
        lines.append(f"{result.series_uid} ({result.source}): {len(found)} finding(s) of {len(result.candidates)} "
                     f"candidate(s), lungs {result.lung_volume_ml / 1000:.2f} l, {result.timings['total_s']:.1f} s")
        lines += [format_finding(number, row) for number, (_, row) in enumerate(found.iterrows(), start=1)]
        truth = scores.nodules_of(result.series_uid)
        if truth is not None and len(truth):
            lines.append(f"  {int(truth['is_detected'].sum())} of {len(truth)} annotated nodule(s) found:")
            lines += [format_truth(row) for _, row in truth.iterrows()]
        if result.series_uid in scores.per_series and len(results) > 1:
            lines.append(_indent(format_confusion_table(scores.per_series[result.series_uid])))
    if scores.total is not None:
        lines.append(f"Confusion table ({len(scores.per_series)} series scored, book's 0.7 x diameter rule):")
        lines.append(_indent(format_confusion_table(scores.total)))
    if scores.froc is not None:
        lines.append("LUNA16 FROC (all candidates, probability = nodule probability):")
        lines.append(_indent(format_froc(scores.froc)))
    malignancy_text = f", {n_malignant} suspected malignant" if summary.models.get("malignancy") else ""
    lines.append(f"Summary: {len(results)} CT(s), {n_candidates} candidate(s), {n_findings} finding(s) with "
                 f"nodule probability >= {config.nodule_threshold:g}{malignancy_text}; {summary.wall_s:.1f} s "
                 f"on {summary.device}" + (f" x {summary.world_size}" if summary.world_size > 1 else ""))
    lines.append(RESEARCH_NOTICE)
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


# ---------------------------------------------------------------------------
# Files


def report_dict(results: Sequence[SeriesDiagnosis], scores: Scores, summary: Summary) -> dict[str, Any]:
    """report.json: settings, models, every candidate with every score, confusion tables, FROC, timings."""
    series = []
    for result in results:
        series.append({
            "series_uid": result.series_uid,
            "source": result.source,
            "shape_irc": list(result.shape_irc),
            "spacing_irc": list(result.spacing_irc),
            "lung_volume_ml": result.lung_volume_ml,
            "timings": result.timings,
            "candidates": json.loads(result.candidates.to_json(orient="records")),
            "confusion_table": _table(scores.per_series.get(result.series_uid)),
            "nodules": _records(scores.nodules_of(result.series_uid)),
        })
    return {
        "notice": RESEARCH_NOTICE,
        "config": dataclasses.asdict(summary.config),
        "models": summary.models,
        "device": summary.device,
        "world_size": summary.world_size,
        "wall_s": summary.wall_s,
        "series": series,
        "confusion_table": _table(scores.total),
        "froc": None if scores.froc is None else scores.froc.summary(),
        "files": OUTPUT_FILES,
    }


def _records(frame: pd.DataFrame | None) -> list[dict[str, Any]] | None:
    return None if frame is None else json.loads(frame.drop(columns="series_uid").to_json(orient="records"))


def _table(table: np.ndarray | None) -> list[list[int]] | None:
    return None if table is None else np.asarray(table).astype(int).tolist()


def findings_csv(results: Sequence[SeriesDiagnosis]) -> str:
    """Every candidate in the LUNA16 submission format."""
    frames = [luna_detections(result.candidates) for result in results]
    frame = pd.concat(frames) if frames else pd.DataFrame(columns=["seriesuid", "coordX", "coordY", "coordZ",
                                                                     "probability"])
    return frame.to_csv(index=False, float_format="%.6g")


def nodules_csv(results: Sequence[SeriesDiagnosis], config: DiagnoseConfig) -> str:
    """The findings of every series (numbered as in the report), one row each, in ``NODULE_COLUMNS``."""
    frames = []
    for result in results:
        found = findings(result, config)
        frames.append(found.assign(seriesuid=result.series_uid, finding=np.arange(1, len(found) + 1)))
    frame = pd.concat(frames) if frames else pd.DataFrame(columns=NODULE_COLUMNS)
    return frame.reindex(columns=NODULE_COLUMNS).to_csv(index=False, float_format="%.6g")


def write_outputs(output_dir: Path, results: Sequence[SeriesDiagnosis], scores: Scores, config: DiagnoseConfig,
                  summary: Summary, mask_format: str = "nifti") -> None:
    """Write every output into a staging folder, then move each file into ``output_dir``.

    ``mask_format`` (one of ``MASK_FORMATS``) picks the mask files of the results that hold a mask.
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    except OSError as error:
        raise LunaError(f"could not write into {output_dir.parent}: {error.strerror or error}") from error
    try:
        for result in results:
            for name, data in result.figures.items():
                (staging / name).write_bytes(data)
            if result.mask_bits is not None:
                _write_mask(staging, result, mask_format)
        if scores.froc is not None:
            plot_froc(scores.froc, staging / FROC_FILE)
        (staging / FINDINGS_FILE).write_text(findings_csv(results))
        (staging / NODULES_FILE).write_text(nodules_csv(results, config))
        if any(result.viewer is not None for result in results):
            write_viewer(staging, results, scores.nodules_of, scores.froc, config, FROC_FILE if scores.froc is not None else None)
        (staging / REPORT_FILE).write_text(json.dumps(report_dict(results, scores, summary), indent=2) + "\n")
        output_dir.mkdir(exist_ok=True)
        # The page after its slices; the report, which names the other files, last.
        names = sorted(os.listdir(staging), key=lambda n: (n == REPORT_FILE, n == PAGE_FILE, n))
        for name in names:
            if name == SLICES_FOLDER and (output_dir / name).is_dir():  # a folder replaces only an empty one
                os.replace(output_dir / name, staging / f".previous-{name}")
            os.replace(staging / name, output_dir / name)
    except OSError as error:
        raise LunaError(f"could not write the outputs to {output_dir}: {error.strerror or error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_mask(folder: Path, result: SeriesDiagnosis, mask_format: str) -> None:
    count = int(np.prod(result.shape_irc))
    mask = np.unpackbits(result.mask_bits, count=count).reshape(result.shape_irc)
    if mask_format in ("nifti", "both"):
        write_nifti_mask(mask, result.geometry, folder / f"{result.series_uid}{MASK_SUFFIX}")
    if mask_format in ("dicom-seg", "both"):
        source = Path(result.source)
        dicom = read_dicom_source(source, result.series_uid, result.geometry) if source.is_dir() else None
        write_dicom_seg(mask, result.geometry, folder / f"{result.series_uid}{SEG_SUFFIX}", dicom)
