"""Detection on data training never saw: one or more model sets scored side by side, in one run.

Test sets (made here, into a temporary folder, the same for every model set):

- held-out: the validation series of ``--data-root`` (the training data's own regime; skipped without it);
- shifted: the generator's ``shifted`` regime (:mod:`p2ch_luna.synth.regime`: thicker slices, more noise and blur,
  another HU calibration, vessel calibre and nodule mix) at another size (``--shifted-shape``, ``--shifted-slices``)
  and seed (``--shifted-seed``): other scanners and patients;
- implanted: copies of the real CPTAC CT (``--cptac``) with nodules implanted into its lungs
  (``python -m p2ch_luna.implant``, one seed per copy): real anatomy, known answer;
- cptac: the real CPTAC CT itself (no annotations): how many findings a real scan gets.

Per set and model set: CPM with its bootstrap interval, candidates and findings (p >= ``--threshold``) per
CT, and the annotated nodules that are findings. A model set is ``NAME=SEGMENTATION,NODULE`` (checkpoints).

    python -m bench.bench_generalisation --models base=SEG.state,NOD.state --models mined=SEG.state,NOD2.state \\
        [--data-root DEMO/luna --cache-dir DEMO/cache] [--cptac ../shared/data/cptac-chest-ct]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from p2ch_luna.evaluation.summary import summarise_report
from p2ch_luna.generalisation import diagnose_quietly, make_implanted_set, make_shifted_set
from p2ch_luna.synth.regime import REGIMES, SHIFTED, regime_named

DEFAULT_CPTAC = Path(__file__).resolve().parents[2] / "shared" / "data" / "cptac-chest-ct"


def model_set(text: str) -> tuple[str, Path, Path]:
    name, _, files = text.partition("=")
    segmentation, _, nodule = files.partition(",")
    if not (name and segmentation and nodule):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=SEGMENTATION,NODULE")
    return name, Path(segmentation), Path(nodule)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=model_set, action="append", required=True,
                        metavar="NAME=SEGMENTATION,NODULE", help="a model set to score (repeat for several)")
    parser.add_argument("--data-root", type=Path, default=None, help="training data: its validation series")
    parser.add_argument("--cache-dir", type=Path, default=None, help="the training data's cache")
    parser.add_argument("--cptac", type=Path, default=DEFAULT_CPTAC, help="the real CPTAC CT (DICOM folder)")
    parser.add_argument("--implanted-copies", type=int, default=3)
    parser.add_argument("--shifted-series", type=int, default=10)
    parser.add_argument("--shifted-shape", type=int, nargs=2, default=[224, 224])
    parser.add_argument("--shifted-slices", type=int, nargs=2, default=[60, 90])
    parser.add_argument("--shifted-seed", type=int, default=99)
    parser.add_argument("--shifted-regime", choices=list(REGIMES), default=SHIFTED.name,
                        help="generator regime of the shifted set (default: shifted)")
    parser.add_argument("--threshold", type=float, default=0.5, help="nodule probability of a finding")
    parser.add_argument("--diagnose-args", default="", metavar="ARGS",
                        help="more diagnose options for every run, e.g. '--max-shell-fill 0.3'")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_generalisation_") as tmp:
        work = Path(tmp)
        shifted = make_shifted_set(work / "shifted", args.shifted_series, args.shifted_seed,
                                   tuple(args.shifted_shape), tuple(args.shifted_slices),
                                   regime_named(args.shifted_regime))
        sets: dict[str, list[str]] = {"shifted": ["--data-root", str(shifted), "--cache-dir", str(work / "cache"),
                                                  "--validation", "--include-train"]}
        if args.data_root is not None:
            cache = ["--cache-dir", str(args.cache_dir)] if args.cache_dir else ["--cache-dir", str(work / "cache")]
            sets = {"held-out": ["--data-root", str(args.data_root), *cache, "--validation"], **sets}
        if args.cptac.is_dir():
            implanted = make_implanted_set(args.cptac, work / "implanted", args.implanted_copies)
            sets["implanted"] = ["--data-root", str(implanted), "--cache-dir", str(work / "cache"), "--validation",
                                 "--include-train"]
            sets["cptac"] = ["--ct", str(args.cptac)]
        rows = []
        for name, segmentation, nodule in args.models:
            models = ["--segmentation-path", str(segmentation), "--classification-path", str(nodule),
                      *args.diagnose_args.split()]
            for set_name, arguments in sets.items():
                started = time.perf_counter()
                report = diagnose_quietly([*arguments, *models], work / f"{name}_{set_name}")
                rows.append({"models": name, "set": set_name, "summary": summarise_report(report, args.threshold),
                             "seconds": time.perf_counter() - started})
    print(f"{'models':<10} {'set':<10} {'CPM (95% CI)':<20} {'cand./CT':>9} {'findings/CT':>12} "
          f"{'nodules found':>14} {'s':>6}")
    for row in rows:
        figures = row["summary"]
        print(f"{row['models']:<10} {row['set']:<10} {figures.cpm_text():<20} {figures.candidates_per_ct:>9.0f} "
              f"{figures.findings_per_ct:>12.1f} {figures.found_text():>14} {row['seconds']:>6.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
