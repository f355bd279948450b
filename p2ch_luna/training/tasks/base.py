"""The interface between a training task and the shared engine.

A task (nodule classification, malignancy, segmentation) says *what* is
trained: its model, its data, its loss and its metrics. The engine
(:mod:`p2ch_luna.training.engine`) and the entry point (:mod:`p2ch_luna.training`) say
*how*: devices, AMP, DDP, progress, checkpoints and TensorBoard.

Life of a run, as the engine drives it::

    task = TaskClass(context)                       # cheap: no data read yet
    model, model_name, model_kwargs = task.build_model()
    train_loader, val_loader = task.train_loader(), task.val_loader()
    for epoch in 1..epochs:
        sampler.set_epoch(epoch); task.set_epoch(epoch)   # reseed the sampler by (seed, epoch)
        for batch in train_loader:                  # dict batches, moved to the device
            loss_per_sample, outputs = task.compute_loss(model, batch, augment=True, generator=g)
        metrics = task.epoch_metrics(concatenated outputs)      # pure
        task.log_extra(writer, "trn", epoch, outputs, samples_seen)   # rank 0 only
        ... same for validation with augment=False, plus task.validation_metrics(outputs)
        and task.model_metrics(model);
        the metrics named by task.selection() pick the best checkpoint

Batches are dicts, never positional tuples: tensors (``image``, ``label``,
``center_irc``, masks...) are moved to the device by the engine; other values
(``series_uid`` lists) stay as they are.
"""

from __future__ import annotations

import abc
import argparse
import dataclasses
import logging
import math
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from p2ch_luna.data.augment import AugmentConfig
from p2ch_luna.data.batch_ring import RingDataset, RingLoader, SharedMemoryShortage
from p2ch_luna.data.series_split import SeriesSplit
from p2ch_luna.models.layout import to_memory_format  # noqa: F401  (part of the task interface)
from p2ch_luna.training.config import TrainConfig

log = logging.getLogger(__name__)

Batch = dict[str, Any]
"""One batch: ``{"image": Tensor, "label": Tensor, "series_uid": list[str], ...}``."""
Outputs = dict[str, torch.Tensor]
"""Per-sample values kept for metrics: detached tensors, first axis = sample (on the CPU once the epoch ends)."""


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What a task needs to know about the run it is part of.

    ``rank``/``world_size`` describe the DDP process group (0/1 without one):
    a task's loaders give each rank its own shard of every epoch.
    """

    config: TrainConfig
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A freshly built model and how to rebuild it from a checkpoint."""

    model: nn.Module
    model_name: str
    model_kwargs: dict[str, Any]


class Task(abc.ABC):
    """One kind of training, run by :func:`p2ch_luna.training.engine.train_one_epoch`/``evaluate``.

    Subclasses set the class attributes and implement the abstract methods.
    ``task_name`` is what checkpoints record (``"nodule"``, ``"malignancy"``
    or ``"segmentation"``); ``score_name`` names the validation metric that
    :meth:`score` returns (higher is better) and that picks the ``.best``
    checkpoint.
    """

    task_name: ClassVar[str]
    score_name: ClassVar[str]
    default_model: ClassVar[str]
    default_optimizer: ClassVar[str] = "sgd"
    summary_keys: ClassVar[Sequence[str]] = ("loss",)
    """Metric keys shown in the one-line per-epoch summary."""

    def __init__(self, context: RunContext) -> None:
        self.context = context
        self.config = context.config

    # --- command line -----------------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add the task's own options to its sub-command parser (none by default)."""

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> Any:
        """A frozen dataclass of the task's own options, stored as ``TrainConfig.task_options``."""
        return None

    @classmethod
    def book_augment(cls) -> AugmentConfig:
        """What ``--augmented`` turns on for this task (the book's classifier augmentation)."""
        return AugmentConfig.book()

    # --- model and data ---------------------------------------------------------------

    @abc.abstractmethod
    def build_model(self) -> ModelSpec:
        """The model to train (on the CPU; the engine moves it), with its registry name and kwargs."""

    @abc.abstractmethod
    def train_loader(self) -> Iterable[Batch]:
        """Training batches of this rank's shard; built once and iterated once per epoch.

        Its length must be the number of batches per epoch and equal on every rank.
        """

    @abc.abstractmethod
    def val_loader(self) -> Iterable[Batch]:
        """Validation batches of this rank's shard (every sample once over all ranks, not padded)."""

    def series_split(self) -> SeriesSplit | None:
        """The training and validation series of this run, once both loaders are built; checkpoints record
        it (None: the task has no series split to record)."""
        return None

    def set_epoch(self, epoch: int) -> None:
        """Called before each training epoch (1-based), after the engine has called
        ``set_epoch`` on the training loader's sampler (see :func:`p2ch_luna.data.sampling.set_sampler_epoch`)."""

    # --- loss and metrics ---------------------------------------------------------------

    @abc.abstractmethod
    def model_inputs(self, batch: Batch, augment: bool,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """What :meth:`compute_loss` gives the model and scores it against, for one batch on the device: the
        float images (augmented from ``generator`` when ``augment``) and the labels or masks."""

    @abc.abstractmethod
    def compute_loss(
        self, model: nn.Module, batch: Batch, augment: bool, generator: torch.Generator
    ) -> tuple[torch.Tensor, Outputs]:
        """Forward one batch (already on the device): per-sample loss and per-sample outputs.

        ``augment`` is True for training batches; augmentation is drawn from
        ``generator`` (on the batch's device). The returned loss has shape (B,)
        and carries gradients; the outputs are small per-sample values
        (labels, probabilities, pixel counts), detached and left on the batch's
        device: the engine copies them to the CPU once per epoch, so the host
        need not wait for the device after every batch.
        """

    @abc.abstractmethod
    def epoch_metrics(self, outputs: Outputs) -> dict[str, float]:
        """Metrics of one epoch from the concatenated outputs of every batch and rank.

        ``outputs["loss"]`` holds the per-sample losses (added by the engine).
        Must include ``"loss"`` and ``score_name``.
        """

    def score(self, metrics: Mapping[str, float]) -> float:
        """The value that picks the best checkpoint (higher is better); NaN counts as worst."""
        value = float(metrics.get(self.score_name, math.nan))
        return -math.inf if math.isnan(value) else value

    def selection(self) -> tuple[str, ...]:
        """The validation metrics that rank checkpoints, most important first
        (:func:`p2ch_luna.training.selection.is_better`); by default ``score_name`` alone."""
        return (self.score_name,)

    def validation_metrics(self, outputs: Outputs) -> dict[str, float]:
        """Metrics only a validation epoch has, from its concatenated outputs (every rank's), added to
        :meth:`epoch_metrics`'s before they are reported (the nodule task's FROC); none by default."""
        return {}

    def model_metrics(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics measured by running ``model`` (the plain module, on the run's device) on data of
        the task's own choosing rather than from the validation batches -- the segmenter's candidates on whole
        validation CTs; run by the main process only and shared with the others. None by default."""
        return {}

    def tensorboard_scalars(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """Scalar tags (``"loss/all"``, ``"pr/f1"``...) for TensorBoard; default ``metrics/<key>``."""
        return {f"metrics/{key}": float(value) for key, value in metrics.items()}

    def log_extra(self, writer: Any, mode: str, epoch: int, outputs: Outputs, samples_seen: int) -> None:
        """Extra TensorBoard output (curves, histograms, images); ``mode`` is "trn" or "val"."""

    def hparams(self) -> dict[str, Any]:
        """Task-specific hyperparameters for TensorBoard's HParams view."""
        return {}

    @property
    def calibrates(self) -> bool:
        """Whether the run ends by fitting a calibration to the best checkpoint
        (:mod:`p2ch_luna.training.calibrate`)."""
        return False

    @property
    def calibration_method(self) -> str:
        """What that calibration fits (one of :data:`p2ch_luna.metrics.calibration.CALIBRATION_METHODS`)."""
        return "platt"


def build_loader(
    dataset: Dataset,
    sampler: Sampler[int],
    context: RunContext,
    batch_size: int | None = None,
    drop_last: bool = False,
    ring: bool = False,
) -> Iterable[Batch]:
    """A DataLoader of dict batches with pinned memory on CUDA and persistent workers.

    ``sampler`` decides the order and the rank's shard; the dataset items are
    dicts collated by ``default_collate`` (strings become lists), or whole
    batches from a dataset's ``__getitems__`` (passed through). With ``ring``
    (``--batch-ring``) the workers write into a :class:`~p2ch_luna.data.batch_ring.RingLoader`'s
    shared buffers instead: same batches, large arrays already on the device.
    """
    config = context.config
    workers = config.num_workers
    batch_size = batch_size or config.batch_size
    if ring:
        if not isinstance(dataset, RingDataset):
            raise ValueError(f"a batch ring needs a RingDataset, not {type(dataset).__name__}")
        try:
            return RingLoader(dataset, sampler, batch_size, workers, context.device, drop_last=drop_last)
        except SharedMemoryShortage as shortage:
            if config.batch_ring is not None:  # asked for: the clear error
                raise
            log.warning("no batch ring: it needs %.2f GiB of shared memory and %.2f GiB are free; using the plain "
                        "loader (--no-batch-ring says so and silences this)", shortage.needed / 2**30,
                        shortage.free / 2**30)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=context.device.type == "cuda",
        persistent_workers=workers > 0,
        drop_last=drop_last,
        collate_fn=collate_batch,
    )


def uses_batch_ring(config: TrainConfig, device: torch.device) -> bool:
    """Whether a task's training loader writes into a batch ring: as ``--batch-ring``/``--no-batch-ring`` says,
    else (``config.batch_ring`` None) on CUDA with loader workers.

    On a GPU the ring speeds the classifier's training loop up markedly (``python -m bench.bench_gpu``); on
    the CPU the augmentation sets the rate and the ring gains next to nothing (``python -m bench.bench_input``),
    so it stays off there by default. Figures: docs/benchmarks.md.
    """
    if config.batch_ring is not None:
        return config.batch_ring
    return device.type == "cuda" and config.num_workers >= 1


def collate_batch(batch: Any) -> Any:
    """``default_collate``, except that a batch a dataset collated itself (a dict) passes through."""
    if isinstance(batch, dict):
        return batch
    return default_collate(batch)
