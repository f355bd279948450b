"""The README's main job: synthetic data -> the whole training recipe -> diagnosis -> scores.

``python -m p2ch_luna.demo`` runs every stage through the package's own
commands (the same ``main`` functions as ``python -m p2ch_luna.<command>``):

1. ``synth``: a synthetic LUNA16-format dataset (skipped when the same one exists);
2. ``training all``: the recipe of :mod:`p2ch_luna.training.recipe` -- the CT cache, the
   U-Net segmenter, the nodule classifier on hard negatives mined from that segmenter's
   candidates (calibrated on the validation series), the malignancy classifier fine-tuned
   from it -- at the demo's samples per epoch (or within ``--minutes``);
3. ``diagnose --validation``: the held-out series, with the book's confusion
   table and the LUNA16 FROC/CPM, reports and pictures in ``<work-dir>/diagnosis``;
4. generalisation (:mod:`p2ch_luna.generalisation`): the same models on data training never saw --
   ``--shifted-series`` series of the generator's ``shifted`` regime and, with ``--real-ct``, copies of
   a real CT with nodules implanted and the real CT itself -- summed up in a table at the end
   (reports in ``<work-dir>/generalisation/<set>``).

Everything lives under ``--work-dir`` (default ``data-unversioned/demo``), so the
demo never touches a real LUNA16 folder, cache or model. Each run trains afresh (it
starts a new recipe state in ``<work-dir>/models``). The defaults are sized to finish
in a few minutes on a 2-core CPU (figures: ``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from p2ch_luna import diagnose, training
from p2ch_luna.cli import add_device_argument, make_parser, run_command
from p2ch_luna.errors import LunaError, UsageError
from p2ch_luna.evaluation.summary import ReportSummary, summarise_report, summary_table
from p2ch_luna.generalisation import diagnose_quietly, make_implanted_set, make_shifted_set
from p2ch_luna.paths import default_data_home
from p2ch_luna.synth import generator as synth
from p2ch_luna.synth.parameters import GENERATOR_VERSION
from p2ch_luna.training.recipe import STATE_FILE, recorded_checkpoints

log = logging.getLogger(__name__)

GENERALISATION_DIR = "generalisation"
GENERALISATION_SETS = ("shifted", "implanted", "real CT")
"""The sets of :func:`_generalisation`, in the table's order."""

DATASET_MARKER = "demo-dataset.json"
"""Records the synth arguments next to the generated data, to reuse or regenerate it."""


@dataclass(frozen=True)
class DemoConfig:
    work_dir: Path
    series: int
    seed: int
    shape: tuple[int, int]
    slices: tuple[int, int]
    epoch_sizes: tuple[int, int, int]
    minutes: float | None
    chunk_shape: tuple[int, int, int]
    num_workers: int | None
    device: str
    amp: bool = False
    shifted_series: int = 0
    real_ct: Path | None = None
    implanted_copies: int = 2

    @property
    def data_root(self) -> Path:
        return self.work_dir / "luna"

    @property
    def models_dir(self) -> Path:
        return self.work_dir / "models"

    def folder_args(self) -> list[str]:
        return ["--data-root", str(self.data_root), "--cache-dir", str(self.work_dir / "cache"),
                "--models-dir", str(self.models_dir), "--runs-dir", str(self.work_dir / "runs")]


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("p2ch_luna.demo", "Generate synthetic CTs, train the whole recipe briefly "
                         "(python -m p2ch_luna.training all), diagnose the held-out series and score them.",
                         paths=False)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="folder for the demo's data, cache, models, runs and diagnosis "
                             "(default: data-unversioned/demo)")
    data = parser.add_argument_group("synthetic data")
    data.add_argument("--series", type=int, default=160, help="number of synthetic series (every 10th is held out)")
    data.add_argument("--seed", type=int, default=0, help="seed of the data and of training")
    data.add_argument("--shape", type=int, nargs=2, default=[160, 160], metavar=("ROWS", "COLS"),
                      help="in-plane size of each CT")
    data.add_argument("--slices", type=int, nargs=2, default=[50, 80], metavar=("MIN", "MAX"),
                      help="range of slice counts")
    train = parser.add_argument_group("training")
    train.add_argument("--epoch-sizes", type=int, nargs=3, default=[1280, 4000, 1000], metavar=("SEG", "NOD", "MAL"),
                       help="samples per epoch of the segmenter, nodule and malignancy runs (the recipe's fixed "
                            "epochs: see FIXED_EPOCHS in p2ch_luna/training/recipe.py)")
    train.add_argument("--minutes", type=float, default=None, metavar="N",
                       help="train within this wall-clock budget instead of the fixed epochs (training all "
                            "--minutes)")
    train.add_argument("--chunk-shape", type=int, nargs=3, default=[16, 24, 24], metavar=("I", "R", "C"),
                       help="classifier chunk size in voxels (the book's is 32 48 48; smaller trains faster on a CPU)")
    train.add_argument("--num-workers", type=int, default=None,
                       help="DataLoader worker processes (default: the training command's, 0 on the CPU)")
    add_device_argument(train)
    train.add_argument("--amp", action="store_true",
                       help="train and diagnose in mixed precision (bfloat16 on the CPU and recent GPUs): "
                            "faster on a CPU with AMX, slower on one that emulates bfloat16")
    unseen = parser.add_argument_group("generalisation (data training never saw)")
    unseen.add_argument("--shifted-series", type=int, default=8,
                        help="synthetic series of the generator's 'shifted' regime to diagnose (thicker slices, "
                             "more noise and blur, another HU calibration, vessel calibre and nodule mix; 0: none)")
    unseen.add_argument("--real-ct", type=Path, default=None, metavar="PATH",
                        help="a real chest CT (DICOM series folder, .mhd or NIfTI): diagnose it as it is (how many "
                             "findings a real scan gets) and --implanted-copies copies with nodules implanted into "
                             "its lungs (scored)")
    unseen.add_argument("--implanted-copies", type=int, default=2,
                        help="copies of --real-ct, each with a 6, 10 and 14 mm nodule (isolated, pleural, vascular)")
    return parser


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    work_dir = (args.work_dir or default_data_home() / "demo").expanduser().resolve()
    if args.shifted_series < 0 or args.implanted_copies < 1:
        raise UsageError("--shifted-series must be >= 0 and --implanted-copies >= 1")
    if args.real_ct is not None and not args.real_ct.exists():
        raise UsageError(f"--real-ct {args.real_ct}: no such file or folder")
    return DemoConfig(
        work_dir=work_dir, series=args.series, seed=args.seed, shape=tuple(args.shape),
        slices=tuple(args.slices), epoch_sizes=tuple(args.epoch_sizes), minutes=args.minutes,
        chunk_shape=tuple(args.chunk_shape), num_workers=args.num_workers, device=args.device, amp=args.amp,
        shifted_series=args.shifted_series, implanted_copies=args.implanted_copies,
        real_ct=args.real_ct.expanduser().resolve() if args.real_ct is not None else None,
    )


def _stage(name: str, command: Callable[[Sequence[str]], int], argv: list[str], timings: dict[str, float]) -> None:
    log.info("demo: %s", name)
    start = time.perf_counter()
    code = command(argv)
    timings[name] = time.perf_counter() - start
    if code != 0:
        raise LunaError(f"demo stage {name!r} failed with exit code {code}")
    log.info("demo: %s done in %.0f s", name, timings[name])


def _prepare_dataset(config: DemoConfig, timings: dict[str, float]) -> None:
    wanted = {"series": config.series, "seed": config.seed, "shape": list(config.shape),
              "slices": list(config.slices), "generator": GENERATOR_VERSION}
    marker = config.data_root / DATASET_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        log.info("demo: reusing the synthetic dataset in %s", config.data_root)
        return
    argv = [str(config.data_root), "--series", str(config.series), "--seed", str(config.seed),
            "--shape", *map(str, config.shape), "--slices", *map(str, config.slices), "--overwrite"]
    _stage("synthetic data", synth.main, argv, timings)
    marker.write_text(json.dumps(wanted) + "\n")


def run_demo(config: DemoConfig) -> dict[str, float]:
    """Run every stage; returns the seconds each took."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    folders = config.folder_args()
    amp = ["--amp"] if config.amp else []
    _prepare_dataset(config, timings)
    # A new recipe state, so that the recipe trains afresh rather than keeping an earlier run's models
    # (or refusing other sizes); the earlier checkpoints stay, named by their start time.
    (config.models_dir / STATE_FILE).unlink(missing_ok=True)
    budget = ["--minutes", f"{config.minutes:g}"] if config.minutes is not None else []
    workers = [] if config.num_workers is None else ["--num-workers", str(config.num_workers)]
    _stage("training all", training.main, [
        "all", *folders, "--seed", str(config.seed), "--device", config.device, *amp, *workers, *budget,
        "--epoch-sizes", *map(str, config.epoch_sizes), "--chunk-shape", *map(str, config.chunk_shape)], timings)
    models = recorded_checkpoints(config.models_dir)
    _stage("diagnose", diagnose.main, [
        "--validation", *folders, "--device", config.device, *amp, "--output", str(config.work_dir / "diagnosis"),
        "--segmentation-path", models["segmentation"], "--classification-path", models["nodule"],
        "--malignancy-path", models["malignancy"]], timings)
    _stage("generalisation", lambda _: _generalisation(config, models, amp), [], timings)
    timings["total"] = time.perf_counter() - started
    return timings


def _generalisation(config: DemoConfig, models: dict[str, str], amp: list[str]) -> int:
    """Diagnose the sets training never saw (shifted regime; a real CT, implanted and as it is) into
    ``<work-dir>/generalisation/<set>``."""
    out = config.work_dir / GENERALISATION_DIR
    scratch = config.work_dir / "unseen"
    for folder in (scratch, out):  # made afresh each run (seconds): nothing stale is scored or shown
        shutil.rmtree(folder, ignore_errors=True)
    cache = ["--cache-dir", str(scratch / "cache")]
    sets: dict[str, list[str]] = {}
    if config.shifted_series:
        shifted = make_shifted_set(scratch / "shifted", config.shifted_series, config.seed, config.shape,
                                   config.slices)
        sets["shifted"] = ["--data-root", str(shifted), *cache, "--validation", "--include-train"]
    if config.real_ct is not None:
        try:
            implanted = make_implanted_set(config.real_ct, scratch / "implanted", config.implanted_copies)
            sets["implanted"] = ["--data-root", str(implanted), *cache, "--validation", "--include-train"]
        except LunaError as error:  # e.g. lungs too small for a 14 mm nodule: the rest of the table still comes
            log.warning("demo: no implanted set: %s", error)
        sets["real CT"] = ["--ct", str(config.real_ct)]
    trained = ["--segmentation-path", models["segmentation"], "--classification-path", models["nodule"],
               "--malignancy-path", models["malignancy"], "--device", config.device, *amp]
    for name, arguments in sets.items():
        log.info("demo: generalisation: %s", name)
        diagnose_quietly([*arguments, *trained], out / set_folder(name))
    return 0


def set_folder(name: str) -> str:
    """The folder of a generalisation set's reports (``real CT`` -> ``real-CT``)."""
    return name.replace(" ", "-")


def generalisation_rows(config: DemoConfig) -> list[tuple[str, ReportSummary]]:
    """The held-out series' figures, then each generalisation set's that this run diagnosed."""
    rows = [("held-out", summarise_report(config.work_dir / "diagnosis" / "report.json"))]
    for name in GENERALISATION_SETS:
        report = config.work_dir / GENERALISATION_DIR / set_folder(name) / "report.json"
        if report.is_file():
            rows.append((name, summarise_report(report)))
    return rows


def _body(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    config.work_dir.mkdir(parents=True, exist_ok=True)
    (config.work_dir / "demo-config.json").write_text(
        json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}, indent=2) + "\n")
    timings = run_demo(config)
    rows = generalisation_rows(config)
    print()
    print("demo: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items()))
    print("demo: the trained models on the held-out series and on data training never saw "
          "(findings: nodule probability >= 0.5):")
    print("\n".join(summary_table(rows)))
    held_out = rows[0][1]
    if held_out.cpm is not None:
        print(f"demo: CPM {held_out.cpm:.3f} on the held-out series; outputs in {config.work_dir / 'diagnosis'} "
              f"and {config.work_dir / GENERALISATION_DIR}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_body, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
