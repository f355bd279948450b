"""Frozen configuration dataclasses built by ``python -m p2ch_luna.training``.

Code below the entry point takes a :class:`TrainConfig`, never argparse's
namespace. :func:`config_to_dict` gives the JSON-able form written next to a
run's outputs and stored in its checkpoints.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from pathlib import Path
from typing import Any

from p2ch_luna.data.augment import AugmentConfig
from p2ch_luna.kernels.choice import DEFAULT_KERNELS
from p2ch_luna.paths import Paths

DEFAULT_BATCH_SIZE = 32
DEFAULT_LEARNING_RATE = 1e-3
DEFAULT_MOMENTUM = 0.99
"""The book's SGD momentum (p2ch11-14)."""
DEFAULT_TB_PREFIX = "p2ch_luna"
DEFAULT_COMMENT = "dlwpt"
OPTIMIZERS = ("sgd", "adam")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; task-specific options live in ``task_options``.

    ``ratio`` is the number of negatives per positive in a training epoch
    (0: sample the natural, unbalanced distribution). ``epoch_size`` is the
    number of training samples per epoch over all processes (None: the
    dataset's size); ``val_size`` caps the validation samples (None: all).
    ``model`` None takes the task's default model (the entry point fills in the
    task's default optimizer too). ``batch_size`` is per process.
    """

    task: str
    paths: Paths
    epochs: int = 1
    max_minutes: float | None = None
    """``--max-minutes``: stop before an epoch that would end past this many minutes of the run (see
    :func:`p2ch_luna.training.loop.next_epoch_fits`); None: run every epoch."""
    batch_size: int = DEFAULT_BATCH_SIZE
    num_workers: int = 0
    batch_ring: bool | None = None
    """``--batch-ring``: None picks it where it applies (see ``tasks.base.uses_batch_ring``)."""
    ratio: int = 0
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    optimizer: str = "sgd"
    lr: float = DEFAULT_LEARNING_RATE
    momentum: float = DEFAULT_MOMENTUM
    weight_decay: float = 0.0
    grad_accumulation: int = 1
    epoch_size: int | None = None
    val_size: int | None = None
    val_stride: int = 10
    fold: int | None = None
    """``--fold K``: LUNA16's ``subsetK`` is validation instead of every ``val_stride``-th series."""
    val_every: int = 1
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    compile: bool = False
    channels_last: bool = True
    kernels: str = DEFAULT_KERNELS
    """``--kernels``: torch (cuDNN, torch's operators) or triton (the package's kernels on CUDA)."""
    model: str | None = None
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    tb_prefix: str = DEFAULT_TB_PREFIX
    comment: str = DEFAULT_COMMENT
    resume: Path | None = None
    task_options: Any = None
    """A frozen dataclass of the task's own options (see ``Task.options_from_args``)."""


def config_to_dict(config: Any) -> Any:
    """A JSON-able copy of a (nested) config dataclass: paths as strings, enums by value."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {field.name: config_to_dict(getattr(config, field.name)) for field in dataclasses.fields(config)}
    if isinstance(config, dict):
        return {str(key): config_to_dict(value) for key, value in config.items()}
    if isinstance(config, (list, tuple)):
        return [config_to_dict(value) for value in config]
    if isinstance(config, os.PathLike):
        return os.fspath(config)
    if isinstance(config, enum.Enum):
        return config.value
    return config
