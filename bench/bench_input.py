"""A training input path alone: samples/s that our loader delivers to the device, with and
without the on-device augmentation, for several DataLoader worker counts, through the plain
DataLoader and through the batch ring (``--batch-ring``), with their ratio; the classifier's
(``--task nodule``) or the segmenter's (``--task segmentation``).

    python -m bench.bench_input [--task nodule] [--device cuda] [--workers 4 8 16] [--batch-size 256] [--seconds 5]

Both loaders first show that they give the same samples. Compare with
``bench_classifier_step.py`` (the model step alone): training runs at roughly
the slower of the two.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from bench.common import nodule_data, step_rate
from p2ch_luna.data.augment import AugmentConfig
from p2ch_luna.data.sampling import make_generator
from p2ch_luna.training.config import TrainConfig
from p2ch_luna.training.engine import move_to_device
from p2ch_luna.training.tasks import RunContext
from p2ch_luna.training.tasks.classification import NoduleTask
from p2ch_luna.training.tasks.segmentation import SegmentationOptions, SegmentationTask

WARMUP_BATCHES = 8
TASKS = {"nodule": NoduleTask, "segmentation": SegmentationTask}


def input_rate(config: TrainConfig, device: torch.device, augment: bool, seconds: float) -> float:
    """Samples/s of loader -> device -> the training step's model inputs (float, channels-last for the classifier;
    augmented when ``augment``)."""
    task = TASKS[config.task](RunContext(config, device))
    generator = make_generator(config.seed, 1, device)
    iterator = iter(task.train_loader())

    def step() -> int:
        batch = move_to_device(next(iterator), device)
        task.model_inputs(batch, augment, generator)  # what the training step does before the model
        return len(batch["image"])

    return step_rate(step, seconds, device, WARMUP_BATCHES)


def check_same_batches(config: TrainConfig, device: torch.device, batches: int = 3) -> None:
    """Raise unless the plain loader and the batch ring give the same first batches."""
    def first(batch_ring: bool) -> list[dict]:
        task = TASKS[config.task](RunContext(dataclasses.replace(config, batch_ring=batch_ring), device))
        iterator = iter(task.train_loader())
        return [move_to_device(next(iterator), device) for _ in range(batches)]

    for plain, ring in zip(first(False), first(True)):
        if not all(torch.equal(plain[key], ring[key]) for key in plain if isinstance(plain[key], torch.Tensor)):
            raise RuntimeError("the batch ring gave other samples than the plain loader")


def input_arguments(doc: str, workers: list[int]) -> argparse.ArgumentParser:
    """The options of the input-path benches: device, worker counts, batch size, timed seconds, series."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, nargs="+", default=workers)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--series", type=int, default=12)
    return parser


def task_data(task: str, work: Path, series: int, batch_size: int, device: torch.device) -> TrainConfig:
    """``nodule_data``, or for the segmenter the same series with their volumes and masks cached and a
    config with the book's segmentation augmentation."""
    base = nodule_data(work, series, batch_size, device)
    if task == "nodule":
        return base
    segmentation = TrainConfig(task="segmentation", paths=base.paths, batch_size=batch_size,
                               augment=AugmentConfig.book_segmentation(), epoch_size=base.epoch_size, seed=0,
                               task_options=SegmentationOptions())
    SegmentationTask(RunContext(segmentation, device)).train_loader()  # builds and caches the masks
    return segmentation


def main(argv: Sequence[str] | None = None) -> int:
    parser = input_arguments(__doc__, [4, 8, 16])
    parser.add_argument("--task", choices=sorted(TASKS), default="nodule",
                        help="whose input path: the classifier's 1x32x48x48 chunks or the segmenter's 7x64x64 crops")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_input_") as folder:
        base = task_data(args.task, Path(folder), args.series, args.batch_size, device)
        check_same_batches(dataclasses.replace(base, num_workers=min(args.workers)), device)
        for workers in args.workers:
            for augment in (False, True):
                rates = [input_rate(dataclasses.replace(base, num_workers=workers, batch_ring=ring), device, augment,
                                    args.seconds) for ring in (False, True)]
                label = "loader, copy, float, augmentation" if augment else "loader, copy, float"
                print(f"{workers:3d} workers  {label:<36s} plain {rates[0]:8.0f} samples/s   batch ring "
                      f"{rates[1]:8.0f} samples/s   ring / plain {rates[1] / rates[0]:5.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
