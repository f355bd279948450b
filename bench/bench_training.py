"""Training throughput: our loop vs a book-style loop, on the same data and machine, in one run.

Book-style baseline (chapters 12-14 on a CPU): a DataLoader whose ``__getitem__``
reads a chunk, converts it to float32 and augments it alone (flip, offset,
scale, rotation, noise with one ``grid_sample`` per sample, as p2ch12's
``getCtAugmentedCandidate``), default collation, a channels-first float32
``LunaModel``, SGD. Ours: :func:`p2ch_luna.training.engine.train_one_epoch` with the
nodule task (int16 chunks batched in-process, batched augmentation on the
training device, channels-last layout), plus variants to attribute the gain.

Both use batch 32, the same balanced sampling, model and optimizer. Each
variant trains ``--batches`` batches after one warm-up batch; the figure is
training samples per second over the whole loop (data loading included).
The rounds are interleaved (``--rounds``) so a change in machine load hits
every variant alike; the median per variant is reported.

    python -m bench.bench_training [--data-root DIR] [--batches 4] [--rounds 1] [--device cuda]

``bench.bench_gpu`` runs these loops (and the segmenter's and diagnosis)
on a GPU with larger batches, mixed precision and ``torch.compile``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import torch

from bench.book import BOOK_CLASSIFIER_BATCH_SIZE, BOOK_LR, BOOK_MOMENTUM, book_training_rate
from bench.common import Limited
from p2ch_luna.data.augment import AugmentConfig
from p2ch_luna.data.sampling import BalancedSampler, make_generator
from p2ch_luna.paths import resolve_paths
from p2ch_luna.precision import amp_settings, tune_backends
from p2ch_luna.training.config import TrainConfig
from p2ch_luna.training.engine import train_one_epoch
from p2ch_luna.training.loop import place_model
from p2ch_luna.training.tasks import RunContext
from p2ch_luna.training.tasks.classification import NoduleTask

SYNTH_SERIES = 6
SYNTH_SHAPE = (128, 128)
SYNTH_SLICES = (40, 60)


def ours(config: TrainConfig, batches: int, device: torch.device = torch.device("cpu")) -> float:
    """Our task and engine (``train_one_epoch``) on ``batches`` batches after one warm-up batch."""
    tune_backends(device)
    context = RunContext(config, device)
    task = NoduleTask(context)
    torch.manual_seed(0)
    model = place_model(task.build_model().model, config, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=BOOK_LR, momentum=BOOK_MOMENTUM)
    loader = task.train_loader()
    amp = amp_settings(config.amp, context.device)
    generator = make_generator(config.seed, 1, context.device)

    def run(count: int) -> float:
        limited = Limited(loader, count)
        result = train_one_epoch(task, model, optimizer, limited, epoch=1, device=context.device,
                                 generator=generator, amp=amp, show_progress=False)
        return result.samples / result.seconds

    run(1)  # warm-up
    return run(batches)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=None, help="LUNA16 folder (default: a synthetic one)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--batches", type=int, default=4, help="timed batches per variant")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repetitions")
    parser.add_argument("--book-workers", type=int, default=2, help="DataLoader workers of the book-style loop")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (both loops run there)")
    parser.add_argument("--variants", default="book,ours,ours-no-channels-last",
                        help="comma-separated variants to run (also: ours-bf16, slower on CPUs without AMX)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        data_root = args.data_root
        if data_root is None:
            from p2ch_luna.synth.generator import generate_dataset

            data_root = Path(tmp) / "luna"
            generate_dataset(data_root, series=SYNTH_SERIES, seed=0, shape=SYNTH_SHAPE, slices=SYNTH_SLICES,
                             progress=False)
        paths = resolve_paths(data_root=data_root, cache_dir=args.cache_dir or Path(tmp) / "cache")
        base = TrainConfig(task="nodule", paths=paths, batch_size=BOOK_CLASSIFIER_BATCH_SIZE, ratio=1,
                           augment=AugmentConfig.book(), optimizer="sgd", lr=BOOK_LR, val_stride=2,
                           epoch_size=BOOK_CLASSIFIER_BATCH_SIZE * (args.batches + 1) * 4, channels_last=True)
        device = torch.device(args.device)
        task = NoduleTask(RunContext(base, device))
        dataset = task.datasets()[0]
        for index in range(len(dataset)):  # fill the cache before timing
            dataset[index]
        variants: dict[str, Callable[[], float]] = {
            "book": lambda: book_training_rate(dataset, BalancedSampler(dataset.labels, ratio=1,
                                                                epoch_size=base.epoch_size, seed=0),
                                       args.book_workers, args.batches, device),
            "ours": lambda: ours(base, args.batches, device),
            "ours-no-channels-last": lambda: ours(dataclasses.replace(base, channels_last=False), args.batches,
                                                  device),
            "ours-bf16": lambda: ours(dataclasses.replace(base, amp=True), args.batches, device),
        }
        chosen = [name.strip() for name in args.variants.split(",") if name.strip()]
        unknown = sorted(set(chosen) - set(variants))
        if unknown:
            parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(variants)}")
        rates: dict[str, list[float]] = {name: [] for name in chosen}
        for round_index in range(args.rounds):
            for name in chosen:
                rates[name].append(variants[name]())
                print(f"round {round_index + 1} {name:<24s} {rates[name][-1]:8.2f} samples/s", flush=True)

    print(f"\ntorch {torch.__version__} on {device}, {torch.get_num_threads()} threads, batch {BOOK_CLASSIFIER_BATCH_SIZE}, "
          f"{args.batches} timed batches x {args.rounds} round(s), chunk {tuple(dataset.chunk_shape_irc)}")
    medians = {name: statistics.median(values) for name, values in rates.items()}
    reference = medians.get("book")
    for name, value in medians.items():
        ratio = f"{value / reference:5.2f}x book" if reference else ""
        print(f"{name:<24s} {value:8.2f} samples/s  {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
