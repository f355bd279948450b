"""The classifier's input path alone: samples/s that our loader delivers to the device, with and
without the on-device augmentation, for several DataLoader worker counts.

    python bench/bench_input.py [--device cuda] [--workers 4 8 16] [--batch-size 256] [--seconds 5]

Compare with ``bench_classifier_step.py`` (the model step alone): training
runs at roughly the slower of the two.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_training import step_rate  # noqa: E402
from p2ch_luna.augment import AugmentConfig, augment_batch_3d  # noqa: E402
from p2ch_luna.config import TrainConfig  # noqa: E402
from p2ch_luna.engine import move_to_device  # noqa: E402
from p2ch_luna.paths import resolve_paths  # noqa: E402
from p2ch_luna.sampling import make_generator  # noqa: E402
from p2ch_luna.synth import generate_dataset  # noqa: E402
from p2ch_luna.tasks import RunContext  # noqa: E402
from p2ch_luna.tasks.base import to_memory_format  # noqa: E402
from p2ch_luna.tasks.classification import NoduleTask  # noqa: E402

WARMUP_BATCHES = 8


def input_rate(config: TrainConfig, device: torch.device, augment: bool, seconds: float) -> float:
    """Samples/s of loader -> device (-> float, augmentation, channels-last when ``augment``)."""
    task = NoduleTask(RunContext(config, device))
    loader = task.train_loader()
    generator = make_generator(config.seed, 1, device)
    iterator = iter(loader)

    def step() -> int:
        batch = move_to_device(next(iterator), device)
        if augment:
            images = augment_batch_3d(batch["image"].to(torch.float32), config.augment, generator)
            to_memory_format(images, config.channels_last)
        return len(batch["label"])

    return step_rate(step, seconds, device, WARMUP_BATCHES)


def input_arguments(doc: str, workers: list[int]) -> argparse.ArgumentParser:
    """The options of the input-path benches: device, worker counts, batch size, timed seconds, series."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, nargs="+", default=workers)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--series", type=int, default=12)
    return parser


def nodule_data(work: Path, series: int, batch_size: int, device: torch.device) -> TrainConfig:
    """Synthetic series under ``work`` with their volumes cached; a balanced, augmented nodule config for them."""
    generate_dataset(work / "luna", series=series, seed=0, shape=(192, 192), slices=(64, 96), progress=False)
    paths = resolve_paths(work / "luna", work / "cache", work / "models", work / "runs")
    base = TrainConfig(task="nodule", paths=paths, batch_size=batch_size, ratio=1,
                       augment=AugmentConfig.book(), epoch_size=2_000_000, seed=0)
    dataset = NoduleTask(RunContext(base, device)).datasets()[0]
    for series_uid in sorted(set(dataset.series_uids)):
        dataset.cache.ensure_volume(series_uid)
    print(f"torch {torch.__version__} on {device}, batch {batch_size}", flush=True)
    return base


def main(argv: Sequence[str] | None = None) -> int:
    args = input_arguments(__doc__, [4, 8, 16]).parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_input_") as folder:
        base = nodule_data(Path(folder), args.series, args.batch_size, device)
        for workers in args.workers:
            config = dataclasses.replace(base, num_workers=workers)
            for augment in (False, True):
                rate = input_rate(config, device, augment, args.seconds)
                label = "loader + copy + augmentation" if augment else "loader + copy"
                print(f"{workers:3d} workers  {label:<30s} {rate:10.0f} samples/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
