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

    python bench/bench_training.py [--data-root DIR] [--batches 4] [--rounds 1] [--device cuda]

``bench/bench_gpu.py`` runs these loops (and the segmenter's and diagnosis)
on a GPU with larger batches, mixed precision and ``torch.compile``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from p2ch_luna.data.augment import BOOK_NOISE_HU, BOOK_OFFSET, BOOK_SCALE, AugmentConfig  # noqa: E402
from p2ch_luna.training.config import TrainConfig  # noqa: E402
from p2ch_luna.data.candidates import CandidateDataset  # noqa: E402
from p2ch_luna.training.engine import amp_settings, train_one_epoch, tune_backends  # noqa: E402
from p2ch_luna.models import LunaModel  # noqa: E402
from p2ch_luna.models.classifier import LunaConv3d  # noqa: E402
from p2ch_luna.paths import resolve_paths  # noqa: E402
from p2ch_luna.data.sampling import BalancedSampler, make_generator  # noqa: E402
from p2ch_luna.training.tasks import RunContext  # noqa: E402
from p2ch_luna.training.tasks.classification import NoduleTask  # noqa: E402
from p2ch_luna.training.cli import place_model  # noqa: E402

BOOK_BATCH_SIZE = 32
BOOK_LR = 1e-3
BOOK_MOMENTUM = 0.99
SYNTH_SERIES = 6
SYNTH_SHAPE = (128, 128)
SYNTH_SLICES = (40, 60)


class BookStyleDataset(torch.utils.data.Dataset):
    """Float32 chunks augmented one at a time on the CPU in ``__getitem__`` (book p2ch12)."""

    def __init__(self, dataset: CandidateDataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str, torch.Tensor]:
        item = self.dataset[index]
        chunk = item["image"].to(torch.float32)
        rng = random.Random(self.seed * 1_000_003 + index)
        return book_augment(chunk, rng), item["label"], item["series_uid"], item["center_irc"]


def book_augment(chunk: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """The book's per-sample augmentation: one random affine + grid_sample, then noise."""
    transform = torch.eye(4)
    for axis in range(3):
        if rng.random() > 0.5:
            transform[axis, axis] *= -1
        transform[axis, 3] = BOOK_OFFSET * (rng.random() * 2 - 1)
        transform[axis, axis] *= 1.0 + BOOK_SCALE * (rng.random() * 2 - 1)
    angle = rng.random() * math.pi * 2
    cos, sin = math.cos(angle), math.sin(angle)
    rotation = torch.tensor([[cos, -sin, 0, 0], [sin, cos, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float32)
    transform @= rotation
    volume = chunk.unsqueeze(0)
    grid = F.affine_grid(transform[:3].unsqueeze(0), list(volume.shape), align_corners=False)
    augmented = F.grid_sample(volume, grid, padding_mode="border", align_corners=False)[0]
    return augmented + torch.randn_like(augmented) * BOOK_NOISE_HU


def time_batches(step: Callable[[], int], batches: int, device: torch.device) -> float:
    """Samples per second of ``batches`` calls of ``step`` (each returns its batch size)."""
    synchronize(device)
    started = time.perf_counter()
    samples = sum(step() for _ in range(batches))
    synchronize(device)
    return samples / (time.perf_counter() - started)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings must include it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_rate(step: Callable[[], int], seconds: float, device: torch.device, warmup: int,
              watch: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> float:
    """Samples/s of repeated ``step`` calls (each returns its batch size) over about ``seconds``,
    after ``warmup`` calls; ``watch`` wraps the timed stretch (e.g. a utilisation monitor)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    with watch():
        started = time.perf_counter()
        samples = 0
        while time.perf_counter() - started < seconds:
            samples += step()
        synchronize(device)
        elapsed = time.perf_counter() - started
    return samples / elapsed


def book_style(dataset: CandidateDataset, sampler: BalancedSampler, workers: int, batches: int,
               device: torch.device = torch.device("cpu")) -> float:
    """Samples/s of the book's loop over ``batches`` batches after one warm-up batch per worker."""
    step = book_style_step(dataset, sampler, workers, device)
    for _ in range(max(1, workers)):  # warm-up: worker start, first allocations, one batch per worker
        step()
    return time_batches(step, batches, device)


def route_convolutions(model: torch.nn.Module, triton_channels: int) -> None:
    """``model``'s convolutions of at most ``triton_channels`` output channels on ``small_conv``'s Triton kernels,
    the others on cuDNN (0: every one on cuDNN)."""
    for conv in model.modules():
        if isinstance(conv, LunaConv3d):
            conv.triton = conv.out_channels <= triton_channels


def as_book_classifier(model: LunaModel) -> LunaModel:
    """``model`` computing as the book's LunaModel does, on any device: ``nn.BatchNorm3d`` on the input, then
    each convolution on cuDNN as ``nn.Conv3d`` (no folded batch norm, no channel padding, no Triton kernels)."""
    norm = torch.nn.BatchNorm3d(model.tail_batchnorm.num_features).to(model.tail_batchnorm.weight.device)
    norm.load_state_dict(model.tail_batchnorm.state_dict())
    norm.train(model.tail_batchnorm.training)
    model.tail_batchnorm = norm
    model.fold_input_normalisation = False
    route_convolutions(model, 0)
    for conv in model.modules():
        if isinstance(conv, LunaConv3d):
            conv.channel_multiple = 1
    return model


def book_style_step(dataset: CandidateDataset, sampler: BalancedSampler, workers: int,
                    device: torch.device) -> Callable[[], int]:
    """One step of the book's loop per call (the book's float32 channels-first model, per-sample CPU
    augmentation in the workers); returns the batch size."""
    torch.manual_seed(0)
    model = as_book_classifier(LunaModel(input_shape=dataset.chunk_shape_irc)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=BOOK_LR, momentum=BOOK_MOMENTUM)
    loader = torch.utils.data.DataLoader(BookStyleDataset(dataset, seed=0), batch_size=BOOK_BATCH_SIZE,
                                         sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda")
    iterator = iter(loader)

    def step() -> int:
        images, labels, _uids, _centers = next(iterator)
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        model.train()
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        return len(labels)

    return step


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
        limited = _Limited(loader, count)
        result = train_one_epoch(task, model, optimizer, limited, epoch=1, device=context.device,
                                 generator=generator, amp=amp, show_progress=False)
        return result.samples / result.seconds

    run(1)  # warm-up
    return run(batches)


class _Limited:
    """The first ``count`` batches of a loader (re-iterable, with a length for the progress bar)."""

    def __init__(self, loader: Any, count: int) -> None:
        self.loader, self.count = loader, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Any:
        for index, batch in enumerate(self.loader):
            if index == self.count:
                return
            yield batch


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
        base = TrainConfig(task="nodule", paths=paths, batch_size=BOOK_BATCH_SIZE, ratio=1,
                           augment=AugmentConfig.book(), optimizer="sgd", lr=BOOK_LR, val_stride=2,
                           epoch_size=BOOK_BATCH_SIZE * (args.batches + 1) * 4, channels_last=True)
        device = torch.device(args.device)
        task = NoduleTask(RunContext(base, device))
        dataset = task.datasets()[0]
        for index in range(len(dataset)):  # fill the cache before timing
            dataset[index]
        variants: dict[str, Callable[[], float]] = {
            "book": lambda: book_style(dataset, BalancedSampler(dataset.labels, ratio=1,
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

    print(f"\ntorch {torch.__version__} on {device}, {torch.get_num_threads()} threads, batch {BOOK_BATCH_SIZE}, "
          f"{args.batches} timed batches x {args.rounds} round(s), chunk {tuple(dataset.chunk_shape_irc)}")
    medians = {name: statistics.median(values) for name, values in rates.items()}
    reference = medians.get("book")
    for name, value in medians.items():
        ratio = f"{value / reference:5.2f}x book" if reference else ""
        print(f"{name:<24s} {value:8.2f} samples/s  {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
