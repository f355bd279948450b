"""Helpers shared by the benches: timing on any device, a loader cut to a few batches, a synthetic nodule
dataset, and checkpoints (or seeded untrained models of the book's architecture) to time diagnosis with."""

from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from p2ch_luna.data.augment import AugmentConfig
from p2ch_luna.models import build_model
from p2ch_luna.models.checkpoint import BOOK_SEGMENTATION_KWARGS, LoadedCheckpoint, load_checkpoint
from p2ch_luna.models.classifier import LunaConv3d
from p2ch_luna.paths import resolve_paths
from p2ch_luna.synth.generator import generate_dataset
from p2ch_luna.training.config import TrainConfig
from p2ch_luna.training.tasks import RunContext
from p2ch_luna.training.tasks.classification import NoduleTask

WARMUP = 3
"""Untimed calls before :func:`median_ms` times a function."""


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


def route_convolutions(model: torch.nn.Module, triton_channels: int) -> None:
    """``model``'s convolutions of at most ``triton_channels`` output channels on ``small_conv``'s Triton kernels,
    the others on cuDNN (0: every one on cuDNN)."""
    for conv in model.modules():
        if isinstance(conv, LunaConv3d):
            conv.triton = conv.out_channels <= triton_channels


class Limited:
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


def median_ms(run: Callable[[], object], repeats: int, device: torch.device) -> float:
    """The median of ``repeats`` timed calls of ``run`` (device events on CUDA), after a warm-up."""
    for _ in range(WARMUP):
        run()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            run()
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


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


def load_or_build(path: Path | None, task: str) -> LoadedCheckpoint:
    """The checkpoint at ``path``, or without one a seeded untrained model of the book's architecture."""
    if path is not None:
        return load_checkpoint(path, task)
    if task == "segmentation":
        return untrained_checkpoint(build_model("unet", **BOOK_SEGMENTATION_KWARGS).eval(), task)
    return untrained_checkpoint(build_model("luna").eval(), task)


def untrained_checkpoint(model: torch.nn.Module, task: str) -> LoadedCheckpoint:
    return LoadedCheckpoint(path=Path("untrained"), model=model, task=task, model_name=type(model).__name__,
                            model_kwargs={}, epoch=None, samples_seen=None, optimizer_name=None,
                            optimizer_state=None, config={}, metrics={}, is_book=False, raw={})
