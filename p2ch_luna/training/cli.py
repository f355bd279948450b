"""Train a task: ``python -m p2ch_luna.training {nodule,malignancy,segmentation} [options]``.

Examples::

    python -m p2ch_luna.training nodule --epochs 10 --balanced --augmented
    python -m p2ch_luna.training malignancy --finetune models/nodule_..best.state --finetune-depth 2
    python -m p2ch_luna.training segmentation --epochs 20 --augmented
    torchrun --nproc-per-node 4 -m p2ch_luna.training nodule ...        # DDP, one GPU per process

``--batch-size`` is per process; with torchrun the global batch is
``batch-size x processes`` and each process trains on its own shard of every
epoch. Multi-node runs use torchrun's own ``--nnodes``/``--rdzv-*`` flags.

Outputs (rank 0 only), named by the run's start time and ``--comment``:

- ``<models-dir>/<task>_<time>_<comment>.best.state``: highest validation score
  (the task's ``score_name``: ROC AUC for the classifiers), and ``.last.state``
  (every epoch); ``.config.json``: the resolved configuration;
- ``<runs-dir>/<tb-prefix>/<time>-<trn|val>-<task>-<comment>``: TensorBoard.

``--resume PATH`` (a ``.last.state``) continues that run: same configuration
(except --epochs, --device, --num-workers, --batch-ring, --compile and the folders, taken from
this command line), weights, optimizer state, epoch count, samples seen,
per-epoch seeds and run names.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from p2ch_luna.cli import EXIT_INTERRUPTED, HelpFormatter, add_device_argument, make_parser, run_command
from p2ch_luna.data.augment import BOOK_NOISE_HU, BOOK_OFFSET, BOOK_SCALE, AugmentConfig
from p2ch_luna.data.sampling import make_generator, set_sampler_epoch
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
from p2ch_luna.models.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from p2ch_luna.models.layout import channels_last
from p2ch_luna.paths import paths_from_args
from p2ch_luna.precision import amp_settings, tune_backends, warn_if_emulated
from p2ch_luna.training import tensorboard as tblog
from p2ch_luna.training.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_COMMENT,
    DEFAULT_LEARNING_RATE,
    DEFAULT_MOMENTUM,
    DEFAULT_TB_PREFIX,
    OPTIMIZERS,
    TrainConfig,
    config_to_dict,
)
from p2ch_luna.training.engine import EpochResult, evaluate, train_one_epoch
from p2ch_luna.training.tasks import TASK_CLASSES, RunContext, Task, get_task_class

log = logging.getLogger(__name__)

RUN_TIME_FORMAT = "%Y-%m-%d_%H.%M.%S"
COMMENT_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")
CUDA_LOADER_WORKERS = 8
"""Default ``--num-workers`` on CUDA: 8 workers fed the classifier faster than 16 on a 16-core GPU machine
(``python -m bench.bench_gpu --worker-sweep``; figures in docs/benchmarks.md)."""
RESUME_OVERRIDES = ("epochs", "device", "num_workers", "batch_ring", "compile", "paths", "resume")
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


# --- command line ---------------------------------------------------------------------


def build_parser(selected_task: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``selected_task``'s own options are added (its module is imported lazily)."""
    parser = make_parser("p2ch_luna.training", "Train the nodule or malignancy classifier or the segmenter.",
                         paths=False)
    subparsers = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    for name in TASK_CLASSES:
        sub = subparsers.add_parser(name, help=f"train the {name} model",
                                    formatter_class=HelpFormatter)
        add_training_arguments(sub)
        if name == selected_task:
            get_task_class(name).add_arguments(sub)
    return parser


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every task shares (plus the folder and logging flags, after the task name)."""
    from p2ch_luna.paths import add_path_arguments

    add_path_arguments(parser)
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], default=argparse.SUPPRESS,
                        help="logging verbosity")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show full tracebacks on errors")
    run = parser.add_argument_group("run")
    run.add_argument("--epochs", type=int, default=1, help="number of epochs (in total, also with --resume)")
    run.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="samples per batch, per process")
    run.add_argument("--num-workers", type=int, default=None,
                     help="DataLoader worker processes per training process (0: load in the training process, "
                          f"best on a few CPUs). Default: 0 on the CPU; on CUDA {CUDA_LOADER_WORKERS}, or fewer "
                          "where the machine's cores, shared by the processes on it, are fewer")
    run.add_argument("--batch-ring", action=argparse.BooleanOptionalAction, default=None,
                     help="the workers write training batches into a reused ring of shared-memory buffers "
                          "(page-locked on CUDA) instead of fresh shared memory per batch, so the training "
                          "process no longer copies or pins them; same batches (needs --num-workers >= 1). "
                          "Default: on on CUDA with workers")
    run.add_argument("--epoch-size", type=int, default=None, help="training samples per epoch (default: dataset size)")
    run.add_argument("--val-size", type=int, default=None, help="cap on validation samples (default: all)")
    run.add_argument("--val-stride", type=int, default=10, help="every N-th series (sorted by UID) is validation")
    run.add_argument("--val-every", type=int, default=1, help="validate every N epochs (and after the last)")
    run.add_argument("--seed", type=int, default=0, help="seed of initialisation, sampling and augmentation")
    add_device_argument(run)
    run.add_argument("--amp", action="store_true",
                     help="mixed precision: bfloat16 autocast (CPU, recent GPUs), else float16 with a GradScaler")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                     help="channels-last memory layout (on the CPU, 3D convolution backward is several times "
                          "faster in it)")
    run.add_argument("--model", default=None, help="registry name of the model (default: the task's)")
    run.add_argument("--model-kwargs", default="{}", metavar="JSON",
                     help='model constructor arguments, e.g. \'{"conv_channels": 16}\'')
    run.add_argument("--tb-prefix", default=DEFAULT_TB_PREFIX, help="TensorBoard folder under --runs-dir")
    run.add_argument("--comment", default=DEFAULT_COMMENT, help="suffix of the run's names ([A-Za-z0-9._-])")
    run.add_argument("--resume", type=Path, default=None, metavar="PATH", help="continue the run of this .last.state")

    sampling = parser.add_argument_group("sampling")
    balance = sampling.add_mutually_exclusive_group()
    balance.add_argument("--balanced", action="store_const", const=1, dest="ratio", default=0,
                         help="one negative per positive (same as --ratio 1)")
    balance.add_argument("--ratio", type=int, default=0, metavar="N",
                         help="N negatives per positive in each training epoch (0: natural mix)")

    optim = parser.add_argument_group("optimizer")
    optim.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="default: the task's (book's) choice")
    optim.add_argument("--lr", type=float, default=DEFAULT_LEARNING_RATE, help="learning rate")
    optim.add_argument("--momentum", type=float, default=DEFAULT_MOMENTUM, help="SGD momentum")
    optim.add_argument("--weight-decay", type=float, default=0.0, help="weight decay")
    optim.add_argument("--grad-accumulation", type=int, default=1, metavar="N",
                       help="split each batch into N micro-batches and sum their gradients")

    augment = parser.add_argument_group("augmentation (on the training device, per sample)")
    augment.add_argument("--augmented", action="store_true", help="all of the task's book augmentations")
    augment.add_argument("--augment-flip", action="store_true", help="random mirroring")
    augment.add_argument("--augment-offset", type=float, nargs="?", const=BOOK_OFFSET, default=None,
                         metavar="FRACTION", help=f"random shift (fraction of the half-width; {BOOK_OFFSET})")
    augment.add_argument("--augment-scale", type=float, nargs="?", const=BOOK_SCALE, default=None,
                         metavar="FRACTION", help=f"random zoom in 1 +- FRACTION ({BOOK_SCALE})")
    augment.add_argument("--augment-rotate", action="store_true", help="random rotation about the index axis")
    augment.add_argument("--augment-noise", type=float, nargs="?", const=BOOK_NOISE_HU, default=None,
                         metavar="HU", help=f"Gaussian noise of this standard deviation ({BOOK_NOISE_HU:g} HU)")


def config_from_args(args: argparse.Namespace, task_class: type[Task]) -> TrainConfig:
    """Check the arguments and build the frozen :class:`TrainConfig`."""
    for flag in ("epochs", "batch_size", "grad_accumulation", "val_stride", "val_every"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, not {getattr(args, flag)}")
    for flag in ("epoch_size", "val_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, not {value}")
    num_workers = args.num_workers
    if num_workers is None:
        num_workers = default_num_workers(args.device, torch.cuda.is_available(), usable_cpu_count(),
                                          distributed_info_from_env().local_world_size)
    if args.ratio < 0 or num_workers < 0:
        raise UsageError("--ratio and --num-workers must be >= 0")
    if args.batch_ring and num_workers < 1:
        raise UsageError("--batch-ring needs --num-workers >= 1 (the workers write into the ring)")
    if args.batch_size % args.grad_accumulation:
        raise UsageError(f"--batch-size {args.batch_size} is not a multiple of --grad-accumulation "
                         f"{args.grad_accumulation}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UsageError(f"--lr must be a positive number, not {args.lr}")
    if not COMMENT_PATTERN.match(args.comment):
        raise UsageError(f"--comment {args.comment!r} may only hold letters, digits, '.', '_' and '-'")
    try:
        model_kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as error:
        raise UsageError(f"--model-kwargs is not JSON: {error}") from None
    if not isinstance(model_kwargs, dict):
        raise UsageError("--model-kwargs must be a JSON object")
    return TrainConfig(
        task=args.task,
        paths=paths_from_args(args),
        epochs=args.epochs,
        batch_size=args.batch_size,
        num_workers=num_workers,
        batch_ring=args.batch_ring,
        ratio=args.ratio,
        augment=augment_from_args(args, task_class),
        optimizer=args.optimizer or task_class.default_optimizer,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        grad_accumulation=args.grad_accumulation,
        epoch_size=args.epoch_size,
        val_size=args.val_size,
        val_stride=args.val_stride,
        val_every=args.val_every,
        seed=args.seed,
        device=args.device,
        amp=args.amp,
        compile=args.compile,
        channels_last=args.channels_last,
        model=args.model or task_class.default_model,
        model_kwargs=model_kwargs,
        tb_prefix=args.tb_prefix,
        comment=args.comment,
        resume=args.resume.expanduser().resolve() if args.resume else None,
        task_options=task_class.options_from_args(args),
    )


def augment_from_args(args: argparse.Namespace, task_class: type[Task]) -> AugmentConfig:
    """``--augmented`` gives the task's book set; each ``--augment-*`` flag sets its own part."""
    config = task_class.book_augment() if args.augmented else AugmentConfig.none()
    changes: dict[str, Any] = {}
    if args.augment_flip:
        changes["flip"] = True
    if args.augment_rotate:
        changes["rotate"] = True
    for name in ("offset", "scale", "noise"):
        value = getattr(args, f"augment_{name}")
        if value is not None:
            if value < 0:
                raise UsageError(f"--augment-{name} must be >= 0, not {value}")
            changes[name] = value
    return dataclasses.replace(config, **changes)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    selected = next((token for token in arguments if token in TASK_CLASSES), None)
    parser = build_parser(selected)
    return run_command(_body, parser, arguments)


def _body(args: argparse.Namespace) -> int:
    task_class = get_task_class(args.task)
    config = config_from_args(args, task_class)
    try:
        result = run_training(config)
    except KeyboardInterrupt:
        print("p2ch_luna.training: interrupted; the last completed epoch's checkpoint is kept "
              "(continue with --resume <its .last.state>)", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result is not None:
        print(f"best checkpoint: {result.best_path}")
        print(f"last checkpoint: {result.last_path}")
        print(f"tensorboard: {result.run_dirs['trn']} {result.run_dirs['val']}")
    return 0


def default_num_workers(device: str, cuda_available: bool, cpu_count: int, processes_here: int) -> int:
    """``--num-workers`` when not given: 0 on the CPU (the model step uses every core); on CUDA
    ``CUDA_LOADER_WORKERS``, capped so that the ``processes_here`` training processes on this machine and
    their workers fit its ``cpu_count`` cores."""
    on_cuda = device.startswith("cuda") or (device == "auto" and cuda_available)
    if not on_cuda:
        return 0
    cores_per_process = cpu_count // max(processes_here, 1)
    return max(0, min(CUDA_LOADER_WORKERS, cores_per_process - 1))


def usable_cpu_count() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# --- training -------------------------------------------------------------------------


def run_training(config: TrainConfig, show_progress: bool = True) -> TrainingResult | None:
    """Run (or resume) training; returns the outputs on rank 0 and None on other ranks."""
    info = distributed_info_from_env()
    device = resolve_device(config.device, info)
    init_distributed(info, device)
    try:
        return _train(config, info, device, show_progress)
    finally:
        shutdown_distributed()


def _train(config: TrainConfig, info: DistributedInfo, device: torch.device,
           show_progress: bool) -> TrainingResult | None:
    task_class = get_task_class(config.task)
    resumed = _load_resume(config) if config.resume else None
    if resumed is not None:
        config = resumed_config(config, resumed["config"])
    names = _run_names(config, resumed)

    torch.manual_seed(config.seed)
    tune_backends(device)
    context = RunContext(config=config, device=device, rank=info.rank, world_size=info.world_size)
    task = task_class(context)
    spec = task.build_model()
    model = spec.model
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
    best_score = float(resumed.get("best_score", -math.inf)) if resumed else -math.inf
    best_epoch = int(resumed.get("best_epoch", 0)) if resumed else 0

    paths = config.paths
    run_dirs = tblog.run_dirs(paths.runs_dir, names.tb_prefix, names.time, names.task, names.comment)
    last_path = checkpoint_path(paths.models_dir, names.task, names.time, names.comment, best=False)
    best_path = checkpoint_path(paths.models_dir, names.task, names.time, names.comment, best=True)
    writers: dict[str, Any] = {}
    config_dict = config_to_dict(config)
    if info.is_main:
        atomic_write_text(last_path.with_name(last_path.name.removesuffix(".last.state") + CONFIG_SUFFIX),
                          json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        writers = tblog.open_writers(run_dirs)
        if resumed is None:
            tblog.add_config_text(writers["trn"], config_dict)
        log.info("%s run %s: %d epoch(s) from epoch %d on %s (%d process(es)); model %s %s",
                 names.task, names.time, config.epochs, start_epoch, device, info.world_size,
                 spec.model_name, spec.model_kwargs)

    train_loader = task.train_loader()
    val_loader = task.val_loader()
    val_metrics: dict[str, float] = {}
    epoch = start_epoch - 1
    try:
        for epoch in range(start_epoch, config.epochs + 1):
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
                val_metrics = val.metrics
                _report(task, writers, "val", epoch, val, samples_seen)
                score = task.score(val.metrics)
                is_best = score > best_score or best_epoch == 0
                if is_best:
                    best_score, best_epoch = score, epoch
            if info.is_main:
                extra = {
                    "run": dataclasses.asdict(names),
                    "score_name": task.score_name,
                    "best_score": best_score,
                    "best_epoch": best_epoch,
                    "scaler_state": scaler.state_dict() if scaler is not None else None,
                }
                saved = dict(model=model, model_name=spec.model_name, model_kwargs=spec.model_kwargs,
                             task=names.task, optimizer=optimizer, epoch=epoch, samples_seen=samples_seen,
                             config=config_dict, metrics=val_metrics, extra=extra)
                # Best first: a crash between the two writes never leaves a .last.state whose
                # best_epoch has no .best.state (a resumed run would not write it again).
                if is_best:
                    save_checkpoint(best_path, **saved)
                    log.info("E%d new best %s %.4f", epoch, task.score_name, best_score)
                save_checkpoint(last_path, **saved)
            barrier()
    finally:
        if writers:
            if val_metrics:
                hparams = {**_hparams(config), **task.hparams()}
                tblog.add_hparams(writers["val"], hparams, {**val_metrics, "best_score": best_score})
            for writer in writers.values():
                writer.close()
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
    return restored


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


if __name__ == "__main__":
    sys.exit(main())
