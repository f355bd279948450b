"""``train_one_epoch`` and ``evaluate``: the loop every task shares.

The task computes losses and metrics (:class:`p2ch_luna.training.tasks.Task`); this
module moves batches to the device (pinned memory, non-blocking copies), runs
the forward pass under autocast when AMP is on, steps the optimizer (with a
GradScaler for float16), accumulates gradients over micro-batches when asked,
stops on a NaN/Inf loss naming the batch, shows a tqdm bar (ETA, smoothed loss,
data vs compute time) on rank 0, and gathers outputs from every DDP rank so
metrics are global.

The host waits for the device only every :data:`HOST_SYNC_EVERY` batches (to
check the losses and update the bar) and once per epoch (to copy the outputs),
so a GPU is fed the next batches while it computes the current one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn
from tqdm import tqdm

from p2ch_luna.distributed import all_gather_objects, all_true
from p2ch_luna.errors import LunaError
from p2ch_luna.precision import AmpSettings
from p2ch_luna.training.tasks.base import Batch, Outputs, Task

log = logging.getLogger(__name__)

LOSS_SMOOTHING = 0.9
"""Weight of the previous value in the progress bar's exponentially smoothed loss."""
HOST_SYNC_EVERY = 16
"""Batches between the host's waits for the device: the finite-loss check and the progress bar.

A NaN/Inf loss is therefore caught at most this many optimizer steps late; the
epoch is never saved either way."""


@dataclasses.dataclass
class EpochResult:
    """One epoch's global metrics, concatenated outputs (every rank) and counters.

    ``input_wait_seconds`` is this process's time blocked on the loader for its next batch: the part of
    ``seconds`` in which the input path, not the model, held training up.
    """

    metrics: dict[str, float]
    outputs: Outputs
    samples: int
    seconds: float
    input_wait_seconds: float = 0.0

    @property
    def input_wait_fraction(self) -> float:
        """``input_wait_seconds`` as a fraction of the epoch's time (0 for an empty epoch)."""
        return self.input_wait_seconds / self.seconds if self.seconds > 0 else 0.0


def move_to_device(batch: Batch, device: torch.device) -> Batch:
    """Tensors of ``batch`` on ``device`` (non-blocking from pinned memory); other values unchanged."""
    return {
        key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
    }


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """``parts`` micro-batches taking every ``parts``-th sample, so micro-batch ``r`` of a
    global batch is what DDP rank ``r`` of ``parts`` would see."""
    if parts == 1:
        return [batch]
    micro = []
    for part in range(parts):
        micro.append({key: value[part::parts] if isinstance(value, (torch.Tensor, list)) else value
                      for key, value in batch.items()})
    return [item for item in micro if _batch_size(item) > 0]


def train_one_epoch(
    task: Task,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[Batch],
    *,
    epoch: int,
    device: torch.device,
    generator: torch.Generator,
    amp: AmpSettings = AmpSettings(),
    scaler: torch.amp.GradScaler | None = None,
    grad_accumulation: int = 1,
    show_progress: bool = True,
) -> EpochResult:
    """Train ``model`` on one pass over ``loader``; raises :class:`LunaError` on a NaN/Inf loss."""
    model.train()
    outputs: list[Outputs] = []
    started = time.perf_counter()
    samples = 0
    progress = _ProgressBar(loader, f"E{epoch} trn", show_progress)
    pending = _PendingLosses()
    for batch_index, batch in progress:
        optimizer.zero_grad(set_to_none=True)
        micro_batches = split_batch(move_to_device(batch, device), grad_accumulation)
        batch_loss = torch.zeros((), device=device)
        for micro_index, micro in enumerate(micro_batches):
            is_last = micro_index == len(micro_batches) - 1
            sync = contextlib.nullcontext() if is_last or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with amp.autocast(device):
                    loss_per_sample, micro_outputs = task.compute_loss(model, micro, augment=True, generator=generator)
                loss = loss_per_sample.float().mean() / len(micro_batches)
                (scaler.scale(loss) if scaler is not None else loss).backward()
            batch_loss += loss.detach()
            micro_outputs["loss"] = loss_per_sample.detach().float()
            outputs.append(micro_outputs)
            samples += len(loss_per_sample)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        pending.add(batch_loss)
        if len(pending) == HOST_SYNC_EVERY:
            _check_finite(pending.flush(progress), epoch, device)
    _check_finite(pending.flush(progress), epoch, device)
    return _finish(task, outputs, samples, started, progress.data_seconds)


@torch.no_grad()
def evaluate(
    task: Task,
    model: nn.Module,
    loader: Iterable[Batch],
    *,
    epoch: int,
    device: torch.device,
    generator: torch.Generator,
    amp: AmpSettings = AmpSettings(),
    show_progress: bool = True,
) -> EpochResult:
    """Validation pass: no gradients, no augmentation, metrics over every rank's outputs.

    Ranks may hold different numbers of validation batches, so there is no
    collective call inside the loop (pass the unwrapped model, not DDP); a
    NaN/Inf loss is reported after the outputs are gathered.
    """
    model.eval()
    outputs: list[Outputs] = []
    started = time.perf_counter()
    samples = 0
    first_bad_batch: int | None = None
    progress = _ProgressBar(loader, f"E{epoch} val", show_progress)
    pending = _PendingLosses()
    for _batch_index, batch in progress:
        with amp.autocast(device):
            loss_per_sample, batch_outputs = task.compute_loss(
                model, move_to_device(batch, device), augment=False, generator=generator)
        batch_outputs["loss"] = loss_per_sample.detach().float()
        pending.add(batch_outputs["loss"].mean())
        outputs.append(batch_outputs)
        samples += len(loss_per_sample)
        if len(pending) == HOST_SYNC_EVERY:
            first_bad_batch = _first_not_none(first_bad_batch, pending.flush(progress))
    first_bad_batch = _first_not_none(first_bad_batch, pending.flush(progress))
    bad = [(rank, index) for rank, index in enumerate(all_gather_objects(first_bad_batch)) if index is not None]
    if bad:
        rank, index = bad[0]
        raise LunaError(f"validation loss is not finite (NaN/Inf) at epoch {epoch}, batch {index} (rank {rank}); "
                        "stopping without saving this epoch")
    return _finish(task, outputs, samples, started, progress.data_seconds)


def concatenate_outputs(outputs: list[Outputs]) -> Outputs:
    """One tensor per key: the batches' per-sample outputs joined along the first axis."""
    if not outputs:
        return {}
    return {key: torch.cat([part[key] for part in outputs]) for key in outputs[0]}


def _finish(task: Task, outputs: list[Outputs], samples: int, started: float, input_wait_seconds: float) -> EpochResult:
    local = {key: value.cpu() for key, value in concatenate_outputs(outputs).items()}
    gathered = [part for part in all_gather_objects(local) if part]
    merged = concatenate_outputs(gathered)
    total = sum(len(part["loss"]) for part in gathered) if gathered else samples
    metrics = task.epoch_metrics(merged) if merged else {}
    return EpochResult(metrics=metrics, outputs=merged, samples=total, seconds=time.perf_counter() - started,
                       input_wait_seconds=input_wait_seconds)


class _PendingLosses:
    """Per-batch losses still on the device, read by the host in one copy when flushed."""

    def __init__(self) -> None:
        self._losses: list[torch.Tensor] = []
        self._first_index = 0

    def __len__(self) -> int:
        return len(self._losses)

    def add(self, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach().float())

    def flush(self, progress: _ProgressBar) -> int | None:
        """Report the pending losses to ``progress``; the index of the first non-finite one, if any."""
        if not self._losses:
            return None
        values = torch.stack(self._losses).cpu()
        first_index = self._first_index
        self._first_index += len(values)
        self._losses = []
        progress.report(values.tolist())
        finite = torch.isfinite(values)
        return None if bool(finite.all()) else first_index + int((~finite).nonzero()[0, 0])


def _first_not_none(current: int | None, new: int | None) -> int | None:
    return current if current is not None else new


def _check_finite(bad_batch: int | None, epoch: int, device: torch.device) -> None:
    """Stop on a NaN/Inf loss, on every rank together, naming the epoch and the first bad batch."""
    if all_true(bad_batch is None, device):
        return
    bad = [(rank, index) for rank, index in enumerate(all_gather_objects(bad_batch)) if index is not None]
    rank, index = bad[0]
    raise LunaError(
        f"training loss is not finite (NaN/Inf) at epoch {epoch}, batch {index} (rank {rank}); "
        "stopping without saving this epoch (try a lower --lr, or --amp off)"
    )


def _batch_size(batch: Mapping[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, (torch.Tensor, list)):
            return len(value)
    return 0


class _ProgressBar:
    """Iterates a loader with a tqdm bar showing smoothed loss and data vs compute time.

    Compute time is the time outside the loader's ``next`` (the device works
    asynchronously, so a per-batch split would be wrong anyway).
    """

    def __init__(self, loader: Iterable[Batch], description: str, show: bool) -> None:
        self._loader = loader
        self._description = description
        self._show = show
        self._bar: tqdm | None = None
        self._loss = math.nan
        self._data_seconds = 0.0
        self._started = 0.0
        self._count = 0

    def __iter__(self) -> Iterator[tuple[int, Batch]]:
        loader = self._loader
        total = len(loader) if hasattr(loader, "__len__") else None
        # disable=None: tqdm hides the bar when stderr is not a terminal (logs, CI).
        with tqdm(total=total, desc=self._description, disable=None if self._show else True, dynamic_ncols=True,
                  leave=False, unit="batch") as bar:
            self._bar = bar
            self._started = time.perf_counter()
            iterator = iter(loader)
            index = 0
            while True:
                fetch_started = time.perf_counter()
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                self._data_seconds += time.perf_counter() - fetch_started
                yield index, batch
                index += 1
            self._bar = None

    @property
    def data_seconds(self) -> float:
        """Time spent waiting in the loader's ``next`` so far."""
        return self._data_seconds

    def report(self, losses: Sequence[float]) -> None:
        """Record finished batches (their losses, oldest first) and update the bar."""
        for loss in losses:
            if math.isfinite(loss):
                self._loss = loss if math.isnan(self._loss) else (
                    LOSS_SMOOTHING * self._loss + (1 - LOSS_SMOOTHING) * loss)
        self._count += len(losses)
        if self._bar is None or not losses:
            return
        self._bar.update(len(losses))
        compute_seconds = time.perf_counter() - self._started - self._data_seconds
        self._bar.set_postfix(
            loss=f"{self._loss:.4f}",
            data=f"{self._data_seconds / self._count * 1e3:.0f}ms",
            compute=f"{compute_seconds / self._count * 1e3:.0f}ms",
        )
