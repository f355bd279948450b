"""The training run behind ``python -m p2ch_luna.training``: set up (or resume) a task, its model and optimizer
on this process's device and rank, train and validate epoch by epoch, write checkpoints, the resolved config
and TensorBoard events (rank 0), and stop on a non-finite loss without saving that epoch. A classifier's run
ends by storing a calibration temperature in its best checkpoint (:mod:`p2ch_luna.training.calibrate`).

The command line that builds its :class:`~p2ch_luna.training.config.TrainConfig` is :mod:`p2ch_luna.training.cli`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import logging
import math
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from p2ch_luna.data.sampling import make_generator, set_sampler_epoch
from p2ch_luna.data.series_split import SPLIT_KEY, check_resumed_split, recorded_split, split_record
from p2ch_luna.distributed import (
    DistributedInfo,
    barrier,
    broadcast_buffers,
    broadcast_object,
    distributed_info_from_env,
    init_distributed,
    resolve_device,
    shutdown_distributed,
)
from p2ch_luna.errors import DataError, UsageError
from p2ch_luna.io.atomic import atomic_write_text
from p2ch_luna.kernels.choice import check_kernels
from p2ch_luna.models.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from p2ch_luna.models.classifier import select_kernels
from p2ch_luna.models.layout import channels_last
from p2ch_luna.precision import amp_settings, tune_backends, warn_if_emulated
from p2ch_luna.training import tensorboard as tblog
from p2ch_luna.training.calibrate import calibrate_best_checkpoint
from p2ch_luna.training.config import (
    OPTIMIZERS,
    TrainConfig,
    config_to_dict,
)
from p2ch_luna.training.engine import EpochResult, evaluate, train_one_epoch
from p2ch_luna.training.selection import Scores, is_better
from p2ch_luna.training.tasks import RunContext, Task, get_task_class

log = logging.getLogger(__name__)

RUN_TIME_FORMAT = "%Y-%m-%d_%H.%M.%S"

RESUME_OVERRIDES = ("epochs", "max_minutes", "device", "num_workers", "batch_ring", "compile", "kernels", "paths",
                    "resume")
"""Config fields that ``--resume`` takes from the command line instead of the checkpoint."""

CONFIG_SUFFIX = ".config.json"


@dataclasses.dataclass(frozen=True)
class RunNames:
    """What names a run's outputs: start time, task, TensorBoard prefix and comment."""

    time: str
    task: str
    tb_prefix: str
    comment: str


@dataclasses.dataclass
class TrainingResult:
    """Where a run left its outputs and its last validation metrics."""

    best_path: Path | None
    last_path: Path | None
    run_dirs: dict[str, Path]
    epochs_done: int
    samples_seen: int
    best_score: float
    val_metrics: dict[str, float]


def run_training(config: TrainConfig, show_progress: bool = True) -> TrainingResult | None:
    """Run (or resume) training; returns the outputs on rank 0 and None on other ranks."""
    info = distributed_info_from_env()
    device = resolve_device(config.device, info)
    init_distributed(info, device)
    try:
        return _train(config, info, device, show_progress)
    finally:
        shutdown_distributed()


def next_epoch_fits(elapsed_s: float, longest_epoch_s: float, max_minutes: float | None) -> bool:
    """Whether another epoch, as long as the longest so far (validation included), ends within ``max_minutes``
    of the run's start, ``elapsed_s`` ago (always, without a limit)."""
    return max_minutes is None or elapsed_s + longest_epoch_s <= 60.0 * max_minutes


def _train(config: TrainConfig, info: DistributedInfo, device: torch.device,
           show_progress: bool) -> TrainingResult | None:
    run_started = time.perf_counter()
    task_class = get_task_class(config.task)
    resumed = _load_resume(config) if config.resume else None
    if resumed is not None:
        config = resumed_config(config, resumed["config"])
    names = _run_names(config, resumed)

    check_kernels(config.kernels, device)
    torch.manual_seed(config.seed)
    tune_backends(device)
    context = RunContext(config=config, device=device, rank=info.rank, world_size=info.world_size)
    task = task_class(context)
    spec = task.build_model()
    model = select_kernels(spec.model, config.kernels)
    if resumed is not None:
        model.load_state_dict(resumed["model_state"])
    place_model(model, config, device)
    optimizer = build_optimizer(model, config)
    warn_if_emulated(config.amp, device)
    amp = amp_settings(config.amp, device)
    scaler = torch.amp.GradScaler(device.type) if amp.needs_scaler else None
    if resumed is not None:
        _restore_training_state(resumed, optimizer, scaler)
    train_model: nn.Module = model
    if info.is_distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        train_model = torch.compile(train_model)
    # Validation runs on the plain model: ranks may have unequal numbers of validation
    # batches, and DDP's forward is a collective call.
    eval_model = model if info.is_distributed else train_model

    start_epoch = int(resumed["epoch"]) + 1 if resumed else 1
    samples_seen = int(resumed["samples_seen"]) if resumed else 0
    best_scores = resumed_best_scores(resumed, task.selection()) if resumed else None
    best_score = best_scores.ranked()[0] if best_scores is not None else -math.inf
    best_epoch = int(resumed.get("best_epoch", 0)) if resumed else 0

    paths = config.paths
    run_dirs = tblog.run_dirs(paths.runs_dir, names.tb_prefix, names.time, names.task, names.comment)
    last_path = checkpoint_path(paths.models_dir, names.task, names.time, names.comment, best=False)
    best_path = checkpoint_path(paths.models_dir, names.task, names.time, names.comment, best=True)
    config_path = last_path.with_name(last_path.name.removesuffix(".last.state") + CONFIG_SUFFIX)
    writers: dict[str, Any] = {}
    config_dict = config_to_dict(config)
    # A fresh run that stops before its first checkpoint (bad data, Ctrl-C) removes what it wrote; a resumed
    # run's config and event folders are the earlier run's, and stay.
    outputs = RunOutputs(config_path, tuple(run_dirs.values()), (paths.models_dir, paths.runs_dir / names.tb_prefix)
                         ) if info.is_main and resumed is None else None
    if info.is_main:
        require_writable(paths.models_dir, "--models-dir")
        require_writable(paths.runs_dir, "--runs-dir")
    train_loader: Iterable[Any] | None = None
    val_loader: Iterable[Any] | None = None
    val_metrics: dict[str, float] = {}
    epoch = start_epoch - 1
    checkpointed = False
    try:
        if info.is_main:
            atomic_write_text(config_path, json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
            writers = tblog.open_writers(run_dirs)
            if resumed is None:
                tblog.add_config_text(writers["trn"], config_dict)
            log.info("%s run %s: %d epoch(s) from epoch %d on %s (%d process(es)); model %s %s",
                     names.task, names.time, config.epochs, start_epoch, device, info.world_size,
                     spec.model_name, spec.model_kwargs)
        train_loader = task.train_loader()
        val_loader = task.val_loader()
        if resumed is not None:
            check_resumed_split(recorded_split(resumed, config.resume), task.series_split(), config.resume)
        longest_epoch_s = 0.0
        for epoch in range(start_epoch, config.epochs + 1):
            epoch_started = time.perf_counter()
            set_sampler_epoch(train_loader, epoch)
            task.set_epoch(epoch)
            generator = make_generator(config.seed, epoch, device, info.rank)
            trn = train_one_epoch(
                task, train_model, optimizer, train_loader, epoch=epoch, device=device, generator=generator,
                amp=amp, scaler=scaler, grad_accumulation=config.grad_accumulation,
                show_progress=show_progress and info.is_main)
            samples_seen += trn.samples
            _report(task, writers, "trn", epoch, trn, samples_seen)
            validate = epoch % config.val_every == 0 or epoch == config.epochs
            is_best = False
            if validate:
                broadcast_buffers(model)
                val = evaluate(task, eval_model, val_loader, epoch=epoch, device=device, generator=generator,
                               amp=amp, show_progress=show_progress and info.is_main)
                val.metrics.update(task.validation_metrics(val.outputs))
                val.metrics.update(broadcast_object(task.model_metrics(model) if info.is_main else None))
                val_metrics = val.metrics
                _report(task, writers, "val", epoch, val, samples_seen)
                scores = Scores.from_metrics(val.metrics, task.selection())
                is_best = is_better(scores, best_scores) or best_epoch == 0
                if is_best:
                    best_scores, best_score, best_epoch = scores, scores.ranked()[0], epoch
            if info.is_main:
                extra = {
                    "run": dataclasses.asdict(names),
                    "score_name": task.selection()[0],
                    "best_score": best_score,
                    "selection": list(best_scores.names) if best_scores is not None else None,
                    "best_scores": list(best_scores.values) if best_scores is not None else None,
                    "best_epoch": best_epoch,
                    "scaler_state": scaler.state_dict() if scaler is not None else None,
                    SPLIT_KEY: split_record(task.series_split()),
                }
                saved = dict(model=model, model_name=spec.model_name, model_kwargs=spec.model_kwargs,
                             task=names.task, optimizer=optimizer, epoch=epoch, samples_seen=samples_seen,
                             config=config_dict, metrics=val_metrics, extra=extra)
                # Best first: a crash between the two writes never leaves a .last.state whose
                # best_epoch has no .best.state (a resumed run would not write it again).
                if is_best:
                    save_checkpoint(best_path, **saved)
                    log.info("E%d new best: %s", epoch, best_scores.describe())
                save_checkpoint(last_path, **saved)
                checkpointed = True
            barrier()
            longest_epoch_s = max(longest_epoch_s, time.perf_counter() - epoch_started)
            fits = next_epoch_fits(time.perf_counter() - run_started, longest_epoch_s, config.max_minutes)
            if epoch < config.epochs and not broadcast_object(fits):
                log.info("E%d: stopping, %d epoch(s) early: another epoch (%.0f s) would end past --max-minutes %g",
                         epoch, config.epochs - epoch, longest_epoch_s, config.max_minutes)
                break
        calibrate_best_checkpoint(task, best_path, val_loader, device=device, amp=amp, writer=writers.get("val"),
                                  samples_seen=samples_seen)
    except BaseException as error:
        # The failed frames hold the loaders' iterators: cleared, the workers stop below, before the error is
        # reported (not later, from a finaliser that would print a traceback of its own).
        with _teardown_errors_logged():
            traceback.clear_frames(error.__traceback__)
            train_loader = val_loader = None
            gc.collect()  # the batch ring and its sampler refer to each other
        if outputs is not None and not checkpointed:
            _close_writers(writers)
            writers = {}
            outputs.remove()
        if isinstance(error, KeyboardInterrupt) and not isinstance(error, TrainingInterrupted):
            raise TrainingInterrupted(last_path if info.is_main and last_path.exists() else None) from error
        raise
    finally:
        if writers:
            if val_metrics:
                hparams = {**_hparams(config), **task.hparams()}
                tblog.add_hparams(writers["val"], hparams, {**val_metrics, "best_score": best_score})
            _close_writers(writers)
    if not info.is_main:
        return None
    return TrainingResult(
        best_path=best_path if best_path.exists() else None,
        last_path=last_path if last_path.exists() else None,
        run_dirs=run_dirs,
        epochs_done=epoch,
        samples_seen=samples_seen,
        best_score=best_score,
        val_metrics=val_metrics,
    )


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; ``last_path`` is its last checkpoint (to ``--resume``), None when it wrote none."""

    def __init__(self, last_path: Path | None) -> None:
        super().__init__()
        self.last_path = last_path


@dataclasses.dataclass(frozen=True)
class RunOutputs:
    """What a fresh run writes before its first checkpoint: the config file, the TensorBoard run folders, and the
    folders above them that did not exist yet (``parents``, checked when the run starts)."""

    config_path: Path
    run_dirs: tuple[Path, ...]
    parents: tuple[Path, ...]
    missing: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        missing = {ancestor for parent in self.parents for ancestor in (parent, *parent.parents)
                   if not ancestor.exists()}
        object.__setattr__(self, "missing", tuple(sorted(missing, key=lambda path: len(path.parts), reverse=True)))

    def remove(self) -> None:
        """Delete the config file and the run folders, then the folders this run created, where empty."""
        self.config_path.unlink(missing_ok=True)
        for run_dir in self.run_dirs:
            shutil.rmtree(run_dir, ignore_errors=True)
        for folder in self.missing:
            with contextlib.suppress(OSError):  # not empty (another run's files) or already gone
                folder.rmdir()
        log.info("the run stopped before its first checkpoint: removed its config %s and event folders",
                 self.config_path)


def require_writable(folder: Path, flag: str) -> None:
    """Refuse ``folder`` (to be created where missing) unless this process may write there."""
    existing = next((path for path in (folder, *folder.parents) if path.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UsageError(f"{flag} {folder}: {existing} is not a folder")
    if existing is None or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {folder}: {existing or folder} is not writable")


@contextlib.contextmanager
def _teardown_errors_logged() -> Iterator[None]:
    """While the loaders of a failed run are collected, an error in their finalisers is one debug line, not a
    traceback: stopping the workers after one was killed meets the others' deaths as well (torch's
    ``DataLoader worker ... is killed`` from its SIGCHLD handler), which the run's own error already reports."""
    previous = sys.unraisablehook

    def log_unraisable(unraisable: Any) -> None:
        log.debug("while stopping the loader workers: %s: %s", type(unraisable.exc_value).__name__,
                  unraisable.exc_value)

    sys.unraisablehook = log_unraisable
    try:
        yield
    finally:
        sys.unraisablehook = previous


def _close_writers(writers: Mapping[str, Any]) -> None:
    for writer in writers.values():
        writer.close()


def place_model(model: nn.Module, config: TrainConfig, device: torch.device) -> nn.Module:
    """Move ``model`` to ``device`` (in place), in channels-last layout when ``config`` asks; returns it."""
    model.to(device)
    if config.channels_last:
        channels_last(model)
    return model


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (with momentum) or Adam over the parameters that require gradients."""
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if not parameters:
        raise UsageError("the model has no trainable parameters")
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    raise UsageError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, not {config.optimizer!r}")


def resumed_config(current: TrainConfig, saved: Mapping[str, Any]) -> TrainConfig:
    """The saved run's config, except the fields in :data:`RESUME_OVERRIDES` (from ``current``)."""
    if saved.get("task") != current.task:
        raise UsageError(f"--resume: the checkpoint is a {saved.get('task')} run, not {current.task}")
    restored = _restore_dataclass(current, {key: value for key, value in saved.items()
                                            if key not in RESUME_OVERRIDES})
    # The fused augmentation is part of the kernel choice, which this command line makes.
    return dataclasses.replace(restored, augment=dataclasses.replace(restored.augment, fused=current.augment.fused))


def _restore_dataclass(current: Any, saved: Mapping[str, Any]) -> Any:
    """``current`` with the saved values, converted to the types ``current`` holds."""
    changes = {}
    for field in dataclasses.fields(current):
        if field.name in saved:
            changes[field.name] = _restore_value(getattr(current, field.name), saved[field.name])
    return dataclasses.replace(current, **changes)


def _restore_value(current: Any, saved: Any) -> Any:
    if saved is None:
        return None
    if dataclasses.is_dataclass(current) and isinstance(saved, Mapping):
        return _restore_dataclass(current, saved)
    if isinstance(current, tuple) and isinstance(saved, list):
        return tuple(saved)
    if isinstance(current, Path):
        return Path(saved)
    return saved


def resumed_best_scores(raw: Mapping[str, Any], selection: Sequence[str]) -> Scores | None:
    """The best checkpoint's scores that a resumed run must beat; None (the next validation is the best) when
    the checkpoint ranked by other metrics than ``selection`` (written by a version with another rule)."""
    names = raw.get("selection") or [raw.get("score_name")]
    values = raw.get("best_scores") or [raw.get("best_score", -math.inf)]
    if tuple(names) != tuple(selection) or len(values) != len(names):
        log.info("--resume: the checkpoint's best was ranked by %s, this run ranks by %s: the next validation "
                 "epoch becomes the best", ", ".join(map(str, names)), ", ".join(selection))
        return None
    return Scores(tuple(selection), tuple(float(value) for value in values))


def _load_resume(config: TrainConfig) -> dict[str, Any]:
    loaded = load_checkpoint(config.resume, expected_task=config.task)
    raw = loaded.raw
    if loaded.is_book or "run" not in raw:
        raise DataError(f"--resume {config.resume}: not a checkpoint written by p2ch_luna.training")
    return raw


def _restore_training_state(raw: Mapping[str, Any], optimizer: torch.optim.Optimizer,
                            scaler: torch.amp.GradScaler | None) -> None:
    if raw.get("optimizer_state") is None:
        raise DataError("--resume: the checkpoint has no optimizer state")
    try:
        optimizer.load_state_dict(raw["optimizer_state"])
    except (ValueError, KeyError) as error:
        raise DataError(f"--resume: the optimizer state does not fit ({error})") from None
    if scaler is not None and raw.get("scaler_state"):
        scaler.load_state_dict(raw["scaler_state"])


def _run_names(config: TrainConfig, resumed: Mapping[str, Any] | None) -> RunNames:
    if resumed is not None:
        return RunNames(**resumed["run"])
    now = datetime.datetime.now().strftime(RUN_TIME_FORMAT)
    return RunNames(time=broadcast_object(now), task=config.task, tb_prefix=config.tb_prefix,
                    comment=config.comment)


def _report(task: Task, writers: Mapping[str, Any], mode: str, epoch: int, result: EpochResult,
            samples_seen: int) -> None:
    """One summary log line, TensorBoard scalars and the task's extra plots (rank 0)."""
    if not writers:
        return
    metrics = result.metrics
    shown = " ".join(f"{key} {metrics[key]:.4f}" for key in task.summary_keys if key in metrics)
    rate = result.samples / result.seconds if result.seconds > 0 else math.nan
    log.info("E%d %s %d samples in %.1fs (%.0f/s, %.0f%% waiting for input): %s", epoch, mode, result.samples,
             result.seconds, rate, 100 * result.input_wait_fraction, shown)
    writer = writers[mode]
    tblog.add_scalars(writer, task.tensorboard_scalars(metrics), samples_seen)
    writer.add_scalar("speed/samples_per_second", rate, samples_seen)
    writer.add_scalar("speed/input_wait_fraction", result.input_wait_fraction, samples_seen)
    task.log_extra(writer, mode, epoch, result.outputs, samples_seen)
    writer.flush()


def _hparams(config: TrainConfig) -> dict[str, Any]:
    augment = config.augment
    return {
        "task": config.task, "model": config.model, "optimizer": config.optimizer, "lr": config.lr,
        "batch_size": config.batch_size, "ratio": config.ratio, "epochs": config.epochs,
        "epoch_size": config.epoch_size or 0, "seed": config.seed, "amp": config.amp,
        "augment": ",".join(name for name, on in (("flip", augment.flip), ("offset", augment.offset),
                                                    ("scale", augment.scale), ("rotate", augment.rotate),
                                                    ("noise", augment.noise)) if on) or "none",
        "comment": config.comment,
    }
