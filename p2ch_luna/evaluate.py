"""Score a findings CSV against LUNA16 annotations: FROC, CPM and its bootstrap CI.

    python -m p2ch_luna.evaluate findings.csv [more findings.csv ...] --annotations annotations.csv \\
        [--annotations-excluded annotations_excluded.csv] [--series-list seriesuids.csv ...] [--output DIR]

Several findings CSVs (the ten folds' of LUNA16's protocol) are merged into one submission and scored
as one FROC; a series in two of them is refused (:mod:`p2ch_luna.evaluation.merge`), as is one in two
series lists.

The findings CSV has ``seriesuid,coordX,coordY,coordZ,probability`` (LUNA16's
submission format). Scoring follows the official ``noduleCADEvaluationLUNA16.py``
(see :func:`p2ch_luna.metrics.froc.froc`). The scans evaluated matter: FPs are
averaged over them, so pass the list of scans the detector ran on; by default
it is every scan named in the annotations or the findings, which leaves out
scans that have neither.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from p2ch_luna.cli import add_series_uid_argument, make_parser, non_negative_int, run_command
from p2ch_luna.columns import DIAMETER_COLUMN, PROBABILITY_COLUMN, SERIES_COLUMN, XYZ_COLUMNS
from p2ch_luna.data.luna import read_csv_checked
from p2ch_luna.errors import DataError
from p2ch_luna.evaluation.figures import plot_froc
from p2ch_luna.evaluation.merge import merge_findings, merge_series_lists
from p2ch_luna.evaluation.text import format_froc
from p2ch_luna.io.atomic import atomic_write_text
from p2ch_luna.metrics.froc import (
    DEFAULT_BOOTSTRAP_SAMPLES,
    DEFAULT_BOOTSTRAP_SEED,
    LUNA16_MAX_DETECTIONS_PER_SCAN,
    froc,
    match_nodules,
)

log = logging.getLogger(__name__)

FROC_PLOT_FILE = "froc.png"
FROC_JSON_FILE = "froc.json"
NODULES_FILE = "nodules.csv"
"""Each annotated nodule of the evaluated scans with the finding that hits it (:func:`p2ch_luna.metrics.froc.match_nodules`)."""


def read_series_list(path: Path) -> list[str]:
    """Series UIDs, one per line (LUNA16's ``seriesuids.csv``); a ``seriesuid`` header line is skipped."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"series list {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"series list {path} could not be read: {error}") from None
    uids = [line.split(",")[0].strip() for line in lines if line.strip()]
    if uids and uids[0] == SERIES_COLUMN:
        uids = uids[1:]
    if not uids:
        raise DataError(f"series list {path} names no series")
    return uids


def _series_uids(args: argparse.Namespace, annotation_uids: Sequence[str], finding_uids: Sequence[str]) -> list[str]:
    if args.series_list:
        return merge_series_lists([(path, read_series_list(path)) for path in args.series_list])
    if args.series_uid:
        return args.series_uid
    return sorted(set(annotation_uids) | set(finding_uids))


def evaluate(args: argparse.Namespace) -> int:
    location_columns = [SERIES_COLUMN, *XYZ_COLUMNS]
    findings = merge_findings([(path, read_csv_checked(path, [*location_columns, PROBABILITY_COLUMN],
                                                       [*XYZ_COLUMNS, PROBABILITY_COLUMN], what="findings"))
                               for path in args.findings])
    annotations = read_csv_checked(
        args.annotations, [*location_columns, DIAMETER_COLUMN], [*XYZ_COLUMNS, DIAMETER_COLUMN], what="annotations"
    )
    excluded = None
    if args.annotations_excluded is not None:
        excluded = read_csv_checked(
            args.annotations_excluded,
            [*location_columns, DIAMETER_COLUMN],
            [*XYZ_COLUMNS, DIAMETER_COLUMN],
            what="excluded annotations",
        )
    series_uids = _series_uids(args, annotations[SERIES_COLUMN].tolist(), findings[SERIES_COLUMN].tolist())
    result = froc(
        annotations,
        findings,
        series_uids,
        excluded,
        n_bootstrap=args.bootstrap,
        rng=np.random.default_rng(args.seed),
        max_detections_per_scan=args.max_per_scan or None,
    )
    print(format_froc(result))
    if args.output is not None:
        plot_froc(result, args.output / FROC_PLOT_FILE, title=Path(args.findings[0]).stem if len(args.findings) == 1
                  else f"{len(args.findings)} findings files merged")
        atomic_write_text(args.output / FROC_JSON_FILE, json.dumps(result.to_dict(), indent=2) + "\n")
        evaluated = annotations[annotations[SERIES_COLUMN].isin(series_uids)]
        nodules = match_nodules(evaluated, findings[findings[SERIES_COLUMN].isin(series_uids)], excluded)
        atomic_write_text(args.output / NODULES_FILE,
                          nodules.drop(columns="detection_id").to_csv(index=False, lineterminator="\n"))
        log.info("wrote %s, %s and %s", args.output / FROC_PLOT_FILE, args.output / FROC_JSON_FILE,
                 args.output / NODULES_FILE)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "p2ch_luna.evaluate",
        "Score LUNA16 findings (seriesuid,coordX,coordY,coordZ,probability): FROC, CPM and bootstrap CI.",
        paths=False,
    )
    parser.add_argument("findings", type=Path, nargs="+",
                        help="findings CSV to score; several (e.g. the ten LUNA16 folds' findings.csv) are merged "
                             "into one submission, each series in one file only")
    parser.add_argument("--annotations", type=Path, required=True, help="LUNA16 annotations.csv")
    parser.add_argument(
        "--annotations-excluded", dest="annotations_excluded", type=Path, metavar="FILE",
        help="LUNA16 annotations_excluded.csv: marks on these findings are ignored",
    )
    parser.add_argument("--excluded", dest="annotations_excluded", type=Path, help=argparse.SUPPRESS)  # former spelling
    scans = parser.add_mutually_exclusive_group()
    scans.add_argument("--series-list", type=Path, action="append",
                       help="file with the evaluated series UIDs, one per line; repeat it for several folds "
                            "(each series in one list only)")
    add_series_uid_argument(scans, "the evaluated series UIDs")
    parser.add_argument(
        "--bootstrap",
        type=non_negative_int,
        default=DEFAULT_BOOTSTRAP_SAMPLES,
        help="bootstrap samples over scans for the CPM confidence interval (0: none)",
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_BOOTSTRAP_SEED, help="bootstrap random seed")
    parser.add_argument(
        "--max-per-scan",
        type=non_negative_int,
        default=LUNA16_MAX_DETECTIONS_PER_SCAN,
        help="keep only the most suspicious marks per scan, as the official script does (0: keep all)",
    )
    parser.add_argument("--output", type=Path,
                        help=f"folder for {FROC_PLOT_FILE}, {FROC_JSON_FILE} and {NODULES_FILE} (each annotated "
                             "nodule with the probability of the finding that hits it, its distance and the false "
                             "positives above it)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(evaluate, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
