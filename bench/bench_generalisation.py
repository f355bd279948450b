"""Detection on data training never saw: one or more model sets scored side by side, in one run.

Test sets (made here, into a temporary folder, the same for every model set):

- held-out: the validation series of ``--data-root`` (the training data's own regime; skipped without it);
- shifted: the generator with other parameters than the demo's (``--shifted-shape``, ``--shifted-slices``,
  ``--shifted-seed``): other field of view, slice counts and patients;
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
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from p2ch_luna import diagnose
from p2ch_luna.synth import implant
from p2ch_luna.synth.generator import generate_dataset

DEFAULT_CPTAC = Path(__file__).resolve().parents[2] / "shared" / "data" / "cptac-chest-ct"
IMPLANT_DIAMETERS = ("6", "10", "14")
IMPLANT_PLACEMENTS = ("isolated", "pleural", "vascular")


def model_set(text: str) -> tuple[str, Path, Path]:
    name, _, files = text.partition("=")
    segmentation, _, nodule = files.partition(",")
    if not (name and segmentation and nodule):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=SEGMENTATION,NODULE")
    return name, Path(segmentation), Path(nodule)


def summary(report_path: Path, threshold: float) -> dict[str, float | int | str]:
    """The figures of one diagnosis report."""
    report = json.loads(report_path.read_text())
    series = report["series"]
    candidates = [len(entry["candidates"]) for entry in series]
    findings = [sum(c["nodule_probability"] >= threshold for c in entry["candidates"]) for entry in series]
    nodules = [n for entry in series for n in (entry.get("nodules") or [])]
    froc = report.get("froc") or {}
    cpm = froc.get("cpm")
    return {
        "cpm": "-" if cpm is None else f"{cpm:.3f} ({froc['ci_low']:.2f}-{froc['ci_high']:.2f})",
        "candidates_per_ct": float(np.mean(candidates)), "findings_per_ct": float(np.mean(findings)),
        "nodules_found": f"{sum(n['finding'] > 0 for n in nodules)}/{len(nodules)}" if nodules else "-",
    }


def run_diagnosis(arguments: list[str], output: Path) -> Path:
    with contextlib.redirect_stdout(io.StringIO()):  # the per-series report: the table below sums it up
        code = diagnose.main([*arguments, "--output", str(output), "--log-level", "WARNING"])
    if code != 0:
        raise SystemExit(f"diagnose {' '.join(arguments)} failed with exit code {code}")
    return output / "report.json"


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
    parser.add_argument("--threshold", type=float, default=0.5, help="nodule probability of a finding")
    parser.add_argument("--diagnose-args", default="", metavar="ARGS",
                        help="more diagnose options for every run, e.g. '--max-shell-fill 0.3'")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_generalisation_") as tmp:
        work = Path(tmp)
        shifted = work / "shifted"
        generate_dataset(shifted, series=args.shifted_series, seed=args.shifted_seed,
                         shape=tuple(args.shifted_shape), slices=tuple(args.shifted_slices), progress=False)
        sets: dict[str, list[str]] = {"shifted": ["--data-root", str(shifted), "--cache-dir", str(work / "cache"),
                                                  "--validation", "--include-train"]}
        if args.data_root is not None:
            cache = ["--cache-dir", str(args.cache_dir)] if args.cache_dir else ["--cache-dir", str(work / "cache")]
            sets = {"held-out": ["--data-root", str(args.data_root), *cache, "--validation"], **sets}
        if args.cptac.is_dir():
            implanted = work / "implanted"
            for seed in range(1, args.implanted_copies + 1):
                with contextlib.redirect_stdout(io.StringIO()):
                    code = implant.main([str(args.cptac), str(implanted), "--diameters", *IMPLANT_DIAMETERS,
                                         "--placement", *IMPLANT_PLACEMENTS, "--seed", str(seed),
                                         "--log-level", "WARNING"])
                if code != 0:
                    raise SystemExit(f"implant failed with exit code {code}")
            sets["implanted"] = ["--data-root", str(implanted), "--cache-dir", str(work / "cache"), "--validation",
                                 "--include-train"]
            sets["cptac"] = ["--ct", str(args.cptac)]
        rows = []
        for name, segmentation, nodule in args.models:
            models = ["--segmentation-path", str(segmentation), "--classification-path", str(nodule),
                      *args.diagnose_args.split()]
            for set_name, arguments in sets.items():
                started = time.perf_counter()
                report = run_diagnosis([*arguments, *models], work / f"{name}_{set_name}")
                rows.append({"models": name, "set": set_name, **summary(report, args.threshold),
                             "seconds": time.perf_counter() - started})
    print(f"{'models':<10} {'set':<10} {'CPM (95% CI)':<20} {'cand./CT':>9} {'findings/CT':>12} "
          f"{'nodules found':>14} {'s':>6}")
    for row in rows:
        print(f"{row['models']:<10} {row['set']:<10} {row['cpm']:<20} {row['candidates_per_ct']:>9.0f} "
              f"{row['findings_per_ct']:>12.1f} {row['nodules_found']:>14} {row['seconds']:>6.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
