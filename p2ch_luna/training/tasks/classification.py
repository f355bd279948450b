"""Nodule-vs-non-nodule and malignant-vs-benign classification of candidate chunks.

Both tasks read 1×32×48×48 int16 chunks from the chunk cache, convert them to
float and augment them batched on the training device, and train the book's
:class:`~p2ch_luna.models.LunaModel` with cross-entropy. The best malignancy checkpoint
is the one with the highest **validation ROC AUC**: threshold-free, so it is not
moved by the training ratio's effect on calibration (the book used F1 for
nodules, AUC for malignancy). The best nodule checkpoint is the one with the highest
**validation CPM** (LUNA16 FROC, what detection is judged on), ties broken by ROC AUC, then by the lower
validation loss (see :mod:`p2ch_luna.training.selection`).

The nodule FROC scores every validation row that was evaluated, grouped by series, against the
annotations of the validation series (``annotations.csv``, and ``annotations_excluded.csv`` when present)
with the LUNA16 radius rule; false positives per scan divide by the number of validation series. The rows
are those the validation loader reads, unbalanced: every annotated nodule at its annotated centre (so each
nodule has a mark at its centre, which makes the sensitivity an upper bound of what diagnosis finds) and
every non-nodule ``candidates.csv`` row of those series; ``--val-size`` evaluates an evenly spread subset of
them, and then the FROC scores that subset. Mined candidates never enter validation (validation series are
never mined), so with ``--hard-negatives-from`` the FROC still scores the ``candidates.csv`` rows.

Nodule training can add the candidates our own segmenter makes on the training series
(``--hard-negatives-from SEGMENTATION``, :mod:`p2ch_luna.mining`): those on a nodule as positives at the
grouping's centres, the rest as hard negatives, of which the balanced sampler draws
``--hard-negative-fraction`` of its negatives (``python -m bench.bench_generalisation`` measures the effect).
By default (``--hard-negative-sizes even``) each diameter bin of :data:`HARD_NEGATIVE_SIZE_EDGES_MM` is drawn
alike: most mined candidates are vessel specks under 4 mm, and drawn as they come the classifier would
rarely see the large, round, nodule-sized structures (the diaphragm's dome, the lung's apex) that rank
above nodules in diagnosis (docs/benchmarks.md, 'Hard negatives of every size').

Malignancy can fine-tune a nodule classifier (ours or the book's ``cls_*.state``),
as the book's chapter 14: ``--finetune PATH --finetune-depth N`` loads it,
re-initialises the head and trains only the last N parameterised blocks
(N = 1: the head only; 2: the head and the last convolution block).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from p2ch_luna.columns import CENTER_COLUMNS
from p2ch_luna.data.augment import augment_batch_3d
from p2ch_luna.data.cache import open_cache
from p2ch_luna.data.candidates import (
    CandidateDataset,
    add_mined_rows,
    drop_centres_outside,
    malignancy_table,
    mined_negatives,
    nodule_table,
    positive_count,
    split_table,
)
from p2ch_luna.data.folds import split_by_fold
from p2ch_luna.data.luna import read_candidate_table
from p2ch_luna.data.sampling import BalancedSampler, ShardedSequentialSampler, equal_bin_weights
from p2ch_luna.data.series_split import SeriesSplit
from p2ch_luna.distributed import barrier
from p2ch_luna.errors import DataError, UsageError
from p2ch_luna.evaluation.truth import Truth, read_truth
from p2ch_luna.io.ct import list_series_on_disk, read_geometry
from p2ch_luna.metrics.calibration import CALIBRATION_METHODS
from p2ch_luna.metrics.classification import classification_metrics
from p2ch_luna.models import build_model, load_checkpoint
from p2ch_luna.models.classifier import CHUNK_SHAPE_IRC
from p2ch_luna.models.weights import init_book_weights
from p2ch_luna.training.selection import CPM_KEY, FROC_KEYS, froc_metrics
from p2ch_luna.training.tasks.base import (
    Batch,
    ModelSpec,
    Outputs,
    RunContext,
    Task,
    build_loader,
    to_memory_format,
    uses_batch_ring,
)
from p2ch_luna.training.tensorboard import add_classification_curves

log = logging.getLogger(__name__)

HEAD_NAME = "head_linear"
FEW_VALIDATION_POSITIVES = 10
"""Below this many validation positives a run says that its model selection is a small-sample guess."""
DEFAULT_HARD_NEGATIVE_FRACTION = 0.5
"""Share of the negatives drawn from the mined candidates when ``--hard-negatives-from`` is given."""
HARD_NEGATIVE_SIZES = ("even", "natural")
HARD_NEGATIVE_SIZE_EDGES_MM = (4.0, 5.7, 8.0, 11.3, 16.0, 22.6)
"""Diameter bins of ``--hard-negative-sizes even``: under 4 mm, then steps of sqrt(2) (LUNA16's nodules are
3-30 mm)."""
BOOK_NON_NODULES_PER_BENIGN = 1.0
"""The book's malignancy mix: as many non-nodule candidates as benign nodules in the benign class."""


SELECT_BY = ("cpm", "roc_auc")
"""Choices of the nodule task's ``--select-by``."""


@dataclasses.dataclass(frozen=True)
class ClassificationOptions:
    """Options of both classification tasks; the fine-tuning ones apply to malignancy only."""

    chunk_shape: tuple[int, int, int] = CHUNK_SHAPE_IRC
    finetune: Path | None = None
    finetune_depth: int = 1
    non_nodules_per_benign: float = 0.0
    hard_negatives_from: Path | None = None
    hard_negative_fraction: float = DEFAULT_HARD_NEGATIVE_FRACTION
    hard_negative_sizes: str = "even"
    select_by: str = "cpm"
    calibrate: bool = True
    calibration_method: str = "platt"


class ClassificationTask(Task):
    """Shared machinery: chunk datasets, balanced sampling, cross-entropy, binary metrics."""

    score_name: ClassVar[str] = "roc_auc"
    default_model: ClassVar[str] = "luna"
    default_optimizer: ClassVar[str] = "sgd"
    summary_keys: ClassVar[tuple[str, ...]] = ("loss", "accuracy", "negative_accuracy", "positive_accuracy",
                                               "precision", "recall", "f1", "roc_auc")

    def __init__(self, context: RunContext) -> None:
        super().__init__(context)
        self.options: ClassificationOptions = self.config.task_options or ClassificationOptions()
        self._datasets: tuple[CandidateDataset, CandidateDataset] | None = None
        self._split: SeriesSplit | None = None

    # --- command line -----------------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--chunk-shape", type=int, nargs=3, default=list(CHUNK_SHAPE_IRC),
                            metavar=("I", "R", "C"), help="candidate chunk size in voxels (index, row, col)")
        parser.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                            help="after training, fit a temperature to the best checkpoint's validation logits "
                                 "(minimum negative log-likelihood), store it in that checkpoint and log the "
                                 "expected calibration error before and after; diagnosis applies it")
        parser.add_argument("--calibration-method", choices=CALIBRATION_METHODS, default="platt",
                            help="platt: a temperature and a bias, sigmoid(margin / T + b) (undoes the balanced "
                                 "sampler's prior shift); temperature: T alone (keeps 0.5 where it was)")

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> ClassificationOptions:
        if min(args.chunk_shape) < 1:
            raise UsageError(f"--chunk-shape {args.chunk_shape}: every size must be >= 1")
        return ClassificationOptions(chunk_shape=tuple(args.chunk_shape), calibrate=args.calibrate,
                                     calibration_method=args.calibration_method)

    # --- model and data ---------------------------------------------------------------

    def build_model(self) -> ModelSpec:
        name = self.config.model or self.default_model
        kwargs = {"input_shape": list(self.options.chunk_shape), **self.config.model_kwargs}
        try:
            model = build_model(name, **kwargs)
        except (TypeError, ValueError) as error:
            raise UsageError(f"--model {name} with {kwargs}: {error}") from None
        return ModelSpec(model, name, kwargs)

    def candidate_table(self, candidates: pd.DataFrame) -> pd.DataFrame:
        """The labelled rows this task trains on."""
        raise NotImplementedError

    def datasets(self) -> tuple[CandidateDataset, CandidateDataset]:
        """Training and validation datasets (built once, on first use)."""
        if self._datasets is None:
            paths = self.config.paths
            data_root = paths.require_data_root()
            table = self.candidate_table(read_candidate_table(data_root))
            on_disk = list_series_on_disk(data_root)
            table = drop_centres_outside(table, {uid: read_geometry(on_disk[uid])
                                                 for uid in table["series_uid"].unique()})
            if table.empty:
                raise DataError(f"no {self.task_name} samples under {paths.data_root}")
            if self.config.fold is None:
                train_table, val_table = split_table(table, self.config.val_stride)
                self._split = SeriesSplit.from_uids(train_table["series_uid"], val_table["series_uid"],
                                                    self.config.val_stride)
            else:
                train_uids, val_uids = split_by_fold(table["series_uid"], on_disk, data_root, self.config.fold)
                train_table = table[table["series_uid"].isin(train_uids)].reset_index(drop=True)
                val_table = table[table["series_uid"].isin(val_uids)].reset_index(drop=True)
                self._split = SeriesSplit.for_fold(train_uids, val_uids, self.config.fold)
            train_table = self.with_mined_rows(train_table)
            cache = open_cache(paths)
            shape = self.options.chunk_shape
            self._datasets = (CandidateDataset(train_table, cache, shape), CandidateDataset(val_table, cache, shape))
            for mode, dataset in zip(("training", "validation"), self._datasets):
                positives, negatives = positive_count(dataset)
                log.info("%s %s: %d samples (%d positive, %d negative) from %d series", self.task_name, mode,
                         len(dataset), positives, negatives, dataset.table["series_uid"].nunique())
            validation_positives = positive_count(self._datasets[1])[0]
            if validation_positives < FEW_VALIDATION_POSITIVES:
                log.info("%s validation has only %d positive sample(s): its ROC AUC (and CPM), and the best "
                            "checkpoint chosen by them, rest on them (more series, or a smaller --val-stride, give more)",
                            self.task_name, validation_positives)
        return self._datasets

    def series_split(self) -> SeriesSplit | None:
        """The series of the candidate table's split (mined rows come from the training series)."""
        return self._split

    def with_mined_rows(self, train_table: pd.DataFrame) -> pd.DataFrame:
        """The training table, with the candidates mined from ``--hard-negatives-from`` (nodule task only)."""
        return train_table

    def train_loader(self) -> Iterable[Batch]:
        dataset = self.datasets()[0]
        config, context = self.config, self.context
        hard = mined_negatives(dataset.table)
        fraction = self.options.hard_negative_fraction if hard.any() else 0.0
        positives = int(dataset.labels.sum())
        if config.ratio and (positives == 0 or positives == len(dataset.labels)):
            raise DataError(f"{self.task_name} training: --balanced needs both classes, but the training series "
                            f"of {config.paths.data_root} give {positives} positive and "
                            f"{len(dataset.labels) - positives} negative sample(s)")
        weights = None
        if hard.any() and self.options.hard_negative_sizes == "even":
            weights = np.zeros(len(hard))
            weights[hard] = equal_bin_weights(dataset.table["diameter_mm"].to_numpy()[hard],
                                              HARD_NEGATIVE_SIZE_EDGES_MM)
        sampler = BalancedSampler(dataset.labels, ratio=config.ratio, epoch_size=config.epoch_size,
                                  seed=config.seed, rank=context.rank, world_size=context.world_size,
                                  hard=hard, hard_fraction=fraction, hard_weights=weights)
        return build_loader(dataset, sampler, context,
                            ring=uses_batch_ring(config, context.device))

    def val_loader(self) -> Iterable[Batch]:
        dataset = self.datasets()[1]
        sampler = ShardedSequentialSampler(len(dataset), limit=self.config.val_size,
                                           rank=self.context.rank, world_size=self.context.world_size)
        return build_loader(dataset, sampler, self.context)

    # --- loss and metrics -------------------------------------------------------------

    def model_inputs(self, batch: Batch, augment: bool,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch["image"]
        if augment and (self.config.augment.is_spatial or self.config.augment.noise):
            images = augment_batch_3d(images, self.config.augment, generator)
        images = images.to(torch.float32)
        return to_memory_format(images, self.config.channels_last), batch["label"]

    def compute_loss(self, model: nn.Module, batch: Batch, augment: bool,
                     generator: torch.Generator) -> tuple[torch.Tensor, Outputs]:
        images, labels = self.model_inputs(batch, augment, generator)
        logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, reduction="none")
        probabilities = torch.softmax(logits.detach().float(), dim=1)[:, 1]
        return loss, {"label": labels.detach(), "probability": probabilities, "index": batch["index"].detach()}

    def epoch_metrics(self, outputs: Outputs) -> dict[str, float]:
        labels = outputs["label"].numpy().astype(bool)
        losses = outputs["loss"].numpy()
        metrics = classification_metrics(labels, outputs["probability"].numpy())
        metrics["loss"] = float(losses.mean()) if losses.size else float("nan")
        metrics["loss_negative"] = float(losses[~labels].mean()) if (~labels).any() else float("nan")
        metrics["loss_positive"] = float(losses[labels].mean()) if labels.any() else float("nan")
        return metrics

    def tensorboard_scalars(self, metrics: Mapping[str, float]) -> dict[str, float]:
        tags = {
            "loss/all": "loss", "loss/neg": "loss_negative", "loss/pos": "loss_positive",
            "correct/all": "accuracy", "correct/neg": "negative_accuracy", "correct/pos": "positive_accuracy",
            "pr/precision": "precision", "pr/recall": "recall", "pr/f1": "f1", "auc/roc": "roc_auc",
        }
        return {tag: float(metrics[key]) for tag, key in tags.items() if key in metrics}

    def log_extra(self, writer: Any, mode: str, epoch: int, outputs: Outputs, samples_seen: int) -> None:
        add_classification_curves(writer, outputs["label"].numpy(), outputs["probability"].numpy(), samples_seen)

    def hparams(self) -> dict[str, Any]:
        return {"chunk_shape": "x".join(str(n) for n in self.options.chunk_shape)}

    @property
    def calibrates(self) -> bool:
        return self.options.calibrate

    @property
    def calibration_method(self) -> str:
        return self.options.calibration_method


class NoduleTask(ClassificationTask):
    """Nodule (annotation) vs non-nodule candidate."""

    task_name: ClassVar[str] = "nodule"
    summary_keys: ClassVar[tuple[str, ...]] = (*ClassificationTask.summary_keys, *FROC_KEYS)

    def __init__(self, context: RunContext) -> None:
        super().__init__(context)
        self._truth: Truth | None = None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--hard-negatives-from", type=Path, default=None, metavar="SEGMENTATION",
                            help="mine the training series' candidates with this segmentation checkpoint (as "
                                 "diagnosis makes them; `python -m p2ch_luna.mining`, reused while unchanged) and "
                                 "train on them too: those on a nodule as positives, the others as hard negatives")
        parser.add_argument("--hard-negative-fraction", type=float, default=DEFAULT_HARD_NEGATIVE_FRACTION,
                            metavar="F", help="with --hard-negatives-from and --balanced/--ratio: the share of "
                                              "negatives drawn from the mined ones (the rest from candidates.csv)")
        parser.add_argument("--hard-negative-sizes", choices=HARD_NEGATIVE_SIZES, default="even",
                            help="how mined negatives are drawn: 'even' draws every diameter bin (under 4 mm, "
                                 "then steps of sqrt(2) mm) alike, so the large nodule-like structures are seen "
                                 "as often as the many vessel specks; 'natural' draws each candidate alike")
        parser.add_argument("--select-by", choices=SELECT_BY, default="cpm",
                            help="what picks the best checkpoint: 'cpm' the LUNA16 CPM of the validation "
                                 "candidates, ties by ROC AUC, then the lower loss; 'roc_auc' the book's per-candidate "
                                 "ROC AUC alone (the baseline of bench/bench_recipes.py)")

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> ClassificationOptions:
        if not 0.0 <= args.hard_negative_fraction <= 1.0:
            raise UsageError(f"--hard-negative-fraction {args.hard_negative_fraction} must lie in [0, 1]")
        mined_from = args.hard_negatives_from.expanduser().resolve() if args.hard_negatives_from else None
        if mined_from is not None and not mined_from.is_file():
            raise UsageError(f"--hard-negatives-from {mined_from}: no such segmentation checkpoint")
        return dataclasses.replace(super().options_from_args(args), hard_negatives_from=mined_from,
                                   hard_negative_fraction=args.hard_negative_fraction,
                                   hard_negative_sizes=args.hard_negative_sizes, select_by=args.select_by)

    def candidate_table(self, candidates: pd.DataFrame) -> pd.DataFrame:
        return nodule_table(candidates)

    def selection(self) -> tuple[str, ...]:
        if self.options.select_by == "roc_auc":
            return (self.score_name,)
        return (CPM_KEY, self.score_name, "loss")

    def validation_metrics(self, outputs: Outputs) -> dict[str, float]:
        """CPM and FROC sensitivities of the evaluated validation rows (see the module's docstring)."""
        table = self.datasets()[1].table
        if self._truth is None:
            self._truth = read_truth(self.config.paths.require_data_root())
            if self._truth is None:
                raise DataError(f"no annotations under {self.config.paths.data_root}: nodule validation needs them")
        rows = outputs["index"].numpy()
        marks = table.iloc[rows][["series_uid", *CENTER_COLUMNS]].assign(
            nodule_probability=outputs["probability"].numpy().astype("float64"))
        return froc_metrics(marks, self._truth, sorted(table["series_uid"].astype(str).unique()))

    def tensorboard_scalars(self, metrics: Mapping[str, float]) -> dict[str, float]:
        froc = {f"froc/{key}": float(metrics[key]) for key in FROC_KEYS if key in metrics}
        return {**super().tensorboard_scalars(metrics), **froc}

    def with_mined_rows(self, train_table: pd.DataFrame) -> pd.DataFrame:
        if self.options.hard_negatives_from is None:
            return train_table
        from p2ch_luna.mining.run import mine

        series = sorted(train_table["series_uid"].unique())
        source = self.options.hard_negatives_from
        mined = mine(self.config.paths, source, series, self.context.device) if self.context.rank == 0 else None
        barrier()  # one process mines; the others read its table
        if mined is None:
            mined = mine(self.config.paths, source, series, self.context.device, progress=False)
        log.info("nodule training: %d mined candidates from %d series (%d on a nodule), %.0f%% of negatives "
                 "drawn from them", len(mined.table), mined.series_count, int(mined.table["is_nodule"].sum()),
                 100 * self.options.hard_negative_fraction)
        return add_mined_rows(train_table, mined.table)


class MalignancyTask(ClassificationTask):
    """Malignant vs benign nodule, optionally fine-tuned from a nodule classifier."""

    task_name: ClassVar[str] = "malignancy"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--finetune", type=Path, default=None, metavar="PATH",
                            help="start from this nodule classifier checkpoint (ours or the book's cls_*.state)")
        parser.add_argument("--finetune-depth", type=int, default=1, metavar="N",
                            help="train only the last N parameterised blocks (1: head only)")
        parser.add_argument("--non-nodules-per-benign", type=float, default=0.0, metavar="K",
                            help=f"add K non-nodule candidates per benign nodule to the benign class "
                                 f"(the book's mix: {BOOK_NON_NODULES_PER_BENIGN:g})")

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> ClassificationOptions:
        if args.finetune_depth < 1:
            raise UsageError(f"--finetune-depth {args.finetune_depth} must be >= 1")
        if args.non_nodules_per_benign < 0:
            raise UsageError("--non-nodules-per-benign must be >= 0")
        base = super().options_from_args(args)
        finetune = args.finetune.expanduser().resolve() if args.finetune else None
        return dataclasses.replace(base, finetune=finetune, finetune_depth=args.finetune_depth,
                                   non_nodules_per_benign=args.non_nodules_per_benign)

    def candidate_table(self, candidates: pd.DataFrame) -> pd.DataFrame:
        return malignancy_table(candidates, self.options.non_nodules_per_benign, seed=self.config.seed)

    def build_model(self) -> ModelSpec:
        if self.options.finetune is None:
            return super().build_model()
        loaded = load_checkpoint(self.options.finetune, expected_task=("nodule", "malignancy"))
        model = loaded.model.train()
        depth = self.options.finetune_depth
        trainable = finetune_model(model, depth)
        log.info("fine-tuning %s from %s: training %s", loaded.model_name, self.options.finetune,
                 ", ".join(trainable))
        return ModelSpec(model, loaded.model_name, dict(loaded.model_kwargs))


def finetune_model(model: nn.Module, depth: int) -> list[str]:
    """Freeze all but the last ``depth`` parameterised child modules and re-initialise the head.

    Returns the names of the children left trainable (book ch. 14 ``--finetune-depth``).
    """
    blocks = [name for name, child in model.named_children() if any(True for _ in child.parameters())]
    if depth > len(blocks):
        raise UsageError(f"--finetune-depth {depth}: the model has only {len(blocks)} blocks ({', '.join(blocks)})")
    trainable = blocks[-depth:]
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.split(".")[0] in trainable)
    head = getattr(model, HEAD_NAME, None) or getattr(model, blocks[-1])
    init_book_weights(head)
    return trainable

