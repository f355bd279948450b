"""What a loader worker spends cutting one classifier batch: our batched fetch against per-item collation.

    python -m bench.bench_batch_cutting [--batch-size 256] [--batches 30] [--series 4]

Ours: ``CandidateDataset.__getitems__`` cuts each chunk from the cached CT
straight into one int16 batch array. Baseline: what a DataLoader does for a
dataset without ``__getitems__``: ``__getitem__`` per sample (a tensor dict
each), then ``default_collate`` stacks them. Both give the same batch (checked
first). Random candidates from synthetic 192x192 series, CT volumes cached
beforehand; one process, one thread.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import default_collate

from bench.common import nodule_data
from p2ch_luna.data.candidates import CandidateDataset
from p2ch_luna.training.tasks import RunContext
from p2ch_luna.training.tasks.classification import NoduleTask


def per_item(dataset: CandidateDataset, indices: Sequence[int]) -> dict[str, Any]:
    return default_collate([dataset[index] for index in indices])


def seconds_per_batch(cut: Callable[[Sequence[int]], Any], batches: list[list[int]]) -> float:
    started = time.perf_counter()
    for indices in batches:
        cut(indices)
    return (time.perf_counter() - started) / len(batches)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=30, help="batches timed per way and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--series", type=int, default=4, help="synthetic series to draw candidates from")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_cutting_") as folder:
        config = nodule_data(Path(folder), args.series, args.batch_size, torch.device("cpu"))
        dataset = NoduleTask(RunContext(config, torch.device("cpu"))).datasets()[0]
        rng = np.random.default_rng(0)
        batches = [rng.integers(0, len(dataset), args.batch_size).tolist() for _ in range(args.batches)]
        ours, baseline = dataset.__getitems__(batches[0]), per_item(dataset, batches[0])
        if not all(torch.equal(ours[key], value) if isinstance(value, torch.Tensor) else ours[key] == value
                   for key, value in baseline.items()):
            raise RuntimeError("the batched fetch gave another batch than per-item collation")
        for round_number in range(1, args.rounds + 1):
            fast = seconds_per_batch(dataset.__getitems__, batches)
            slow = seconds_per_batch(lambda indices: per_item(dataset, indices), batches)
            print(f"round {round_number}: __getitems__ {fast * 1e3:6.1f} ms/batch   per item + default_collate "
                  f"{slow * 1e3:6.1f} ms/batch   {slow / fast:5.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
