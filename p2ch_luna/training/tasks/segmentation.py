"""Nodule segmentation (book chapter 13): a 2D U-Net on CT slices with context slices as channels.

``python -m p2ch_luna.training segmentation`` runs this task through the shared
engine. Loss: the book's soft Dice loss plus ``--fn-loss-weight`` times the
Dice loss restricted to nodule pixels (:func:`p2ch_luna.training.losses.segmentation_loss`).
Pixel counts use probability > 0.5. The best checkpoint is picked by
validation pixel recall by default, as in the book (``--score-metric dice``
picks by Dice instead; ``--score-metric candidates``, the recipe's, by what
diagnosis' grouping makes of whole validation CTs: nodules found, then fewer
candidates per CT, :mod:`p2ch_luna.training.tasks.candidate_validation`).
Each validation epoch writes a few slices to TensorBoard as images: CT in
grey, true positives green, false negatives orange, false positives red.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Any, ClassVar, Iterable, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from p2ch_luna.data.augment import AugmentConfig, augment_batch_2d
from p2ch_luna.data.cache import open_cache
from p2ch_luna.data.folds import split_by_fold
from p2ch_luna.data.luna import (
    ANNOTATIONS_FILE,
    find_candidates_file,
    read_annotations,
    read_candidates,
    split_by_series,
)
from p2ch_luna.data.masks import MASK_MODES, MASK_THRESHOLD_HU
from p2ch_luna.data.sampling import ShardedSequentialSampler
from p2ch_luna.data.segmentation import (
    CONTEXT_SLICES,
    DEFAULT_CANDIDATE_CROP_FRACTION,
    DEFAULT_RANDOM_CROP_FRACTION,
    DEFAULT_VAL_NEGATIVE_FRACTION,
    MaskOptions,
    SameShapeBatchSampler,
    SegmentationSeries,
    SegmentationTrainDataset,
    SegmentationTrainSampler,
    SegmentationValDataset,
    validation_slices,
)
from p2ch_luna.data.series_split import SeriesSplit
from p2ch_luna.errors import DataError, UsageError
from p2ch_luna.io.ct import HU_MAX, HU_MIN, list_series_on_disk
from p2ch_luna.metrics.segmentation import segmentation_metrics
from p2ch_luna.models.checkpoint import BOOK_SEGMENTATION_KWARGS
from p2ch_luna.models.registry import build_model
from p2ch_luna.training.losses import BOOK_FN_LOSS_WEIGHT, dice_loss, segmentation_loss
from p2ch_luna.training.selection import CANDIDATES_PER_CT_KEY
from p2ch_luna.training.tasks.base import Batch, ModelSpec, Outputs, RunContext, Task, build_loader, uses_batch_ring
from p2ch_luna.training.tasks.candidate_validation import (
    CANDIDATE_RECALL_KEY,
    DEFAULT_MAX_SERIES,
    CandidateValidation,
)

log = logging.getLogger(__name__)

PREDICTION_THRESHOLD = 0.5
"""A pixel is predicted nodule when its probability exceeds this."""
DEFAULT_IMAGE_COUNT = 6
"""Validation slices written to TensorBoard each epoch."""
SCORE_METRICS = ("recall", "dice", "candidates")
OVERLAY_COLORS = {
    "tp": (0.0, 1.0, 0.0),
    "fn": (1.0, 0.5, 0.0),
    "fp": (1.0, 0.0, 0.0),
}
"""RGB of true positives, false negatives and false positives in the TensorBoard images (book colours)."""
OVERLAY_ALPHA = 0.5


@dataclasses.dataclass(frozen=True)
class SegmentationOptions:
    """Options of the segmentation task (``TrainConfig.task_options``)."""

    mask_mode: str = "grow"
    mask_threshold_hu: float = MASK_THRESHOLD_HU
    fn_loss_weight: float = BOOK_FN_LOSS_WEIGHT
    random_crop_fraction: float = DEFAULT_RANDOM_CROP_FRACTION
    candidate_crop_fraction: float = DEFAULT_CANDIDATE_CROP_FRACTION
    val_negative_fraction: float = DEFAULT_VAL_NEGATIVE_FRACTION
    context_slices: int = CONTEXT_SLICES
    image_count: int = DEFAULT_IMAGE_COUNT
    score_metric: str = "recall"
    candidate_val_series: int = DEFAULT_MAX_SERIES


def overlay_image(ct_slice: np.ndarray, label: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 RGB in [0, 1]: the CT slice in grey with TP/FN/FP pixels coloured."""
    grey = (np.clip(ct_slice.astype(np.float32), HU_MIN, HU_MAX) - HU_MIN) / (HU_MAX - HU_MIN)
    image = np.repeat(grey[..., None], 3, axis=-1)
    label, prediction = label.astype(bool), prediction.astype(bool)
    for kind, pixels in (("tp", label & prediction), ("fn", label & ~prediction), ("fp", ~label & prediction)):
        image[pixels] = (1 - OVERLAY_ALPHA) * image[pixels] + OVERLAY_ALPHA * np.asarray(OVERLAY_COLORS[kind])
    return image.astype(np.float32)


class SegmentationTask(Task):
    """Train the book's U-Net (``UNetWrapper``) to segment nodules in CT slices."""

    task_name: ClassVar[str] = "segmentation"
    score_name: ClassVar[str] = "recall"
    default_model: ClassVar[str] = "unet"
    default_optimizer: ClassVar[str] = "adam"
    summary_keys: ClassVar[tuple[str, ...]] = ("loss", "dice", "precision", "recall", CANDIDATE_RECALL_KEY,
                                               CANDIDATES_PER_CT_KEY)

    def __init__(self, context: RunContext) -> None:
        super().__init__(context)
        self.options: SegmentationOptions = self.config.task_options or SegmentationOptions()
        self.score_name = (CANDIDATE_RECALL_KEY if self.options.score_metric == "candidates" else
                           self.options.score_metric)
        self._candidate_validation: CandidateValidation | None = None
        self._splits: tuple[list[str], list[str]] | None = None
        self._annotations: pd.DataFrame | None = None
        self._display: set[tuple[str, int]] = set()
        self._display_images: dict[tuple[str, int], np.ndarray] = {}

    # --- command line -----------------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("segmentation")
        group.add_argument("--mask-mode", choices=MASK_MODES, default="grow",
                           help="nodule masks: the book's grown boxes above the threshold, or spheres of "
                                "the annotated diameter")
        group.add_argument("--mask-threshold-hu", type=float, default=MASK_THRESHOLD_HU,
                           help="HU above which grown-mask voxels are nodule")
        group.add_argument("--fn-loss-weight", type=float, default=BOOK_FN_LOSS_WEIGHT,
                           help="weight of the false-negative Dice term (the book's: 8)")
        group.add_argument("--random-crop-fraction", type=float, default=DEFAULT_RANDOM_CROP_FRACTION,
                           help="share of training crops taken at random places rather than around a nodule")
        group.add_argument("--candidate-crop-fraction", type=float, default=DEFAULT_CANDIDATE_CROP_FRACTION,
                           help="share of training crops centred on negative rows (class 0) of the data's "
                                "candidates.csv: vessels, junctions and walls that look like nodules, so the "
                                "segmenter learns to leave them out (measured: docs/benchmarks.md, "
                                "'Segmenter crops on negative candidates')")
        group.add_argument("--val-negative-fraction", type=float, default=DEFAULT_VAL_NEGATIVE_FRACTION,
                           help="share of validation slices without nodules that are validated too")
        group.add_argument("--context-slices", type=int, default=CONTEXT_SLICES,
                           help="slices on each side given as channels")
        group.add_argument("--tb-images", type=int, default=DEFAULT_IMAGE_COUNT,
                           help="validation slices shown in TensorBoard")
        group.add_argument("--score-metric", choices=SCORE_METRICS, default="recall",
                           help="validation metric that picks the best checkpoint: pixel recall (the book's), "
                                "Dice, or candidates: diagnosis' lungs, segmentation and grouping run on whole "
                                "validation CTs each validation epoch, and the checkpoint whose candidates hit the "
                                "most annotated nodules wins, ties broken by fewer candidates per CT (pixel recall "
                                "rewards flooding; docs/benchmarks.md, 'Segmenter chosen by its candidates')")
        group.add_argument("--candidate-val-series", type=int, default=DEFAULT_MAX_SERIES, metavar="N",
                           help="validation CTs that --score-metric candidates segments per validation epoch "
                                "(those with annotated nodules first)")

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> SegmentationOptions:
        if not 0 <= args.random_crop_fraction < 1:
            raise UsageError(f"--random-crop-fraction must be in [0, 1), not {args.random_crop_fraction}")
        if not 0 <= args.candidate_crop_fraction < 1 - args.random_crop_fraction:
            raise UsageError(f"--candidate-crop-fraction must be in [0, 1 - --random-crop-fraction), "
                             f"not {args.candidate_crop_fraction}")
        if not 0 <= args.val_negative_fraction <= 1:
            raise UsageError(f"--val-negative-fraction must be in [0, 1], not {args.val_negative_fraction}")
        if args.candidate_val_series < 1:
            raise UsageError(f"--candidate-val-series must be >= 1, not {args.candidate_val_series}")
        if args.context_slices < 0 or args.tb_images < 0 or args.fn_loss_weight < 0:
            raise UsageError("--context-slices, --tb-images and --fn-loss-weight must be >= 0")
        return SegmentationOptions(
            mask_mode=args.mask_mode,
            mask_threshold_hu=args.mask_threshold_hu,
            fn_loss_weight=args.fn_loss_weight,
            random_crop_fraction=args.random_crop_fraction,
            candidate_crop_fraction=args.candidate_crop_fraction,
            val_negative_fraction=args.val_negative_fraction,
            context_slices=args.context_slices,
            image_count=args.tb_images,
            score_metric=args.score_metric,
            candidate_val_series=args.candidate_val_series,
        )

    @classmethod
    def book_augment(cls) -> AugmentConfig:
        """The book's segmentation augmentation (p2ch13 ``--augmented``: a smaller offset)."""
        return AugmentConfig.book_segmentation()

    # --- model and data ---------------------------------------------------------------

    def build_model(self) -> ModelSpec:
        name = self.config.model or self.default_model
        kwargs = {**BOOK_SEGMENTATION_KWARGS, "in_channels": 2 * self.options.context_slices + 1,
                  **self.config.model_kwargs}
        return ModelSpec(build_model(name, **kwargs), name, kwargs)

    def _series(self, validation: bool) -> SegmentationSeries:
        data_root = self.config.paths.require_data_root()
        if self._splits is None:
            uids = sorted(list_series_on_disk(data_root))
            if not uids:
                raise DataError(f"no subset*/*.mhd series under {data_root}")
            self._splits = (split_by_series(uids, self.config.val_stride) if self.config.fold is None else
                            split_by_fold(uids, list_series_on_disk(data_root), data_root, self.config.fold))
            self._annotations = read_annotations(data_root / ANNOTATIONS_FILE)
        uids = self._splits[1] if validation else self._splits[0]
        if not uids:
            raise DataError(f"no {'validation' if validation else 'training'} series under {data_root} "
                            f"with --val-stride {self.config.val_stride}")
        mask_options = MaskOptions(self.options.mask_mode, self.options.mask_threshold_hu)
        negatives = None
        if not validation and self.options.candidate_crop_fraction > 0:
            candidates = read_candidates(find_candidates_file(data_root))
            negatives = candidates[~candidates["is_nodule"]]
        return SegmentationSeries(open_cache(self.config.paths), uids, self._annotations, mask_options,
                                  progress=self.context.is_main, negative_candidates=negatives)

    def series_split(self) -> SeriesSplit | None:
        """The split of the series on disk (None before the loaders are built)."""
        if self._splits is None:
            return None
        if self.config.fold is not None:
            return SeriesSplit.for_fold(self._splits[0], self._splits[1], self.config.fold)
        return SeriesSplit.from_uids(self._splits[0], self._splits[1], self.config.val_stride)

    def train_loader(self) -> Iterable[Batch]:
        series = self._series(validation=False)
        if not series.nodules:
            raise DataError("the training series have no annotated nodules inside their CTs")
        if self.options.candidate_crop_fraction > 0 and not series.negatives:
            raise DataError(f"--candidate-crop-fraction {self.options.candidate_crop_fraction}: the candidates "
                            f"file of {self.config.paths.require_data_root()} has no negative rows inside the "
                            "training series' CTs")
        sampler = SegmentationTrainSampler(len(series.nodules), self.options.random_crop_fraction,
                                           self.config.epoch_size, self.config.seed,
                                           self.context.rank, self.context.world_size,
                                           candidate_crop_fraction=self.options.candidate_crop_fraction)
        log.info("segmentation training: %d series, %d nodules, %d negative candidates, %d crops per epoch",
                 len(series.series_uids), len(series.nodules), len(series.negatives), sampler.global_size)
        return build_loader(SegmentationTrainDataset(series, self.options.context_slices), sampler, self.context,
                            ring=uses_batch_ring(self.config, self.context.device))

    def val_loader(self) -> Iterable[Batch]:
        series = self._series(validation=True)
        items = validation_slices(series, self.options.val_negative_fraction, self.config.seed)
        dataset = SegmentationValDataset(series, items, self.options.context_slices)
        sampler = ShardedSequentialSampler(len(dataset), self.config.val_size,
                                           self.context.rank, self.context.world_size)
        self._display = _display_slices(series, [items[i] for i in sampler.indices], self.options.image_count)
        log.info("segmentation validation: %d series, %d slices", len(series.series_uids), len(sampler.indices))
        workers = self.config.num_workers
        return DataLoader(
            dataset,
            batch_sampler=SameShapeBatchSampler(sampler, dataset.slice_shapes(), self.config.batch_size),
            num_workers=workers,
            pin_memory=self.context.device.type == "cuda",
            persistent_workers=workers > 0,
        )

    # --- loss and metrics ---------------------------------------------------------------

    def model_inputs(self, batch: Batch, augment: bool,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        image = batch["image"].to(torch.float32)
        if augment:
            return augment_batch_2d(image, batch["mask"], self.config.augment, generator)
        return image, batch["mask"]

    def compute_loss(self, model: nn.Module, batch: Batch, augment: bool,
                     generator: torch.Generator) -> tuple[torch.Tensor, Outputs]:
        image, mask = self.model_inputs(batch, augment, generator)
        probabilities = torch.sigmoid(model(image).float())
        loss = segmentation_loss(probabilities, mask, self.options.fn_loss_weight)
        with torch.no_grad():
            predicted = probabilities > PREDICTION_THRESHOLD
            label = mask.to(torch.bool)
            dims = (1, 2, 3)
            outputs = {
                "tp": (predicted & label).sum(dim=dims).double(),
                "fp": (predicted & ~label).sum(dim=dims).double(),
                "fn": (~predicted & label).sum(dim=dims).double(),
                "dice_loss": dice_loss(probabilities, label).float(),
            }
            if not augment and self._display:
                self._keep_display_images(batch, image, label, predicted)
        return loss, outputs

    def _keep_display_images(self, batch: Batch, image: torch.Tensor, label: torch.Tensor,
                             predicted: torch.Tensor) -> None:
        slice_indices = batch["slice_index"].tolist()
        for position, key in enumerate(zip(batch["series_uid"], slice_indices)):
            if key in self._display:
                center = image[position, self.options.context_slices].cpu().numpy()
                self._display_images[key] = overlay_image(center, label[position, 0].cpu().numpy(),
                                                          predicted[position, 0].cpu().numpy())

    def epoch_metrics(self, outputs: Outputs) -> dict[str, float]:
        tp, fp, fn = (float(outputs[key].sum()) for key in ("tp", "fp", "fn"))
        metrics = {"loss": float(outputs["loss"].mean()), "dice_loss": float(outputs["dice_loss"].mean())}
        metrics.update(segmentation_metrics(tp, fp, fn))
        return metrics

    def selection(self) -> tuple[str, ...]:
        if self.options.score_metric == "candidates":
            return (CANDIDATE_RECALL_KEY, CANDIDATES_PER_CT_KEY, "recall")
        return (self.score_name,)

    def model_metrics(self, model: nn.Module) -> dict[str, float]:
        """Under ``--score-metric candidates``: candidate recall and candidates per CT on whole validation CTs."""
        if self.options.score_metric != "candidates":
            return {}
        if self._candidate_validation is None:
            if self._splits is None:
                raise RuntimeError("model_metrics before val_loader")
            self._candidate_validation = CandidateValidation(self.config.paths.require_data_root(), self._splits[1],
                                                             self.options.candidate_val_series)
        return self._candidate_validation.metrics(model, self.context.device)

    def tensorboard_scalars(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """The book's tags: ``loss/all``, ``percent_all/{tp,fn,fp}``, ``pr/{precision,recall}``; plus Dice, and
        ``candidates/{recall,per_ct}`` under ``--score-metric candidates``."""
        candidates = {f"candidates/{name}": metrics[key] for name, key in
                      (("recall", CANDIDATE_RECALL_KEY), ("per_ct", CANDIDATES_PER_CT_KEY)) if key in metrics}
        return {
            **candidates,
            "loss/all": metrics["loss"],
            "loss/dice": metrics["dice_loss"],
            "percent_all/tp": 100 * metrics["tp_rate"],
            "percent_all/fn": 100 * metrics["fn_rate"],
            "percent_all/fp": 100 * metrics["fp_rate"],
            "pr/precision": metrics["precision"],
            "pr/recall": metrics["recall"],
            "pr/dice": metrics["dice"],
        }

    def log_extra(self, writer: Any, mode: str, epoch: int, outputs: Outputs, samples_seen: int) -> None:
        if mode != "val":
            return
        for (series_uid, slice_index), image in sorted(self._display_images.items()):
            writer.add_image(f"{mode}/{series_uid[-8:]}_slice{slice_index:03d}", image, samples_seen,
                             dataformats="HWC")
        self._display_images.clear()

    def hparams(self) -> dict[str, Any]:
        return {key: value for key, value in dataclasses.asdict(self.options).items() if key != "image_count"}


def _display_slices(series: SegmentationSeries, items: list[tuple[str, int]], count: int) -> set[tuple[str, int]]:
    """Up to ``count`` validation slices to show: each series' largest nodule slice first, then others."""
    available = set(items)
    chosen: list[tuple[str, int]] = []
    for uid in series.series_uids:
        positive = series.positive_slices[uid]
        if positive.size:
            areas = [np.count_nonzero(series.mask_slice(uid, index)) for index in positive]
            key = (uid, int(positive[np.argmax(areas)]))
            if key in available:
                chosen.append(key)
    spread = [items[i] for i in np.linspace(0, len(items) - 1, num=min(count, len(items))).astype(int)] if items else []
    chosen += [key for key in spread if key not in chosen]
    return set(chosen[:count])
