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

    python bench/bench_segmentation.py                       # 6 series of 256 x 256, 256 samples/epoch
    python bench/bench_segmentation.py --shape 512 512 --device cuda --num-workers 4
"""

from __future__ import annotations

import argparse
import functools
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from diskcache import FanoutCache
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bench_training import synchronize
from p2ch_luna.training import engine
from p2ch_luna.data.augment import AugmentConfig
from p2ch_luna.training.config import TrainConfig
from p2ch_luna.io.ct import HU_MAX, HU_MIN, find_series_path, list_series_on_disk, load_ct
from p2ch_luna.geometry import chunk_bounds
from p2ch_luna.training.losses import segmentation_loss
from p2ch_luna.data.luna import ANNOTATIONS_FILE, read_annotations, split_by_series
from p2ch_luna.data.masks import grown_box_mask
from p2ch_luna.models.unet import UNetWrapper
from p2ch_luna.paths import resolve_paths
from p2ch_luna.data.sampling import make_generator, set_sampler_epoch
from p2ch_luna.data.segmentation import CONTEXT_SLICES, TRAIN_CROP, TRAIN_WINDOW
from p2ch_luna.training.tasks.base import RunContext
from p2ch_luna.training.tasks.segmentation import SegmentationOptions, SegmentationTask

BOOK_BATCH_SIZE = 16
BOOK_SHARDS = 64
BOOK_CHUNK_WIDTH = (2 * CONTEXT_SLICES + 1, TRAIN_WINDOW, TRAIN_WINDOW)


# --- the book's way ---------------------------------------------------------------------


def book_raw_candidate(data_root: Path, cache_dir: Path, annotations: pd.DataFrame) -> Callable:
    """The book's memoised ``getCtRawCandidate(series_uid, center_xyz, width_irc)`` -> (ct, mask, irc)."""
    cache = FanoutCache(str(cache_dir), shards=BOOK_SHARDS, timeout=1)

    @functools.lru_cache(1, typed=True)
    def get_ct(series_uid: str):
        ct = load_ct(find_series_path(data_root, series_uid))
        hu = ct.hu.astype(np.float32)
        rows = annotations[annotations["series_uid"] == series_uid]
        centers = ct.geometry.xyz_to_irc(rows[["center_x", "center_y", "center_z"]].to_numpy(float)).reshape(-1, 3)
        return hu, grown_box_mask(hu, centers), ct.geometry

    @cache.memoize(typed=True)
    def get_raw_candidate(series_uid: str, center_xyz: tuple, width_irc: tuple):
        hu, mask, geometry = get_ct(series_uid)
        center_irc = geometry.xyz_to_irc(center_xyz)
        window = tuple(slice(start, end) for start, end in chunk_bounds(center_irc, width_irc, hu.shape))
        ct_chunk = np.array(hu[window])
        ct_chunk.clip(HU_MIN, HU_MAX, ct_chunk)
        return ct_chunk, np.array(mask[window]), center_irc

    return get_raw_candidate


class BookTrainingDataset(Dataset):
    """The book's ``TrainingLuna2dSegmentationDataset``: a random 64×64 crop of each nodule's 7×96×96 chunk."""

    def __init__(self, nodules: list[tuple[str, tuple[float, float, float]]], get_raw_candidate, size: int) -> None:
        self.nodules = nodules
        self.get_raw_candidate = get_raw_candidate
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        series_uid, center_xyz = self.nodules[index % len(self.nodules)]
        ct_a, pos_a, center_irc = self.get_raw_candidate(series_uid, center_xyz, BOOK_CHUNK_WIDTH)
        pos_a = pos_a[CONTEXT_SLICES:CONTEXT_SLICES + 1]
        limit = TRAIN_WINDOW - TRAIN_CROP
        row, col = random.randrange(0, limit), random.randrange(0, limit)
        ct_t = torch.from_numpy(ct_a[:, row:row + TRAIN_CROP, col:col + TRAIN_CROP]).to(torch.float32)
        pos_t = torch.from_numpy(pos_a[:, row:row + TRAIN_CROP, col:col + TRAIN_CROP]).to(torch.long)
        return ct_t, pos_t, series_uid, int(center_irc[0])


class BookSegmentationAugmentation(nn.Module):
    """The book's ``SegmentationAugmentation``: one random transform for the whole batch."""

    def __init__(self, config: AugmentConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, input_g: torch.Tensor, label_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        transform = self._transform().expand(input_g.shape[0], -1, -1).to(input_g.device, torch.float32)
        grid = F.affine_grid(transform[:, :2], input_g.size(), align_corners=False)
        input_g = F.grid_sample(input_g, grid, padding_mode="border", align_corners=False)
        label_g = F.grid_sample(label_g.to(torch.float32), grid, padding_mode="border", align_corners=False)
        if self.config.noise:
            input_g = input_g + torch.randn_like(input_g) * self.config.noise
        return input_g, label_g > 0.5

    def _transform(self) -> torch.Tensor:
        transform = torch.eye(3)
        for axis in range(2):
            if self.config.flip and random.random() > 0.5:
                transform[axis, axis] *= -1
            if self.config.offset:
                transform[2, axis] = self.config.offset * (random.random() * 2 - 1)
            if self.config.scale:
                transform[axis, axis] *= 1.0 + self.config.scale * (random.random() * 2 - 1)
        if self.config.rotate:
            angle = random.random() * math.pi * 2
            cos, sin = math.cos(angle), math.sin(angle)
            transform = transform @ torch.tensor([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]])
        return transform


def book_epoch(model: nn.Module, augmentation: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
               device: torch.device, train: bool = True) -> tuple[int, float]:
    """One book-style epoch (``train=False``: only iterate the loader); (samples, seconds)."""
    samples, started = 0, time.perf_counter()
    for batch in loader:
        samples += book_step(model, augmentation, optimizer, batch, device) if train else len(batch[0])
    synchronize(device)
    return samples, time.perf_counter() - started


def book_step(model: nn.Module, augmentation: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple,
              device: torch.device) -> int:
    """The book's training step on one ``(input, label, series, slice)`` batch; returns its size."""
    input_t, label_t, _series, _slices = batch
    optimizer.zero_grad()
    input_g = input_t.to(device, non_blocking=True)
    label_g = label_t.to(device, non_blocking=True)
    input_g, label_g = augmentation(input_g, label_g)
    prediction_g = model(input_g)
    loss = segmentation_loss(prediction_g, label_g).mean()
    loss.backward()
    optimizer.step()
    return len(input_t)


class BookModel(nn.Module):
    """The book's ``UNetWrapper``: ends with a sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.wrapper = UNetWrapper()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.wrapper(x))


# --- ours -------------------------------------------------------------------------------


def our_data_epoch(loader) -> tuple[int, float]:
    samples, started = 0, time.perf_counter()
    for batch in loader:
        samples += len(batch["image"])
    return samples, time.perf_counter() - started


def run(args: argparse.Namespace, work: Path) -> None:
    from p2ch_luna.synth.generator import generate_dataset
    from p2ch_luna.training.cli import place_model

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
    book_model = BookModel().to(device)
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
        return book_epoch(book_model, book_augmentation, book_optimizer, book_loader, device, train)

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
    parser.add_argument("--batch-size", type=int, default=BOOK_BATCH_SIZE)
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
