"""``train_one_epoch`` and ``evaluate``: the loop every task shares.

The task computes losses and metrics (:class:`p2ch_luna.tasks.Task`); this
module moves batches to the device (pinned memory, non-blocking copies), runs
the forward pass under autocast when AMP is on, steps the optimizer (with a
GradScaler for float16), accumulates gradients over micro-batches when asked,
stops on a NaN/Inf loss naming the batch, shows a tqdm bar (ETA, smoothed loss,
data vs compute time) on rank 0, and gathers outputs from every DDP rank so
metrics are global.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn
from tqdm import tqdm

from .distributed import all_gather_objects, all_true
from .errors import LunaError
from .tasks.base import Batch, Outputs, Task

log = logging.getLogger(__name__)

LOSS_SMOOTHING = 0.9
"""Weight of the previous value in the progress bar's exponentially smoothed loss."""
PROGRESS_UPDATE_EVERY = 5
"""Batches between progress-bar text updates (tqdm itself limits redraws)."""


@dataclasses.dataclass(frozen=True)
class AmpSettings:
    """Autocast dtype (None: full precision) and whether float16 needs a GradScaler."""

    dtype: torch.dtype | None = None

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


def amp_settings(enabled: bool, device: torch.device) -> AmpSettings:
    """bfloat16 on the CPU and on GPUs that support it; float16 (with a GradScaler) otherwise."""
    if not enabled:
        return AmpSettings()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return AmpSettings(torch.float16)
    return AmpSettings(torch.bfloat16)


@dataclasses.dataclass
class EpochResult:
    """One epoch's global metrics, concatenated outputs (every rank) and counters."""

    metrics: dict[str, float]
    outputs: Outputs
    samples: int
    seconds: float


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
                _check_finite(loss, epoch, batch_index, device)
                (scaler.scale(loss) if scaler is not None else loss).backward()
            batch_loss += loss.detach()
            micro_outputs["loss"] = loss_per_sample.detach().float().cpu()
            outputs.append(micro_outputs)
            samples += len(loss_per_sample)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        progress.report(float(batch_loss))
    return _finish(task, outputs, samples, started)


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
    for batch_index, batch in progress:
        with amp.autocast(device):
            loss_per_sample, batch_outputs = task.compute_loss(
                model, move_to_device(batch, device), augment=False, generator=generator)
        loss = float(loss_per_sample.float().mean())
        if first_bad_batch is None and not math.isfinite(loss):
            first_bad_batch = batch_index
        batch_outputs["loss"] = loss_per_sample.detach().float().cpu()
        outputs.append(batch_outputs)
        samples += len(loss_per_sample)
        progress.report(loss)
    bad = [(rank, index) for rank, index in enumerate(all_gather_objects(first_bad_batch)) if index is not None]
    if bad:
        rank, index = bad[0]
        raise LunaError(f"validation loss is not finite (NaN/Inf) at epoch {epoch}, batch {index} (rank {rank}); "
                        "stopping without saving this epoch")
    return _finish(task, outputs, samples, started)


def concatenate_outputs(outputs: list[Outputs]) -> Outputs:
    """One tensor per key: the batches' per-sample outputs joined along the first axis."""
    if not outputs:
        return {}
    return {key: torch.cat([part[key] for part in outputs]) for key in outputs[0]}


def _finish(task: Task, outputs: list[Outputs], samples: int, started: float) -> EpochResult:
    local = concatenate_outputs(outputs)
    gathered = [part for part in all_gather_objects(local) if part]
    merged = concatenate_outputs(gathered)
    total = sum(len(part["loss"]) for part in gathered) if gathered else samples
    metrics = task.epoch_metrics(merged) if merged else {}
    return EpochResult(metrics=metrics, outputs=merged, samples=total, seconds=time.perf_counter() - started)


def _check_finite(loss: torch.Tensor, epoch: int, batch_index: int, device: torch.device) -> None:
    """Stop on a NaN/Inf loss, on every rank together, naming the epoch and batch."""
    finite = bool(torch.isfinite(loss).item())
    if not all_true(finite, device):
        where = "this process" if not finite else "another process"
        raise LunaError(
            f"training loss is not finite (NaN/Inf) at epoch {epoch}, batch {batch_index} (in {where}); "
            "stopping without saving this epoch (try a lower --lr, or --amp off)"
        )


def _batch_size(batch: Mapping[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, (torch.Tensor, list)):
            return len(value)
    return 0


class _ProgressBar:
    """Iterates a loader with a tqdm bar showing smoothed loss and data vs compute time."""

    def __init__(self, loader: Iterable[Batch], description: str, show: bool) -> None:
        self._loader = loader
        self._description = description
        self._show = show
        self._bar: tqdm | None = None
        self._loss = math.nan
        self._data_seconds = 0.0
        self._compute_seconds = 0.0
        self._mark = 0.0
        self._count = 0

    def __iter__(self) -> Iterator[tuple[int, Batch]]:
        loader = self._loader
        total = len(loader) if hasattr(loader, "__len__") else None
        # disable=None: tqdm hides the bar when stderr is not a terminal (logs, CI).
        with tqdm(total=total, desc=self._description, disable=None if self._show else True, dynamic_ncols=True,
                  leave=False, unit="batch") as bar:
            self._bar = bar
            iterator = iter(loader)
            index = 0
            while True:
                fetch_started = time.perf_counter()
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                self._mark = time.perf_counter()
                self._data_seconds += self._mark - fetch_started
                yield index, batch
                index += 1
            self._bar = None

    def report(self, loss: float) -> None:
        """Record one finished batch (its loss) and update the bar."""
        now = time.perf_counter()
        self._compute_seconds += now - self._mark
        self._count += 1
        self._loss = loss if math.isnan(self._loss) else LOSS_SMOOTHING * self._loss + (1 - LOSS_SMOOTHING) * loss
        if self._bar is None:
            return
        self._bar.update(1)
        if self._count % PROGRESS_UPDATE_EVERY == 1 or self._count == self._bar.total:
            self._bar.set_postfix(
                loss=f"{self._loss:.4f}",
                data=f"{self._data_seconds / self._count * 1e3:.0f}ms",
                compute=f"{self._compute_seconds / self._count * 1e3:.0f}ms",
            )

