"""Our recipe against the book's, trained on the same data in the same run, scored on data training never saw.

    python -m bench.bench_recipes --work-dir W [--train DIR | --series 18 --shape 512 512 --slices 90 130
        --seed 11 --regime default] [--minutes 15] [--cptac DIR] [--shifted-series 6 ...]

1. The training data: ``--train DIR`` (any LUNA16-format folder), else generated into ``W/train``.
2. ``python -m p2ch_luna.training all --minutes M`` into ``W/ours``, then ``training all --book --minutes M``
   into ``W/book`` (the book's recipe through our CLI: ``candidates.csv`` negatives only, chosen by ROC AUC,
   not calibrated; same segmenter recipe, chunk, seed and budget), one after the other on the same machine.
   Each is resumable (``recipe-state.json``): a rerun skips what is trained.
3. ``bench.bench_generalisation`` with both model sets: held-out (the training data's validation series),
   shifted (the generator's ``shifted`` regime), implanted (the real CPTAC CT with nodules implanted), cptac.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from bench import bench_generalisation
from p2ch_luna import training
from p2ch_luna.synth.generator import generate_dataset
from p2ch_luna.synth.regime import DEFAULT, REGIMES, regime_named
from p2ch_luna.training.recipe import recorded_checkpoints

RECIPES = {"ours": [], "book": ["--book"]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True, help="training data, caches, models, runs")
    parser.add_argument("--train", type=Path, default=None, help="a LUNA16-format training folder (default: "
                                                                  "generated into WORK/train)")
    parser.add_argument("--series", type=int, default=18)
    parser.add_argument("--shape", type=int, nargs=2, default=[512, 512])
    parser.add_argument("--slices", type=int, nargs=2, default=[90, 130])
    parser.add_argument("--seed", type=int, default=11, help="seed of the generated training data")
    parser.add_argument("--regime", choices=list(REGIMES), default=DEFAULT.name,
                        help="generator regime of the training data")
    parser.add_argument("--training-seed", type=int, default=1)
    parser.add_argument("--minutes", type=float, default=15.0, help="training all --minutes, per recipe")
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    args, rest = parser.parse_known_args(argv)  # the rest goes to bench_generalisation (--cptac, --shifted-...)

    work = args.work_dir.resolve()
    train = args.train
    if train is None:
        train = work / "train"
        if not (train / "annotations.csv").is_file():
            generate_dataset(train, series=args.series, seed=args.seed, shape=tuple(args.shape),
                             slices=tuple(args.slices), regime=regime_named(args.regime), overwrite=True)
    model_sets = []
    for name in args.recipes:
        folder = work / name
        code = training.main(["all", "--data-root", str(train), "--cache-dir", str(work / "cache"),
                              "--models-dir", str(folder / "models"), "--runs-dir", str(folder / "runs"),
                              "--minutes", f"{args.minutes:g}", "--seed", str(args.training_seed),
                              *RECIPES[name]])
        if code != 0:
            raise SystemExit(f"training all ({name}) failed with exit code {code}")
        models = recorded_checkpoints(folder / "models", ("segmentation", "nodule"))
        model_sets += ["--models", f"{name}={models['segmentation']},{models['nodule']}"]
    return bench_generalisation.main([*model_sets, "--data-root", str(train), "--cache-dir", str(work / "cache"),
                                      *rest])


if __name__ == "__main__":
    sys.exit(main())
