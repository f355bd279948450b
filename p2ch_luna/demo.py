"""The README's main job: synthetic data -> cache -> three models -> diagnosis -> scores.

``python -m p2ch_luna.demo`` runs every stage through the package's own
commands (the same ``main`` functions as ``python -m p2ch_luna.<command>``):

1. ``synth``: a synthetic LUNA16-format dataset (skipped when the same one exists);
2. ``prepcache``: the CT cache;
3. ``training nodule``: the nodule classifier, balanced and augmented;
4. ``training segmentation``: the U-Net segmenter;
5. ``training malignancy``: fine-tuned from the nodule classifier;
6. ``diagnose --validation``: the held-out series, with the book's confusion
   table and the LUNA16 FROC/CPM, reports and pictures in ``<work-dir>/diagnosis``.

Everything lives under ``--work-dir`` (default ``data-unversioned/demo``), so the
demo never touches a real LUNA16 folder, cache or model. The defaults are sized
to finish in a few minutes on a 2-core CPU (figures: ``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from p2ch_luna import diagnose, prepcache, training
from p2ch_luna.cli import add_device_argument, make_parser, run_command
from p2ch_luna.errors import LunaError
from p2ch_luna.models.catalog import find_latest_checkpoint
from p2ch_luna.paths import default_data_home
from p2ch_luna.synth import generator as synth
from p2ch_luna.synth.parameters import GENERATOR_VERSION

log = logging.getLogger(__name__)

DATASET_MARKER = "demo-dataset.json"
"""Records the synth arguments next to the generated data, to reuse or regenerate it."""


@dataclass(frozen=True)
class DemoConfig:
    work_dir: Path
    series: int
    seed: int
    shape: tuple[int, int]
    slices: tuple[int, int]
    nodule_epochs: int
    nodule_epoch_size: int
    segmentation_epochs: int
    segmentation_epoch_size: int
    malignancy_epochs: int
    malignancy_epoch_size: int
    chunk_shape: tuple[int, int, int]
    batch_size: int
    num_workers: int | None
    device: str
    amp: bool = False

    @property
    def data_root(self) -> Path:
        return self.work_dir / "luna"

    def folder_args(self) -> list[str]:
        return ["--data-root", str(self.data_root), "--cache-dir", str(self.work_dir / "cache"),
                "--models-dir", str(self.work_dir / "models"), "--runs-dir", str(self.work_dir / "runs")]


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("p2ch_luna.demo", "Generate synthetic CTs, train the three models briefly, "
                         "diagnose the held-out series and score them.", paths=False)
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
    train.add_argument("--nodule-epochs", type=int, default=6, help="nodule classifier epochs")
    train.add_argument("--nodule-epoch-size", type=int, default=4000, help="nodule samples per epoch")
    train.add_argument("--segmentation-epochs", type=int, default=4, help="segmenter epochs")
    train.add_argument("--segmentation-epoch-size", type=int, default=1280, help="segmentation samples per epoch")
    train.add_argument("--malignancy-epochs", type=int, default=4, help="malignancy classifier epochs")
    train.add_argument("--malignancy-epoch-size", type=int, default=1000, help="malignancy samples per epoch")
    train.add_argument("--chunk-shape", type=int, nargs=3, default=[16, 24, 24], metavar=("I", "R", "C"),
                       help="classifier chunk size in voxels (the book's is 32 48 48; smaller trains faster on a CPU)")
    train.add_argument("--batch-size", type=int, default=32, help="classifier batch size")
    train.add_argument("--num-workers", type=int, default=None,
                       help="DataLoader worker processes (default: the training command's, 0 on the CPU)")
    add_device_argument(train)
    train.add_argument("--amp", action="store_true",
                       help="train and diagnose in mixed precision (bfloat16 on the CPU and recent GPUs): "
                            "faster on a CPU with AMX, slower on one that emulates bfloat16")
    return parser


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    work_dir = (args.work_dir or default_data_home() / "demo").expanduser().resolve()
    return DemoConfig(
        work_dir=work_dir, series=args.series, seed=args.seed, shape=tuple(args.shape),
        slices=tuple(args.slices), nodule_epochs=args.nodule_epochs,
        nodule_epoch_size=args.nodule_epoch_size, segmentation_epochs=args.segmentation_epochs,
        segmentation_epoch_size=args.segmentation_epoch_size, malignancy_epochs=args.malignancy_epochs,
        malignancy_epoch_size=args.malignancy_epoch_size, chunk_shape=tuple(args.chunk_shape),
        batch_size=args.batch_size,
        num_workers=args.num_workers, device=args.device, amp=args.amp,
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


def _latest(config: DemoConfig, task: str) -> Path:
    path = find_latest_checkpoint(config.work_dir / "models", task)
    if path is None:
        raise LunaError(f"demo: training {task} wrote no best checkpoint")
    return path


def run_demo(config: DemoConfig) -> dict[str, float]:
    """Run every stage; returns the seconds each took."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    folders = config.folder_args()
    workers = [] if config.num_workers is None else ["--num-workers", str(config.num_workers)]
    amp = ["--amp"] if config.amp else []
    common = ["--seed", str(config.seed), "--device", config.device, *amp, *workers, "--comment", "demo", *folders]
    chunk = [str(n) for n in config.chunk_shape]
    _prepare_dataset(config, timings)
    _stage("prepcache", prepcache.main, [*folders], timings)
    _stage("train nodule", training.main, [
        "nodule", *common, "--epochs", str(config.nodule_epochs), "--epoch-size", str(config.nodule_epoch_size),
        "--batch-size", str(config.batch_size), "--balanced", "--augmented", "--optimizer", "adam",
        "--lr", "0.001", "--chunk-shape", *chunk], timings)
    _stage("train segmentation", training.main, [
        "segmentation", *common, "--epochs", str(config.segmentation_epochs),
        "--epoch-size", str(config.segmentation_epoch_size), "--batch-size", "16", "--augmented"], timings)
    _stage("train malignancy", training.main, [
        "malignancy", *common, "--epochs", str(config.malignancy_epochs),
        "--epoch-size", str(config.malignancy_epoch_size), "--batch-size", str(config.batch_size),
        "--balanced", "--augmented", "--finetune", str(_latest(config, "nodule")), "--finetune-depth", "2",
        "--optimizer", "adam", "--lr", "0.001", "--chunk-shape", *chunk], timings)
    _stage("diagnose", diagnose.main, [
        "--validation", *folders, "--device", config.device, *amp, "--output", str(config.work_dir / "diagnosis"),
        "--segmentation-path", str(_latest(config, "segmentation")),
        "--classification-path", str(_latest(config, "nodule")),
        "--malignancy-path", str(_latest(config, "malignancy"))], timings)
    timings["total"] = time.perf_counter() - started
    return timings


def _body(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    config.work_dir.mkdir(parents=True, exist_ok=True)
    (config.work_dir / "demo-config.json").write_text(
        json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}, indent=2) + "\n")
    timings = run_demo(config)
    report = json.loads((config.work_dir / "diagnosis" / "report.json").read_text())
    froc = report.get("froc") or {}
    print()
    print("demo: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items()))
    if froc:
        print(f"demo: CPM {froc.get('cpm', float('nan')):.3f} on the held-out series; "
              f"outputs in {config.work_dir / 'diagnosis'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_body, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
