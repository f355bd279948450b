"""Benchmark segmentation training throughput: our task and engine vs a book-style loop.

Both run in this process, on the same synthetic dataset, device, model, batch
size and number of DataLoader workers, after one warm-up epoch (which fills
both caches):

- ours: ``SegmentationTask`` through ``engine.train_one_epoch``: int16 crops cut
  from the memory-mapped volume and mask caches, collated, converted to float
  and augmented per sample on the device;
- book (p2ch13): ``getCtRawCandidate`` memoised in a diskcache ``FanoutCache``
  (pickled float32 7×96×96 CT and mask chunks per nodule, masks built when the
  CT is loaded), a random 64×64 crop converted to float32 per sample, tuple
  batches, one augmentation transform per batch (the book's
  ``SegmentationAugmentation``), a model ending in a sigmoid.

Reported: training samples/s (data + augmentation + forward + backward + step)
and data-only samples/s, with the ratios ours / book.

    python -m bench.bench_segmentation                       # 6 series of 256 x 256, 256 samples/epoch
    python -m bench.bench_segmentation --shape 512 512 --device cuda --num-workers 4
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader

from bench.book import (
    BOOK_SEGMENTATION_BATCH_SIZE,
    BookSegmentationAugmentation,
    BookSegmentationModel,
    BookTrainingDataset,
    book_raw_candidate,
    book_segmentation_epoch,
)
from bench.common import synchronize
from p2ch_luna.data.augment import AugmentConfig
from p2ch_luna.data.luna import ANNOTATIONS_FILE, read_annotations, split_by_series
from p2ch_luna.data.sampling import make_generator, set_sampler_epoch
from p2ch_luna.io.ct import list_series_on_disk
from p2ch_luna.paths import resolve_paths
from p2ch_luna.training import engine
from p2ch_luna.training.config import TrainConfig
from p2ch_luna.training.tasks.base import RunContext
from p2ch_luna.training.tasks.segmentation import SegmentationOptions, SegmentationTask

# --- the book's way ---------------------------------------------------------------------


# --- ours -------------------------------------------------------------------------------


def our_data_epoch(loader) -> tuple[int, float]:
    samples, started = 0, time.perf_counter()
    for batch in loader:
        samples += len(batch["image"])
    return samples, time.perf_counter() - started


def run(args: argparse.Namespace, work: Path) -> None:
    from p2ch_luna.synth.generator import generate_dataset
    from p2ch_luna.training.loop import place_model

    data_root = work / "data"
    started = time.perf_counter()
    generate_dataset(data_root, series=args.series, seed=args.seed, shape=tuple(args.shape),
                     slices=tuple(args.slices), progress=False)
    print(f"dataset: {args.series} series of {args.shape[0]}x{args.shape[1]}, "
          f"{args.slices[0]}-{args.slices[1]} slices ({time.perf_counter() - started:.1f}s to generate)")
    device = torch.device(args.device)
    augment = AugmentConfig.book_segmentation()

    paths = resolve_paths(data_root, work / "cache", work / "models", work / "runs")
    config = TrainConfig(task="segmentation", paths=paths, batch_size=args.batch_size, num_workers=args.num_workers,
                         augment=augment, epoch_size=args.epoch_size, val_stride=args.series + 1,
                         seed=args.seed, task_options=SegmentationOptions())
    task = SegmentationTask(RunContext(config, device))
    model = place_model(task.build_model().model, config, device)  # as training does: channels-last
    optimizer = torch.optim.Adam(model.parameters())
    loader = task.train_loader()

    annotations = read_annotations(data_root / ANNOTATIONS_FILE)
    train_uids, _ = split_by_series(sorted(list_series_on_disk(data_root)), args.series + 1)
    rows = annotations[annotations["series_uid"].isin(train_uids)]
    nodules = [(row.series_uid, (row.center_x, row.center_y, row.center_z)) for row in rows.itertuples()]
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    book_dataset = BookTrainingDataset(nodules, book_raw_candidate(data_root, work / "book_cache", annotations),
                                       len(loader.sampler))
    book_loader = DataLoader(book_dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                             pin_memory=device.type == "cuda")
    book_model = BookSegmentationModel().to(device)
    book_optimizer = torch.optim.Adam(book_model.parameters())
    book_augmentation = BookSegmentationAugmentation(augment)

    def ours(epoch: int, train: bool = True) -> tuple[int, float]:
        set_sampler_epoch(loader, epoch)
        if not train:
            return our_data_epoch(loader)
        result = engine.train_one_epoch(task, model, optimizer, loader, epoch=epoch, device=device,
                                        generator=make_generator(args.seed, epoch, device), show_progress=False)
        synchronize(device)
        return result.samples, result.seconds

    def book(epoch: int, train: bool = True) -> tuple[int, float]:
        return book_segmentation_epoch(book_model, book_augmentation, book_optimizer, book_loader, device, train)

    print(f"{len(nodules)} nodules, {len(loader.sampler)} samples/epoch, batch {args.batch_size}, "
          f"{args.num_workers} workers, device {device}, {torch.get_num_threads()} threads")
    ours(0), book(0)  # warm-up: fills both caches
    # Interleaved, best of the repeats: a load change on a shared machine hits both loops alike.
    rates = {mode: {"ours": 0.0, "book": 0.0} for mode in ("train", "data")}
    for mode in rates:
        for repeat in range(args.repeats):
            for name, function in (("ours", ours), ("book", book)):
                samples, seconds = function(repeat + 1, train=mode == "train")
                rates[mode][name] = max(rates[mode][name], samples / seconds)
    print(f"{'':24s}{'ours':>12s}{'book':>12s}{'ratio':>9s}")
    for mode, label in (("train", "training samples/s"), ("data", "data-only samples/s")):
        ours_rate, book_rate = rates[mode]["ours"], rates[mode]["book"]
        print(f"{label:24s}{ours_rate:12.1f}{book_rate:12.1f}{ours_rate / book_rate:8.2f}x")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=6)
    parser.add_argument("--shape", type=int, nargs=2, default=(256, 256), metavar=("ROWS", "COLS"))
    parser.add_argument("--slices", type=int, nargs=2, default=(48, 64), metavar=("MIN", "MAX"))
    parser.add_argument("--epoch-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=BOOK_SEGMENTATION_BATCH_SIZE)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="epochs timed per loop; the best is reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep data and caches here (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        run(args, args.work_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_segmentation_") as work:
            run(args, Path(work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
