"""LUNA16's protocol end to end: for each fold K, train on the other nine subsets, diagnose ``subsetK``,
then score the ten held-out ``findings.csv`` together as one FROC/CPM.

    python -m p2ch_luna.cv --work-dir DIR --data-root LUNA16 [--folds 0-9] [--train-segmentation]
        [--train-malignancy] [--epochs N --epoch-size N] [--launcher "torchrun --nproc-per-node 4"]

Each fold's models, runs and diagnosis live in ``DIR/fold<K>/``. Stages run through the package's own
commands: in this process (their ``main``), or with ``--launcher`` as a subprocess
``<launcher> -m p2ch_luna.training ...`` (e.g. torchrun, which runs training and diagnosis on every
rank). ``DIR/cv-state.json`` (written atomically after every stage) records each fold's checkpoints
and whether its diagnosis is complete: a rerun skips the completed folds and, inside an unfinished
fold, the trained stages whose checkpoint still exists. The state also records the settings: a rerun
with other settings into the same folder is refused (its folds would not be comparable).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from p2ch_luna import diagnose, evaluate, training
from p2ch_luna.cli import add_device_argument, make_parser, non_negative_int, run_command
from p2ch_luna.data.folds import LUNA16_FOLDS, fold_series
from p2ch_luna.data.luna import ANNOTATIONS_FILE, EXCLUDED_FILE
from p2ch_luna.diagnose.report import FINDINGS_FILE
from p2ch_luna.errors import LunaError, UsageError
from p2ch_luna.io.atomic import atomic_write_text
from p2ch_luna.io.ct import list_series_on_disk
from p2ch_luna.io.run_state import read_run_state, write_run_state
from p2ch_luna.metrics.froc import DEFAULT_BOOTSTRAP_SAMPLES
from p2ch_luna.models.catalog import find_latest_checkpoint
from p2ch_luna.paths import resolve_paths

log = logging.getLogger(__name__)

STATE_FILE = "cv-state.json"
SERIES_LIST_FILE = "series.csv"
"""Each fold's held-out series (one UID a line), the scans its FROC averages false positives over."""
EVALUATION_FOLDER = "evaluation"
STATE_VERSION = 1
TASKS = ("nodule", "segmentation", "malignancy")


@dataclass(frozen=True)
class CvSettings:
    """What makes two runs' folds comparable; recorded in the state and checked on resume."""

    data_root: str
    folds: tuple[int, ...]
    train_segmentation: bool
    train_malignancy: bool
    segmentation_path: str | None
    malignancy_path: str | None
    epochs: int | None
    epoch_size: int | None
    train_args: tuple[str, ...]
    task_args: dict[str, tuple[str, ...]]
    """Each task's own further training options (``--nodule-args`` ...), after ``train_args``."""
    diagnose_args: tuple[str, ...]
    seed: int
    device: str


def parse_folds(text: str) -> tuple[int, ...]:
    """``0-9``, ``3`` or ``0,2,5-7`` -> sorted distinct folds; argparse type of ``--folds``."""
    folds: set[int] = set()
    try:
        for piece in text.split(","):
            first, _, last = piece.strip().partition("-")
            folds.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of folds like 0-9 or 0,3,5-7: {text!r}") from None
    if not folds or min(folds) < 0 or max(folds) >= LUNA16_FOLDS:
        raise argparse.ArgumentTypeError(f"folds are 0..{LUNA16_FOLDS - 1}: {text!r}")
    return tuple(sorted(folds))


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("p2ch_luna.cv", "LUNA16 ten-fold cross-validation: per fold train on nine subsets and "
                         "diagnose the tenth, then one FROC/CPM over all held-out findings. Resumable.", paths=False)
    parser.add_argument("--work-dir", type=Path, required=True,
                        help=f"folder for each fold's models, runs and diagnosis (fold<K>/), {STATE_FILE} and "
                             f"the merged {EVALUATION_FOLDER}/")
    parser.add_argument("--data-root", dest="data_root", metavar="DIR", default=None,
                        help="LUNA16 folder holding subset0/ .. subset9/ and the CSVs (env P2CH_DATA_ROOT)")
    parser.add_argument("--cache-dir", dest="cache_dir", metavar="DIR", default=None,
                        help="CT cache shared by every fold (env P2CH_CACHE_DIR)")
    parser.add_argument("--folds", type=parse_folds, default=tuple(range(LUNA16_FOLDS)), metavar="LIST",
                        help="the folds to run, e.g. 0-9 (default), 3 or 0,2,5-7")
    stages = parser.add_argument_group("stages")
    stages.add_argument("--train-segmentation", action="store_true",
                        help="train a segmenter per fold (else every fold uses --segmentation-path)")
    stages.add_argument("--segmentation-path", type=Path, metavar="FILE",
                        help="the segmentation checkpoint every fold diagnoses with (without --train-segmentation)")
    stages.add_argument("--train-malignancy", action="store_true",
                        help="train a malignancy classifier per fold, fine-tuned from that fold's nodule classifier")
    stages.add_argument("--malignancy-path", type=Path, metavar="FILE",
                        help="a malignancy checkpoint every fold uses (optional; without --train-malignancy)")
    train = parser.add_argument_group("passed to every training run")
    train.add_argument("--epochs", type=int, default=None, help="training --epochs (default: the command's)")
    train.add_argument("--epoch-size", type=int, default=None, help="training --epoch-size: samples per epoch")
    train.add_argument("--seed", type=int, default=0, help="training --seed")
    add_device_argument(train)
    train.add_argument("--train-args", default="", metavar="ARGS",
                       help="further options of every training run, one shell-quoted string "
                            "(e.g. \"--batch-size 64 --amp\")")
    for task in TASKS:
        train.add_argument(f"--{task}-args", default="", metavar="ARGS",
                           help=f"further options of the {task} training only (after --train-args)")
    parser.add_argument("--diagnose-args", default="", metavar="ARGS",
                        help="further diagnose options, one shell-quoted string")
    parser.add_argument("--launcher", default="", metavar="PREFIX",
                        help="run training and diagnosis as `PREFIX -m p2ch_luna.<command> ...` subprocesses, "
                             "e.g. \"torchrun --nproc-per-node 4\" (default: in this process)")
    parser.add_argument("--bootstrap", type=non_negative_int, default=DEFAULT_BOOTSTRAP_SAMPLES,
                        help="bootstrap samples of the merged CPM's confidence interval")
    return parser


def settings_from_args(args: argparse.Namespace, data_root: Path) -> CvSettings:
    if args.train_segmentation == (args.segmentation_path is not None):
        raise UsageError("give exactly one of --train-segmentation or --segmentation-path "
                         "(diagnosis needs a segmenter)")
    if args.train_malignancy and args.malignancy_path is not None:
        raise UsageError("--train-malignancy and --malignancy-path exclude each other")
    for flag in ("epochs", "epoch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, not {value}")
    try:
        train_args, diagnose_args = shlex.split(args.train_args), shlex.split(args.diagnose_args)
        task_args = {task: tuple(shlex.split(getattr(args, f"{task}_args"))) for task in TASKS}
    except ValueError as error:
        raise UsageError(f"--train-args, --diagnose-args or a --TASK-args: {error}") from None

    def resolved(path: Path | None) -> str | None:
        return None if path is None else str(path.expanduser().resolve())

    return CvSettings(str(data_root), tuple(args.folds), args.train_segmentation, args.train_malignancy,
                      resolved(args.segmentation_path), resolved(args.malignancy_path), args.epochs,
                      args.epoch_size, tuple(train_args), task_args, tuple(diagnose_args), args.seed, args.device)


def read_state(path: Path, settings: CvSettings) -> dict[str, Any]:
    """The state of a former run with the same settings (its folds may differ), or a fresh one; other settings:
    UsageError."""
    return read_run_state(path, asdict(settings), kind="cv", entries="folds", folder_flag="--work-dir",
                          version=STATE_VERSION, free_keys=("folds",))


def fold_complete(record: dict[str, Any] | None) -> bool:
    """A fold is done when its state says so and its findings and series list are still on disk."""
    return bool(record and record.get("complete") and Path(record.get("findings", "")).is_file()
                and Path(record.get("series_list", "")).is_file())


class StageRunner:
    """Runs a package command in this process, or under ``--launcher`` as a subprocess."""

    def __init__(self, launcher: str) -> None:
        self.launcher = shlex.split(launcher)

    def __call__(self, name: str, module: str, command: Callable[[Sequence[str]], int] | None,
                 argv: list[str]) -> float:
        """Run ``module`` (``command`` is its ``main``, for in-process runs); returns the seconds it took."""
        log.info("cv: %s", name)
        started = time.perf_counter()
        if self.launcher:
            try:
                code = subprocess.call([*self.launcher, "-m", module, *argv])
            except OSError as error:
                raise UsageError(f"--launcher {shlex.join(self.launcher)!r} could not run: {error}") from None
        elif command is not None:
            code = command(argv)
        else:
            raise ValueError(f"stage {name!r}: no command to run in this process")
        if code != 0:
            raise LunaError(f"cv stage {name!r} failed with exit code {code}")
        seconds = time.perf_counter() - started
        log.info("cv: %s done in %.0f s", name, seconds)
        return seconds


def _train(run_stage: StageRunner, settings: CvSettings, fold: int, task: str, folders: list[str],
           extra: list[str]) -> tuple[str, float]:
    argv = [task, "--fold", str(fold), "--seed", str(settings.seed), "--device", settings.device,
            "--comment", f"cv-fold{fold}", *folders, *extra]
    argv += ["--epochs", str(settings.epochs)] if settings.epochs is not None else []
    argv += ["--epoch-size", str(settings.epoch_size)] if settings.epoch_size is not None else []
    seconds = run_stage(f"fold {fold}: train {task}", "p2ch_luna.training", training.main,
                        [*argv, *settings.train_args, *settings.task_args[task]])
    models_dir = Path(folders[folders.index("--models-dir") + 1])
    # The run's best checkpoint (names start with the task and the run's time); the newest by contents
    # can be the .last.state of the same epoch.
    best = sorted(models_dir.glob(f"{task}_*_cv-fold{fold}.best.state"))
    checkpoint = best[-1] if best else find_latest_checkpoint(models_dir, task)
    if checkpoint is None:
        raise LunaError(f"cv fold {fold}: training {task} wrote no checkpoint")
    return str(checkpoint), seconds


def run_fold(run_stage: StageRunner, settings: CvSettings, cache_dir: Path, work_dir: Path, fold: int,
             record: dict[str, Any], save: Callable[[], None]) -> None:
    """Train what the fold needs (skipping stages whose checkpoint the state holds), diagnose ``subset<fold>``."""
    data_root = Path(settings.data_root)
    fold_dir = work_dir / f"fold{fold}"
    folders = ["--data-root", str(data_root), "--cache-dir", str(cache_dir),
               "--models-dir", str(fold_dir / "models"), "--runs-dir", str(fold_dir / "runs")]
    held_out = fold_series(list_series_on_disk(data_root), data_root, fold)
    series_list = fold_dir / SERIES_LIST_FILE
    atomic_write_text(series_list, "".join(f"{uid}\n" for uid in held_out))
    record["series_list"] = str(series_list)
    timings = record.setdefault("seconds", {})
    tasks = ["nodule", *(["segmentation"] if settings.train_segmentation else []),
             *(["malignancy"] if settings.train_malignancy else [])]
    for task in tasks:
        if Path(record.get(task, "")).is_file():
            log.info("cv: fold %d: %s already trained (%s)", fold, task, record[task])
            continue
        extra = ["--finetune", record["nodule"]] if task == "malignancy" else []
        record[task], timings[f"train {task}"] = _train(run_stage, settings, fold, task, folders, extra)
        save()
    segmentation = record.get("segmentation") or settings.segmentation_path
    malignancy = record.get("malignancy") or settings.malignancy_path
    diagnosis = fold_dir / "diagnosis"
    argv = ["--fold", str(fold), *folders, "--device", settings.device, "--output", str(diagnosis),
            "--classification-path", record["nodule"], "--segmentation-path", str(segmentation),
            *(["--malignancy-path", str(malignancy)] if malignancy else []), *settings.diagnose_args]
    timings["diagnose"] = run_stage(f"fold {fold}: diagnose subset{fold}", "p2ch_luna.diagnose", diagnose.main, argv)
    findings = diagnosis / FINDINGS_FILE
    if not findings.is_file():
        raise LunaError(f"cv fold {fold}: diagnose wrote no {findings}")
    record.update(findings=str(findings), complete=True)
    save()


def evaluation_argv(state: dict[str, Any], folds: Sequence[int], data_root: Path, output: Path,
                    bootstrap: int) -> list[str]:
    """``evaluate``'s arguments for the merged findings of ``folds`` (each complete in ``state``)."""
    records = [state["folds"][str(fold)] for fold in folds]
    argv = [*(record["findings"] for record in records), "--annotations", str(data_root / ANNOTATIONS_FILE),
            "--bootstrap", str(bootstrap), "--output", str(output)]
    for record in records:
        argv += ["--series-list", record["series_list"]]
    if (data_root / EXCLUDED_FILE).is_file():
        argv += ["--annotations-excluded", str(data_root / EXCLUDED_FILE)]
    return argv


def run_cv(args: argparse.Namespace) -> int:
    paths = resolve_paths(data_root=args.data_root, cache_dir=args.cache_dir)
    data_root = paths.require_data_root()
    settings = settings_from_args(args, data_root)
    work_dir = args.work_dir.expanduser().resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    state_path = work_dir / STATE_FILE
    state = read_state(state_path, settings)
    run_stage = StageRunner(args.launcher)
    for fold in settings.folds:
        record = state["folds"].setdefault(str(fold), {})
        if fold_complete(record):
            log.info("cv: fold %d complete (%s), skipped", fold, record["findings"])
            continue
        record["complete"] = False
        run_fold(run_stage, settings, paths.cache_dir, work_dir, fold, record,
                 lambda: write_run_state(state_path, state))
    output = work_dir / EVALUATION_FOLDER
    # In this process even under --launcher: scoring is one small job, not one per rank.
    StageRunner("")("evaluate the merged folds", "p2ch_luna.evaluate", evaluate.main,
                    evaluation_argv(state, settings.folds, data_root, output, args.bootstrap))
    log.info("cv: %d folds scored together in %s", len(settings.folds), output)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(run_cv, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
