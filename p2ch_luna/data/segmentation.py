"""Segmentation samples: CT slices with context slices as channels, and their nodule masks.

Input of the book's U-Net (chapter 13): one slice plus ``context`` slices on
each side as channels (7 channels for the default 3), HU clipped to
``[HU_MIN, HU_MAX]``; slice indices beyond the first or last slice are clamped,
so edge slices repeat. The label is the nodule mask of the centre slice.

- Training (:class:`SegmentationTrainDataset`): the book's 64×64 crops at a
  random offset inside the 96×96 window centred on a nodule, plus a share of
  64×64 crops at random places of random slices, so the model also sees slices
  without nodules, plus a share of crops around ``candidates.csv`` negatives
  (vessels, junctions, walls: what detectors mistake for nodules), so it also
  learns to leave those out. Each draw is a ``(nodule_index, crop_seed)`` pair
  made by :class:`SegmentationTrainSampler` from ``(seed, epoch)``;
  ``nodule_index`` ``-1`` asks for a random crop, ``-2`` for a negative
  candidate's crop. The dataset itself holds no random state, so
  DataLoader workers (persistent or not) give the same samples for a seed.
- Validation (:class:`SegmentationValDataset`): full slices of validation
  series: every slice with a mask voxel plus a seeded sample of the others.
  :class:`SameShapeBatchSampler` keeps series of different sizes in separate batches.

Samples are dicts: ``image`` int16 ``(2*context+1, H, W)`` (converted to float
on the device), ``mask`` bool ``(1, H, W)``, ``series_uid``, ``slice_index``.
The training set also cuts whole batches straight into batch arrays, and into
the shared buffers of a batch ring (:mod:`p2ch_luna.data.batch_ring`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Iterator, Mapping, Sequence, TypedDict

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm

from p2ch_luna.data.cache import ChunkCache
from p2ch_luna.data.masks import (
    MASK_THRESHOLD_HU,
    annotation_rows,
    cached_packed_mask,
    cached_positive_slices,
    unpack_mask,
)
from p2ch_luna.data.sampling import epoch_seed
from p2ch_luna.geometry import Geometry, chunk_bounds
from p2ch_luna.io.ct import HU_MIN

log = logging.getLogger(__name__)

CONTEXT_SLICES = 3
"""Slices on each side of the labelled slice given as extra channels (book: 3, so 7 channels)."""
TRAIN_WINDOW = 96
"""Side of the window around a nodule inside which the training crop is placed (book ch. 13)."""
TRAIN_CROP = 64
"""Side of a training crop."""
DEFAULT_RANDOM_CROP_FRACTION = 0.3
"""Share of training samples cut at random places instead of around a nodule."""
DEFAULT_CANDIDATE_CROP_FRACTION = 0.0
"""Share of training samples cut around a negative candidate (``candidates.csv`` class 0)."""
RANDOM_CROP = -1
"""``nodule_index`` of a draw that asks for a crop at a random place."""
CANDIDATE_CROP = -2
"""``nodule_index`` of a draw that asks for a crop around a random negative candidate."""
DEFAULT_VAL_NEGATIVE_FRACTION = 0.05
"""Share of the validation series' slices without nodule voxels that are validated too."""
_SEED_BOUND = 2**63


class SegmentationSample(TypedDict):
    image: np.ndarray
    mask: np.ndarray
    series_uid: str
    slice_index: int


@dataclasses.dataclass(frozen=True)
class MaskOptions:
    """How nodule masks are built from annotations (see :mod:`p2ch_luna.data.masks`)."""

    mode: str = "grow"
    threshold_hu: float = MASK_THRESHOLD_HU


class SegmentationSeries:
    """Clipped volumes, nodule masks and nodule centres of some series, read through a :class:`ChunkCache`.

    Volumes and (bit-packed) masks are read-only memory maps opened lazily in
    each process; pickling (for DataLoader workers) carries only the cache's
    folders. Building it makes every mask that is not cached yet.
    """

    def __init__(self, cache: ChunkCache, series_uids: Sequence[str], annotations: pd.DataFrame,
                 mask_options: MaskOptions = MaskOptions(), progress: bool = True,
                 negative_candidates: pd.DataFrame | None = None) -> None:
        self.cache = cache
        self.series_uids = list(series_uids)
        self.annotations = annotation_rows(annotations)
        self.annotations = self.annotations[self.annotations["series_uid"].isin(self.series_uids)]
        self.mask_options = mask_options
        self._masks: dict[str, np.ndarray] = {}
        self.shapes: dict[str, tuple[int, int, int]] = {}
        self.positive_slices: dict[str, np.ndarray] = {}
        geometries = {}
        for uid in tqdm(self.series_uids, desc="nodule masks", unit="series", disable=not progress):
            geometries[uid] = cache.geometry(uid)
            self.shapes[uid] = geometries[uid].shape_irc
            self.positive_slices[uid] = np.asarray(cached_positive_slices(
                cache, uid, self.annotations, mask_options.mode, mask_options.threshold_hu))
        self.nodules: list[tuple[str, tuple[int, int, int]]] = centres_inside(self.annotations, geometries)
        """``(series_uid, center_irc)`` of every annotated nodule inside its CT."""
        self.negatives: list[tuple[str, tuple[int, int, int]]] = (
            [] if negative_candidates is None else centres_inside(negative_candidates, geometries))
        """``(series_uid, center_irc)`` of the given negative candidates inside these series' CTs."""

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_masks": {}}

    def volume(self, series_uid: str) -> np.ndarray:
        return self.cache.volume(series_uid)

    def mask_slice(self, series_uid: str, slice_index: int) -> np.ndarray:
        """Boolean ``(R, C)`` nodule mask of one slice."""
        return unpack_mask(self._packed_mask(series_uid)[slice_index], self.shapes[series_uid][2])

    def mask_window(self, series_uid: str, slice_index: int, rows: slice, cols: slice) -> np.ndarray:
        """Boolean nodule mask of one slice's ``rows`` x ``cols`` (inside the CT), unpacking only those bits."""
        first_byte, end_byte = cols.start // 8, -(-cols.stop // 8)
        packed = self._packed_mask(series_uid)[slice_index, rows, first_byte:end_byte]
        return unpack_mask(packed, cols.stop - 8 * first_byte)[:, cols.start - 8 * first_byte :]

    def _packed_mask(self, series_uid: str) -> np.ndarray:
        packed = self._masks.get(series_uid)
        if packed is None:
            packed = cached_packed_mask(self.cache, series_uid, self.annotations, self.mask_options.mode,
                                        self.mask_options.threshold_hu)
            self._masks[series_uid] = packed
        return packed


def centres_inside(table: pd.DataFrame, geometries: Mapping[str, Geometry]) -> list[tuple[str, tuple[int, int, int]]]:
    """``(series_uid, center_irc)`` of the rows of ``table`` (``series_uid, center_x/y/z``) that lie inside their
    CT, series in the order of ``geometries`` (series missing there are left out), rows in table order."""
    groups = dict(iter(table.groupby("series_uid", sort=False)))
    centres = []
    for uid, geometry in geometries.items():
        rows = groups.get(uid)
        if rows is None:
            continue
        irc = geometry.xyz_to_irc(rows[["center_x", "center_y", "center_z"]].to_numpy(dtype=float)).reshape(-1, 3)
        centres += [(uid, tuple(int(v) for v in point)) for point in irc[geometry.contains_irc(irc).reshape(-1)]]
    return centres


def context_indices(slice_index: int, n_slices: int, context: int = CONTEXT_SLICES) -> np.ndarray:
    """The ``2 * context + 1`` slice indices around ``slice_index``, clamped to the volume."""
    return np.clip(np.arange(slice_index - context, slice_index + context + 1), 0, n_slices - 1)


def read_sample(series: SegmentationSeries, series_uid: str, slice_index: int,
                rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None,
                context: int = CONTEXT_SLICES) -> SegmentationSample:
    """Image and mask of one slice (or of its ``rows`` × ``cols`` window, ``(start, end)`` each).

    Parts of the window outside the CT are filled with air and no mask.
    """
    _, height, width = series.volume(series_uid).shape
    rows = rows or (0, height)
    cols = cols or (0, width)
    image = np.empty((2 * context + 1, rows[1] - rows[0], cols[1] - cols[0]), dtype=np.int16)
    mask = np.empty((1, *image.shape[1:]), dtype=bool)
    write_window(series, series_uid, slice_index, rows, cols, image, mask)
    return {"image": image, "mask": mask, "series_uid": series_uid, "slice_index": int(slice_index)}


def write_window(series: SegmentationSeries, series_uid: str, slice_index: int, rows: tuple[int, int],
                 cols: tuple[int, int], image: np.ndarray, mask: np.ndarray) -> None:
    """Write one slice's ``rows`` × ``cols`` window with ``(len(image) - 1) / 2`` context slices on each side
    into ``image`` (C, H, W) and its nodule mask into ``mask`` (1, H, W); parts outside the CT get air and no
    mask."""
    volume = series.volume(series_uid)
    n_slices, height, width = volume.shape
    inside = tuple(slice(max(start, 0), min(end, size)) for (start, end), size in ((rows, height), (cols, width)))
    placed = tuple(slice(region.start - start, region.stop - start) for region, (start, _) in zip(inside, (rows, cols)))
    if any(region.stop - region.start != end - start for region, (start, end) in zip(inside, (rows, cols))):
        image.fill(HU_MIN)
        mask.fill(False)
    if any(region.stop <= region.start for region in inside):
        return
    context = (image.shape[0] - 1) // 2
    image[(slice(None), *placed)] = volume[(context_indices(slice_index, n_slices, context), *inside)]
    mask[(0, *placed)] = series.mask_window(series_uid, slice_index, *inside)


def crop_start(center: int, size: int, rng: np.random.Generator,
               window: int = TRAIN_WINDOW, crop: int = TRAIN_CROP) -> int:
    """Start of a random ``crop`` inside the ``window`` around ``center`` (book border rule)."""
    ((start, end),) = chunk_bounds([center], [window], [size])
    return start + int(rng.integers(0, max(end - start - crop, 0) + 1))


class SegmentationTrainDataset(Dataset):
    """Training crops; items are ``(nodule_index, crop_seed)`` pairs (:data:`RANDOM_CROP`: a random crop,
    :data:`CANDIDATE_CROP`: around a random negative candidate)."""

    def __init__(self, series: SegmentationSeries, context: int = CONTEXT_SLICES, crop: int = TRAIN_CROP,
                 window: int = TRAIN_WINDOW) -> None:
        if not series.series_uids:
            raise ValueError("no training series")
        self.series = series
        self.context = context
        self.crop = crop
        self.window = window

    def __len__(self) -> int:
        return len(self.series.nodules)

    def __getitem__(self, item: tuple[int, int]) -> SegmentationSample:
        return read_sample(self.series, *self._window(item), self.context)

    def __getitems__(self, items: Sequence[tuple[int, int]]) -> dict[str, Any]:
        """A whole collated batch at once (the DataLoader's batched-fetch hook): crops written straight into
        the batch arrays, no per-item arrays or collate."""
        tensors = {key: torch.empty((len(items), *shape), dtype=dtype)
                   for key, (shape, dtype) in self.ring_arrays().items()}
        return {**tensors, **self.fill_batch(items, {key: tensor.numpy() for key, tensor in tensors.items()})}

    def ring_arrays(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per-sample shape and dtype of the batch's large arrays (see :mod:`p2ch_luna.data.batch_ring`)."""
        return {"image": ((2 * self.context + 1, self.crop, self.crop), torch.int16),
                "mask": ((1, self.crop, self.crop), torch.bool)}

    def fill_batch(self, items: Sequence[tuple[int, int]], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        """Write the crops of ``items`` into ``arrays["image"]`` (B, C, H, W) and their masks into
        ``arrays["mask"]`` (B, 1, H, W); the batch's other values."""
        series_uids, slice_indices = [], []
        for position, item in enumerate(items):
            series_uid, slice_index, rows, cols = self._window(item)
            write_window(self.series, series_uid, slice_index, rows, cols, arrays["image"][position],
                         arrays["mask"][position])
            series_uids.append(series_uid)
            slice_indices.append(slice_index)
        return {"series_uid": series_uids, "slice_index": torch.tensor(slice_indices, dtype=torch.int64)}

    def _window(self, item: tuple[int, int]) -> tuple[str, int, tuple[int, int], tuple[int, int]]:
        """Series, slice, rows and columns of the crop that ``item`` draws."""
        nodule_index, crop_seed = item
        rng = np.random.default_rng(crop_seed)
        if nodule_index >= 0:
            series_uid, center = self.series.nodules[nodule_index]
        elif nodule_index == CANDIDATE_CROP:
            series_uid, center = self.series.negatives[int(rng.integers(len(self.series.negatives)))]
        else:
            series_uid = self.series.series_uids[int(rng.integers(len(self.series.series_uids)))]
            center = tuple(int(rng.integers(n)) for n in self.series.shapes[series_uid])
        shape = self.series.shapes[series_uid]
        row = crop_start(center[1], shape[1], rng, self.window, self.crop)
        col = crop_start(center[2], shape[2], rng, self.window, self.crop)
        return series_uid, int(center[0]), (row, row + self.crop), (col, col + self.crop)


class SegmentationTrainSampler(Sampler[tuple[int, int]]):
    """Each epoch's ``(nodule_index, crop_seed)`` draws, seeded by ``(seed, epoch)`` and sharded by rank.

    A ``random_crop_fraction`` of the draws are random crops (``nodule_index``
    :data:`RANDOM_CROP`), a ``candidate_crop_fraction`` are crops around negative
    candidates (:data:`CANDIDATE_CROP`); the rest cycle through the shuffled
    nodules. ``epoch_size`` counts draws over all ranks (default: enough for
    every nodule once) and is rounded down to a multiple of ``world_size``.
    """

    def __init__(self, n_nodules: int, random_crop_fraction: float = DEFAULT_RANDOM_CROP_FRACTION,
                 epoch_size: int | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 candidate_crop_fraction: float = DEFAULT_CANDIDATE_CROP_FRACTION) -> None:
        for name, value in (("random_crop_fraction", random_crop_fraction),
                            ("candidate_crop_fraction", candidate_crop_fraction),
                            ("their sum", random_crop_fraction + candidate_crop_fraction)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], not {value}")
        nodule_fraction = 1 - random_crop_fraction - candidate_crop_fraction
        if n_nodules == 0 and nodule_fraction > 0:
            raise ValueError("the training series have no annotated nodules to centre crops on")
        if epoch_size is None:
            if nodule_fraction <= 0:
                raise ValueError("an epoch without nodule crops needs an explicit epoch_size")
            epoch_size = math.ceil(n_nodules / nodule_fraction)
        self.global_size = (int(epoch_size) // world_size) * world_size
        if self.global_size <= 0:
            raise ValueError(f"epoch size {epoch_size} is smaller than the {world_size} processes")
        self.n_nodules = n_nodules
        self.random_crop_fraction = random_crop_fraction
        self.candidate_crop_fraction = candidate_crop_fraction
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_draws(self) -> list[tuple[int, int]]:
        """This epoch's draws over all ranks."""
        rng = np.random.default_rng(epoch_seed(self.seed, self.epoch))
        n_random = int(round(self.random_crop_fraction * self.global_size))
        n_candidate = min(int(round(self.candidate_crop_fraction * self.global_size)), self.global_size - n_random)
        n_nodule = self.global_size - n_random - n_candidate
        nodules = np.resize(rng.permutation(self.n_nodules), n_nodule) if self.n_nodules else []
        items = rng.permutation(np.concatenate([np.asarray(nodules, dtype=np.int64),
                                                np.full(n_random, RANDOM_CROP, dtype=np.int64),
                                                np.full(n_candidate, CANDIDATE_CROP, dtype=np.int64)]))
        seeds = rng.integers(0, _SEED_BOUND, size=self.global_size, dtype=np.int64)
        return list(zip(items.tolist(), seeds.tolist()))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.global_draws()[self.rank :: self.world_size])

    def __len__(self) -> int:
        return self.global_size // self.world_size


def validation_slices(series: SegmentationSeries, negative_fraction: float = DEFAULT_VAL_NEGATIVE_FRACTION,
                      seed: int = 0) -> list[tuple[str, int]]:
    """``(series_uid, slice_index)`` of every positive slice plus a seeded share of the others."""
    rng = np.random.default_rng(seed)
    items = []
    for uid in series.series_uids:
        positive = series.positive_slices[uid]
        negative = np.setdiff1d(np.arange(series.shapes[uid][0]), positive)
        n_negative = int(round(negative_fraction * negative.size))
        chosen = np.sort(np.concatenate([positive, rng.choice(negative, n_negative, replace=False)]))
        items += [(uid, int(index)) for index in chosen]
    return items


class SegmentationValDataset(Dataset):
    """Full validation slices (``items`` from :func:`validation_slices`)."""

    def __init__(self, series: SegmentationSeries, items: Sequence[tuple[str, int]],
                 context: int = CONTEXT_SLICES) -> None:
        self.series = series
        self.items = list(items)
        self.context = context

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> SegmentationSample:
        series_uid, slice_index = self.items[index]
        return read_sample(self.series, series_uid, slice_index, context=self.context)

    def slice_shapes(self) -> list[tuple[int, int]]:
        """``(rows, cols)`` of every item, for :class:`SameShapeBatchSampler`."""
        return [self.series.shapes[uid][1:] for uid, _ in self.items]


class SameShapeBatchSampler(Sampler[list[int]]):
    """Batches of up to ``batch_size`` consecutive indices of ``sampler`` that share a shape."""

    def __init__(self, sampler: Sampler[int], shapes: Sequence[Any], batch_size: int) -> None:
        self.sampler = sampler
        self.shapes = list(shapes)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        batch: list[int] = []
        for index in self.sampler:
            if batch and (len(batch) == self.batch_size or self.shapes[index] != self.shapes[batch[0]]):
                yield batch
                batch = []
            batch.append(index)
        if batch:
            yield batch

    def __len__(self) -> int:
        return sum(1 for _ in self.__iter__())
