"""What one batch costs the main process when a DataLoader worker makes it, against making it here.

    python -m bench.bench_batch_transfer [--batch-size 256] [--chunk-shape 32 48 48] [--batches 4]

A worker hands its batch over in shared memory: the main process receives
it (``next``), then touches its pages for the first time (here ``.float()``,
as the training step's conversion does; with CUDA, the pinning thread's copy
does it). The baseline is the same conversion of a batch whose pages this
process has already touched. The difference is main-process time per batch
that no worker count can hide: the classifier's input path is bounded by it.
"""

from __future__ import annotations

import argparse
import time
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset


class MadeBatches(Dataset):
    """Whole int16 batches of the given chunk shape, made by ``__getitems__`` (like our CandidateDataset)."""

    def __init__(self, chunk_shape: Sequence[int]) -> None:
        self.chunk_shape = tuple(chunk_shape)

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.full((1, *self.chunk_shape), -500, dtype=torch.int16)

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return {"image": torch.full((len(indices), 1, *self.chunk_shape), -500, dtype=torch.int16)}


def through_worker(dataset: MadeBatches, batch_size: int, batches: int) -> tuple[float, float]:
    """Seconds per batch in ``next`` and in the first ``.float()``, with batches waiting in the queue."""
    prefetch = batches + 2
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=1, prefetch_factor=prefetch,
                        collate_fn=lambda batch: batch)
    iterator = iter(loader)
    next(iterator)
    time.sleep(1.0 + 0.5 * prefetch)  # let the worker fill its queue, so nothing below waits for it
    receive = touch = 0.0
    for _ in range(batches):
        started = time.perf_counter()
        batch = next(iterator)
        received = time.perf_counter()
        batch["image"].float()
        touch += time.perf_counter() - received
        receive += received - started
    return receive / batches, touch / batches


def converted_here(dataset: MadeBatches, batch_size: int, batches: int) -> float:
    """Seconds per batch to convert a batch already in this process (its pages touched)."""
    batch = dataset.__getitems__(list(range(batch_size)))["image"]
    batch.float()  # warm-up: first touch
    started = time.perf_counter()
    for _ in range(batches):
        batch.float()
    return (time.perf_counter() - started) / batches


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--chunk-shape", type=int, nargs=3, default=[32, 48, 48], metavar=("I", "R", "C"))
    parser.add_argument("--batches", type=int, default=4, help="batches timed per way")
    args = parser.parse_args(argv)
    dataset = MadeBatches(args.chunk_shape)
    megabytes = args.batch_size * torch.Size(args.chunk_shape).numel() * 2 / 1e6
    here = converted_here(dataset, args.batch_size, args.batches)
    receive, touch = through_worker(dataset, args.batch_size, args.batches)
    print(f"batch of {args.batch_size} int16 chunks {tuple(args.chunk_shape)}: {megabytes:.1f} MB")
    print(f"converted here (pages touched):   {here * 1e3:7.1f} ms/batch")
    print(f"from a worker: next()             {receive * 1e3:7.1f} ms/batch")
    print(f"               first .float()     {touch * 1e3:7.1f} ms/batch")
    print(f"main-process time, worker / here: {(receive + touch) / here:7.2f}x "
          f"(+{(receive + touch - here) * 1e3:.1f} ms/batch)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
