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
  (nodules: LUNA16 CPM of the validation candidates, ties by ROC AUC, then the lower loss; malignancy: ROC AUC;
  segmentation: ``--score-metric``; the classifiers' also holds the temperature fitted on the
  validation set after training unless ``--no-calibrate``), and ``.last.state``
  (every epoch); ``.config.json``: the resolved configuration;
- ``<runs-dir>/<tb-prefix>/<time>-<trn|val>-<task>-<comment>``: TensorBoard.

``--resume PATH`` (a ``.last.state``) continues that run: same configuration
(except --epochs, --device, --num-workers, --batch-ring, --compile, --kernels and the folders, taken from
this command line), weights, optimizer state, epoch count, samples seen,
per-epoch seeds and run names.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from p2ch_luna.cli import EXIT_INTERRUPTED, HelpFormatter, add_device_argument, make_parser, run_command
from p2ch_luna.data.augment import BOOK_NOISE_HU, BOOK_OFFSET, BOOK_SCALE, AugmentConfig
from p2ch_luna.data.folds import fold_argument
from p2ch_luna.distributed import (
    distributed_info_from_env,
)
from p2ch_luna.errors import UsageError
from p2ch_luna.kernels.choice import add_kernels_argument, uses_triton
from p2ch_luna.paths import paths_from_args
from p2ch_luna.training.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_COMMENT,
    DEFAULT_LEARNING_RATE,
    DEFAULT_MOMENTUM,
    DEFAULT_TB_PREFIX,
    OPTIMIZERS,
    TrainConfig,
)
from p2ch_luna.training.loop import TrainingInterrupted, run_training
from p2ch_luna.training.tasks import TASK_CLASSES, Task, get_task_class

log = logging.getLogger(__name__)

RECIPE_COMMAND = "all"
"""``python -m p2ch_luna.training all``: :mod:`p2ch_luna.training.recipe`."""
COMMENT_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")
CUDA_LOADER_WORKERS = 8
"""Default ``--num-workers`` on CUDA: 8 workers fed the classifier faster than 16 on a 16-core GPU machine
(``python -m bench.bench_gpu --worker-sweep``; figures in docs/benchmarks.md)."""


def build_parser(selected_task: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``selected_task``'s own options are added (its module is imported lazily)."""
    parser = make_parser("p2ch_luna.training", "Train the nodule or malignancy classifier or the segmenter.",
                         paths=False)
    subparsers = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    subparsers.add_parser(RECIPE_COMMAND, add_help=False,
                          help="the whole recipe in order (cache, segmenter, nodule classifier on mined hard "
                               "negatives, calibration, malignancy), resumable, with an optional --minutes "
                               "budget: python -m p2ch_luna.training all --help")
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
    run.add_argument("--max-minutes", type=float, default=None, metavar="M",
                     help="wall-clock budget of the run: no epoch is begun that would end (as long as the longest "
                          "so far, validation included) past M minutes from the start; at least one epoch runs, "
                          "and the best and last checkpoints are those of the epochs done (default: no limit)")
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
    run.add_argument("--fold", type=fold_argument, default=None, metavar="K",
                     help="hold out LUNA16's official fold K (0-9: the series in <data-root>/subsetK/) instead of "
                          "every --val-stride-th series; the checkpoints record the fold and its series")
    run.add_argument("--val-every", type=int, default=1, help="validate every N epochs (and after the last)")
    run.add_argument("--seed", type=int, default=0, help="seed of initialisation, sampling and augmentation")
    add_device_argument(run)
    run.add_argument("--amp", action="store_true",
                     help="mixed precision: bfloat16 autocast (CPU, recent GPUs), else float16 with a GradScaler")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    add_kernels_argument(run)
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
    if args.max_minutes is not None and not (args.max_minutes > 0 and math.isfinite(args.max_minutes)):
        raise UsageError(f"--max-minutes must be a positive number, not {args.max_minutes}")
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
        max_minutes=args.max_minutes,
        batch_size=args.batch_size,
        num_workers=num_workers,
        batch_ring=args.batch_ring,
        ratio=args.ratio,
        augment=dataclasses.replace(augment_from_args(args, task_class), fused=uses_triton(args.kernels)),
        optimizer=args.optimizer or task_class.default_optimizer,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        grad_accumulation=args.grad_accumulation,
        epoch_size=args.epoch_size,
        val_size=args.val_size,
        val_stride=args.val_stride,
        fold=args.fold,
        val_every=args.val_every,
        seed=args.seed,
        device=args.device,
        amp=args.amp,
        compile=args.compile,
        channels_last=args.channels_last,
        kernels=args.kernels,
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
    selected = next((token for token in arguments if token in (*TASK_CLASSES, RECIPE_COMMAND)), None)
    if selected == RECIPE_COMMAND:
        from p2ch_luna.training import recipe

        arguments.remove(RECIPE_COMMAND)
        return recipe.main(arguments, train=main)
    parser = build_parser(selected)
    return run_command(_body, parser, arguments)


def _body(args: argparse.Namespace) -> int:
    task_class = get_task_class(args.task)
    config = config_from_args(args, task_class)
    try:
        result = run_training(config)
    except TrainingInterrupted as stop:
        if stop.last_path is not None:
            print(f"p2ch_luna.training: interrupted; the last completed epoch's checkpoint is kept: {stop.last_path} "
                  "(continue with --resume)", file=sys.stderr)
        else:
            print("p2ch_luna.training: interrupted before the first checkpoint; none was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("p2ch_luna.training: interrupted before training began; no checkpoint was written", file=sys.stderr)
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




if __name__ == "__main__":
    sys.exit(main())
