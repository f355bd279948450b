"""A synthetic LUNA16 dataset: series ``i`` of seed ``s`` made by :func:`~p2ch_luna.synth.series.make_series`
and written to ``subset<i % K>``; ``python -m p2ch_luna.synth OUT_DIR --series N --seed S``. The generative model
is described in :mod:`p2ch_luna.synth`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from p2ch_luna.cli import make_parser, run_command
from p2ch_luna.errors import UsageError
from p2ch_luna.paths import paths_from_args
from p2ch_luna.synth.parameters import DEFAULT_SHAPE, DEFAULT_SLICES, DEFAULT_SUBSETS
from p2ch_luna.synth.regime import DEFAULT, REGIMES, Regime, regime_named
from p2ch_luna.synth.series import (
    SyntheticSeries,
    make_series,
    make_series_uid,
    regime_key,
    series_flip,
    series_rng,
)
from p2ch_luna.synth.writer import SeriesInfo, write_dataset

log = logging.getLogger(__name__)



def generate_dataset(out_dir: str | os.PathLike, series: int = 10, seed: int = 0, subsets: int = DEFAULT_SUBSETS,
                     shape: tuple[int, int] = DEFAULT_SHAPE, slices: tuple[int, int] = DEFAULT_SLICES,
                     overwrite: bool = False, progress: bool = True, regime: Regime = DEFAULT) -> list[SeriesInfo]:
    """Generate a synthetic LUNA16 folder; deterministic for given arguments.

    ``regime`` gives the ranges the series are drawn from (:mod:`p2ch_luna.synth.regime`): ``default``, a
    ``shifted`` test regime, or ``wide`` domain randomisation.

    Refuses a folder that already holds LUNA16 files unless ``overwrite``, which
    first removes the ``.mhd``/``.raw`` files in its ``subset*/`` folders.
    """
    if series < 1 or subsets < 1:
        raise UsageError(f"--series and --subsets must be >= 1 (got {series} and {subsets})")
    low, high = slices
    if low > high:
        raise UsageError(f"--slices MIN MAX needs MIN <= MAX (got {low} {high})")
    root = Path(out_dir)
    existing = _existing_dataset_files(root)
    if existing and not overwrite:
        raise UsageError(f"{root} already holds a dataset ({existing[0].name}); choose an empty folder "
                         "or pass --overwrite")
    for path in existing:
        if path.suffix in (".mhd", ".raw"):
            path.unlink()
    uid_rng = np.random.default_rng([seed, series, 0x5E41E5, *regime_key(regime)])
    uids: list[str] = []
    while len(uids) < series:
        uid = make_series_uid(uid_rng)
        if uid not in uids:
            uids.append(uid)

    def generate() -> Iterator[tuple[str, SyntheticSeries]]:
        for i in tqdm(range(series), desc="synth", unit="series", disable=not progress):
            rng = series_rng(seed, i, regime)
            n_slices = int(rng.integers(low, high + 1))
            yield uids[i], make_series(rng, shape, n_slices, flip=series_flip(i), regime=regime)

    infos = write_dataset(root, generate(), subsets)
    log.info("wrote %d series (%s regime) with %d nodules to %s", len(infos), regime.name,
             sum(len(i.nodules) for i in infos), root)
    return infos


def _existing_dataset_files(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [root / name for name in ("annotations.csv", "candidates.csv", "annotations_with_malignancy.csv")
             if (root / name).exists()]
    for subset in sorted(root.glob("subset*")):
        found.extend(sorted(subset.glob("*.mhd")) + sorted(subset.glob("*.raw")))
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("python -m p2ch_luna.synth",
                         "Write a synthetic chest-CT dataset in the LUNA16 layout.")
    parser.add_argument("out_dir", nargs="?", default=None,
                        help="output folder (default: the --data-root folder)")
    parser.add_argument("--series", type=int, default=10, help="number of series")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--subsets", type=int, default=DEFAULT_SUBSETS, help="number of subset folders")
    parser.add_argument("--shape", type=int, nargs=2, default=list(DEFAULT_SHAPE), metavar=("ROWS", "COLS"),
                        help="in-plane size of each slice")
    parser.add_argument("--slices", type=int, nargs=2, default=list(DEFAULT_SLICES), metavar=("MIN", "MAX"),
                        help="range of the number of slices per series")
    parser.add_argument("--regime", choices=list(REGIMES), default=DEFAULT.name,
                        help="ranges the series are drawn from: 'default' (the demo's), 'shifted' (a test regime "
                             "training on default never sees: thicker slices, more noise and blur, other HU "
                             "calibration, vessel calibre and nodule mix) or 'wide' (domain randomisation over "
                             "both); see p2ch_luna/synth/regime.py")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in OUT_DIR")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_body, build_parser(), argv)


def _body(args: argparse.Namespace) -> int:
    out_dir = Path(args.out_dir) if args.out_dir else paths_from_args(args).data_root
    infos = generate_dataset(out_dir, series=args.series, seed=args.seed, subsets=args.subsets,
                             shape=tuple(args.shape), slices=tuple(args.slices), overwrite=args.overwrite,
                             regime=regime_named(args.regime))
    nodules = sum(len(info.nodules) for info in infos)
    candidates = sum(len(info.candidates) for info in infos)
    print(f"wrote {len(infos)} series, {nodules} nodules, {candidates} candidates to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
