"""Writing series as LUNA16 files: MetaImage ``.mhd/.raw`` and the three CSVs, atomically.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from p2ch_luna.geometry import Geometry
from p2ch_luna.io.atomic import atomic_write_text
from p2ch_luna.io.ct import write_metaimage
from p2ch_luna.synth.parameters import ANNOTATION_COLUMNS, CANDIDATE_COLUMNS, DEFAULT_SUBSETS, MALIGNANCY_COLUMNS
from p2ch_luna.synth.records import SyntheticCandidate, SyntheticNodule
from p2ch_luna.synth.series import SyntheticSeries


@dataclass(frozen=True)
class SeriesInfo:
    """What was written for one series (everything except the voxels)."""

    series_uid: str
    subset: int
    path: Path
    geometry: Geometry
    nodules: tuple[SyntheticNodule, ...]
    candidates: tuple[SyntheticCandidate, ...]


def write_series(series: SyntheticSeries, path: str | os.PathLike) -> None:
    """Write ``series`` as uncompressed MetaImage ``path`` (.mhd + .raw), atomically."""
    write_metaimage(series.hu, series.geometry, path)


def write_dataset(out_dir: str | os.PathLike, series: Iterable[tuple[str, SyntheticSeries]],
                  subsets: int = DEFAULT_SUBSETS) -> list[SeriesInfo]:
    """Write ``(uid, series)`` pairs round-robin into ``subset0..K-1`` plus the three CSVs.

    Series are written as they come, so a generator keeps only one in memory.
    """
    root = Path(out_dir)
    for k in range(subsets):
        (root / f"subset{k}").mkdir(parents=True, exist_ok=True)
    infos = []
    for i, (uid, one) in enumerate(series):
        path = root / f"subset{i % subsets}" / f"{uid}.mhd"
        write_series(one, path)
        infos.append(SeriesInfo(uid, i % subsets, path, one.geometry, one.nodules, one.candidates))
    write_tables(root, infos)
    return infos


def write_tables(out_dir: str | os.PathLike, infos: Sequence[SeriesInfo]) -> None:
    """Write annotations.csv, candidates.csv and annotations_with_malignancy.csv."""
    root = Path(out_dir)
    annotations, candidates, malignancy = [], [], []
    for info in infos:
        for nodule in info.nodules:
            annotations.append([info.series_uid, *map(format_number, nodule.center_xyz), format_number(nodule.diameter_mm)])
            scores = list(nodule.malignancy_scores)
            malignancy.append([info.series_uid, *map(format_number, nodule.center_xyz), format_number(nodule.diameter_mm),
                               str(nodule.is_malignant), str(scores),
                               *map(format_number, nodule.bbox_low_xyz), *map(format_number, nodule.bbox_high_xyz),
                               len(scores)])
        for candidate in info.candidates:
            candidates.append([info.series_uid, *map(format_number, candidate.center_xyz), int(candidate.is_nodule)])
    for name, columns, rows in (("annotations.csv", ANNOTATION_COLUMNS, annotations),
                                ("candidates.csv", CANDIDATE_COLUMNS, candidates),
                                ("annotations_with_malignancy.csv", MALIGNANCY_COLUMNS, malignancy)):
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
        atomic_write_text(root / name, buffer.getvalue())


def format_number(value: float) -> str:
    return f"{value:.6f}"
