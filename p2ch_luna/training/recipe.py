"""The whole recipe in one command: ``python -m p2ch_luna.training all``.

    python -m p2ch_luna.training all --data-root D --cache-dir C --models-dir M --runs-dir R
        [--minutes N] [--num-workers W] [--device DEV] [--seed S] [--amp]

Stages, in order, each through the package's own commands: ``prepcache`` (the CT cache), the U-Net
segmenter (its best epoch chosen by the candidates diagnosis makes of whole validation CTs: nodules found, then
fewer candidates per CT), the nodule classifier (hard negatives mined from that segmenter's own candidates on the
training series, mixed with ``candidates.csv``'s; Platt-calibrated on validation after training), then
the malignancy classifier fine-tuned from it (skipped, with a log line, when the data has no
``annotations_with_malignancy.csv``). ``diagnose --models-dir M`` then picks the models up.

``M/recipe-state.json`` (written atomically after every stage) records each finished stage's best
checkpoint and the settings: a rerun skips the stages whose checkpoint still exists, and a rerun with
other settings into the same folder is refused. With ``--minutes N`` the stages share one wall-clock
budget: what is left after the cache is split by :data:`BUDGET_SHARES`, each training run gets its share
as ``--max-minutes`` (with epochs enough to fill it), and the log says how it was split. Without it,
epochs are fixed and samples per epoch scale with the data (:func:`epoch_sizes`).

``--book`` runs the book's recipe through the same stages, as the baseline ``bench/bench_recipes.py``
measures ours against: its nodule classifier sees ``candidates.csv`` negatives only (no mining), is
chosen by validation ROC AUC alone and keeps its raw softmax (no calibration); its segmenter is chosen by pixel
recall.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from p2ch_luna import prepcache
from p2ch_luna.cli import add_device_argument, make_parser, run_command
from p2ch_luna.data.luna import ANNOTATIONS_FILE, MALIGNANCY_FILE, read_annotations, read_malignancy, split_by_series
from p2ch_luna.errors import DataError, LunaError, UsageError
from p2ch_luna.io.ct import list_series_on_disk
from p2ch_luna.io.run_state import read_run_state, write_run_state
from p2ch_luna.models.catalog import find_latest_checkpoint
from p2ch_luna.paths import paths_from_args

log = logging.getLogger(__name__)

STATE_FILE = "recipe-state.json"
STATE_VERSION = 1
STAGES = ("segmentation", "nodule", "malignancy")
BUDGET_SHARES = {"segmentation": 0.25, "nodule": 0.55, "malignancy": 0.15}
"""Shares of ``--minutes`` (after the cache) per training stage; the rest is slack for start-up and the
calibration that follows the nodule classifier's last epoch."""
BUDGET_EPOCHS = 200
"""Epochs asked for under ``--minutes``: more than any budget fills, so ``--max-minutes`` ends each run."""
FIXED_EPOCHS = {"segmentation": 8, "nodule": 8, "malignancy": 4}
"""Epochs per stage without ``--minutes``."""
CPU_CHUNK_SHAPE = (16, 24, 24)
"""Classifier chunk on the CPU (the demo's; the book's 32x48x48 has 8x the voxels); the book's on CUDA."""
CUDA_CHUNK_SHAPE = (32, 48, 48)
BOOK_SEGMENTATION_ARGS = ("--score-metric", "recall")
"""The segmentation stage under ``--book``: the book's pixel-recall selection (ours: ``--score-metric candidates``,
the candidates diagnosis would make of whole validation CTs)."""
BOOK_NODULE_ARGS = ("--no-calibrate", "--select-by", "roc_auc")
"""The nodule stage under ``--book`` (in place of ``--hard-negatives-from``): the book's selection, no calibration."""


@dataclasses.dataclass(frozen=True)
class RecipeSettings:
    """What a rerun must share with the run it continues (recorded in the state)."""

    data_root: str
    minutes: float | None
    seed: int
    device: str
    chunk_shape: tuple[int, int, int]
    epoch_sizes: tuple[int, int, int] | None
    book: bool = False


def epoch_sizes(n_nodules: int) -> dict[str, int]:
    """Samples per epoch of each stage for ``n_nodules`` annotated training nodules: enough draws for every
    nodule to be seen many times (about 40 segmentation crops, 100 balanced nodule samples and 60
    malignancy samples per nodule), within bounds that keep one epoch between seconds and minutes."""
    def bounded(value: int, low: int, high: int) -> int:
        return int(min(max(value, low), high))

    return {"segmentation": bounded(40 * n_nodules, 640, 8000),
            "nodule": bounded(100 * n_nodules, 2000, 20000),
            "malignancy": bounded(60 * n_nodules, 500, 6000)}


def malignancy_skip_reason(data_root: Path) -> str | None:
    """Why the malignancy stage cannot train on ``data_root`` (no malignancy CSV, or its training series -- every
    10th series on disk is validation -- lack benign or malignant nodules), or None when it can."""
    path = data_root / MALIGNANCY_FILE
    if not path.is_file():
        return f"{data_root} has no {MALIGNANCY_FILE}"
    train, _ = split_by_series(list_series_on_disk(data_root))
    rows = read_malignancy(path)
    flags = rows.loc[rows["series_uid"].isin(train), "is_malignant"]
    if flags.all() or not flags.any():
        return (f"the training series of {path} hold {int(flags.sum())} malignant and {int((~flags).sum())} benign "
                "nodule(s): the balanced malignancy classifier needs both")
    return None


def budget_split(minutes_left: float) -> dict[str, float]:
    """Minutes of each training stage out of ``minutes_left`` (at least a tenth of a minute each)."""
    return {stage: max(0.1, share * minutes_left) for stage, share in BUDGET_SHARES.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("p2ch_luna.training all", "Train the whole recipe on a LUNA16-format folder: cache, "
                         "segmenter, nodule classifier on mined hard negatives (calibrated), malignancy "
                         "classifier. Each stage is resumable.")
    parser.add_argument("--minutes", type=float, default=None, metavar="N",
                        help="wall-clock budget of the whole recipe, shared by the stages (split logged; "
                             f"training stages get {', '.join(f'{k} {round(100 * v)}%%' for k, v in BUDGET_SHARES.items())} "
                             "of what the cache leaves); default: fixed epochs, no limit")
    parser.add_argument("--num-workers", type=int, default=None, metavar="W",
                        help="DataLoader workers of each training run and processes of the cache "
                             "(default: the commands' own: 0 on the CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every training run")
    parser.add_argument("--epoch-sizes", type=int, nargs=3, default=None, metavar=("SEG", "NOD", "MAL"),
                        help="samples per epoch of the segmenter, nodule and malignancy runs (default: scaled "
                             "with the annotated nodules, see epoch_sizes in p2ch_luna/training/recipe.py)")
    parser.add_argument("--chunk-shape", type=int, nargs=3, default=None, metavar=("I", "R", "C"),
                        help="classifier chunk in voxels (default: 16 24 24 on the CPU, the book's 32 48 48 on "
                             "CUDA)")
    parser.add_argument("--book", action="store_true",
                        help="the book's recipe through the same stages, as a baseline (bench/bench_recipes.py): "
                             "the nodule classifier trains on candidates.csv negatives only (no mining), is "
                             "chosen by validation ROC AUC and not calibrated")
    parser.add_argument("--amp", action="store_true",
                        help="train every stage in mixed precision (bfloat16 on the CPU and recent GPUs); not "
                             "part of the settings a rerun must share")
    add_device_argument(parser)
    return parser


def read_state(path: Path, settings: RecipeSettings) -> dict[str, Any]:
    """The state of a former run with the same settings, or a fresh one; other settings: UsageError. ``book``
    is recorded only when set, so states written before it existed still match our recipe."""
    recorded = dataclasses.asdict(settings)
    if not settings.book:
        del recorded["book"]
    return read_run_state(path, recorded, kind="recipe", entries="stages", folder_flag="--models-dir",
                          version=STATE_VERSION)


def recorded_checkpoints(models_dir: Path, required: Sequence[str] = STAGES) -> dict[str, str]:
    """The best checkpoint of each stage a recipe run recorded in ``models_dir``, by stage; LunaError naming the
    state file when one of ``required`` is missing."""
    path = models_dir / STATE_FILE
    stages = json.loads(path.read_text()).get("stages") or {}
    missing = [stage for stage in required if stage not in stages]
    if missing:
        raise LunaError(f"{path} records no {', '.join(missing)} checkpoint")
    return stages


def main(argv: Sequence[str] | None, train: Callable[[Sequence[str]], int]) -> int:
    """Run the recipe; ``train`` is ``python -m p2ch_luna.training``'s ``main``, which each stage calls."""
    return run_command(lambda args: _run(args, train), build_parser(), argv)


def _run(args: argparse.Namespace, train: Callable[[Sequence[str]], int]) -> int:
    started = time.perf_counter()
    if args.minutes is not None and not args.minutes > 0:
        raise UsageError(f"--minutes must be > 0, not {args.minutes}")
    if args.epoch_sizes is not None and min(args.epoch_sizes) < 1:
        raise UsageError(f"--epoch-sizes must be >= 1 each, not {args.epoch_sizes}")
    paths = paths_from_args(args)
    data_root = paths.require_data_root()
    if not (data_root / ANNOTATIONS_FILE).is_file():
        raise DataError(f"{data_root}: no {ANNOTATIONS_FILE}; the recipe trains on annotated nodules")
    on_cuda = args.device.startswith("cuda") or (args.device == "auto" and _cuda_available())
    chunk = tuple(args.chunk_shape or (CUDA_CHUNK_SHAPE if on_cuda else CPU_CHUNK_SHAPE))
    settings = RecipeSettings(str(data_root.resolve()), args.minutes, args.seed, args.device, chunk,
                              tuple(args.epoch_sizes) if args.epoch_sizes else None, args.book)
    paths.models_dir.mkdir(parents=True, exist_ok=True)
    state_path = paths.models_dir / STATE_FILE
    state = read_state(state_path, settings)
    folders = ["--data-root", str(data_root), "--cache-dir", str(paths.cache_dir),
               "--models-dir", str(paths.models_dir), "--runs-dir", str(paths.runs_dir)]
    workers = [] if args.num_workers is None else ["--num-workers", str(args.num_workers)]

    cache_workers = ["--num-workers", str(args.num_workers)] if args.num_workers else []
    _stage("cache", prepcache.main, [*folders, *cache_workers])
    sizes = (dict(zip(STAGES, args.epoch_sizes)) if args.epoch_sizes else
             epoch_sizes(len(read_annotations(data_root / ANNOTATIONS_FILE))))
    minutes: dict[str, float | None] = dict.fromkeys(STAGES)
    if args.minutes is not None:
        left = args.minutes - (time.perf_counter() - started) / 60
        minutes = dict(budget_split(left))
        log.info("recipe: %.1f of %g minutes left after the cache; split %s", left, args.minutes,
                 ", ".join(f"{stage} {value:.1f} min" for stage, value in minutes.items()))
    log.info("recipe: samples per epoch %s", ", ".join(f"{stage} {size}" for stage, size in sizes.items()))

    comment = "book-recipe" if args.book else "recipe"

    def common(stage: str) -> list[str]:
        limit = minutes[stage]
        epochs = FIXED_EPOCHS[stage] if limit is None else BUDGET_EPOCHS
        return [stage, *folders, *workers, "--seed", str(args.seed), "--device", args.device, "--comment", comment,
                "--epochs", str(epochs), "--epoch-size", str(sizes[stage]), *(["--amp"] if args.amp else []),
                *([] if limit is None else ["--max-minutes", f"{limit:.3f}"])]

    chunk_args = ["--chunk-shape", *map(str, chunk)]
    plans: dict[str, Callable[[dict[str, str]], list[str] | None]] = {
        "segmentation": lambda done: [*common("segmentation"), "--batch-size", "16", "--augmented",
                                      *(BOOK_SEGMENTATION_ARGS if args.book else ("--score-metric", "candidates"))],
        "nodule": lambda done: [*common("nodule"), "--batch-size", "32", "--balanced", "--augmented",
                                "--optimizer", "adam", "--lr", "0.001", *chunk_args,
                                *(BOOK_NODULE_ARGS if args.book else ["--hard-negatives-from", done["segmentation"]])],
        "malignancy": lambda done: None if malignancy_skip_reason(data_root) else [
            *common("malignancy"), "--batch-size", "32", "--balanced", "--augmented", "--optimizer", "adam",
            "--lr", "0.001", *chunk_args, "--finetune", done["nodule"], "--finetune-depth", "2"],
    }
    done: dict[str, str] = {}
    for stage in STAGES:
        recorded = state["stages"].get(stage)
        if recorded and Path(recorded).is_file():
            log.info("recipe: %s already trained (%s); skipped", stage, recorded)
            done[stage] = recorded
            continue
        argv = plans[stage](done)
        if argv is None:
            log.info("recipe: %s skipped: %s", stage, malignancy_skip_reason(data_root))
            continue
        _stage(stage, train, argv)
        checkpoint = find_latest_checkpoint(paths.models_dir, stage)
        if checkpoint is None:
            raise LunaError(f"recipe: training {stage} wrote no checkpoint into {paths.models_dir}")
        best = checkpoint.with_name(checkpoint.name.replace(".last.state", ".best.state"))
        checkpoint = best if best.is_file() else checkpoint
        done[stage] = str(checkpoint)
        state["stages"][stage] = done[stage]
        write_run_state(state_path, state)
    log.info("recipe: done in %.1f min; diagnose with --models-dir %s", (time.perf_counter() - started) / 60,
             paths.models_dir)
    for stage, checkpoint in done.items():
        print(f"{stage}: {checkpoint}")
    return 0


def _stage(name: str, command: Callable[[Sequence[str]], int], argv: list[str]) -> None:
    log.info("recipe: %s", name)
    started = time.perf_counter()
    code = command(argv)
    if code != 0:
        raise LunaError(f"recipe: stage {name!r} failed with exit code {code}")
    log.info("recipe: %s done in %.0f s", name, time.perf_counter() - started)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
