"""The book's code paths (chapters 12-14) that the benches time ours against, on the same data and machine.

- classifier training (p2ch12): float32 chunks augmented one at a time on the CPU in ``__getitem__`` with one
  ``grid_sample`` per sample, default collation, a channels-first float32 ``LunaModel``, SGD;
- segmenter training (p2ch13): ``getCtRawCandidate`` memoised in a diskcache ``FanoutCache`` (pickled float32
  chunks), a random 64x64 crop per sample, one augmentation transform per batch, a model ending in a sigmoid;
- diagnosis (p2ch14): every slice through a DataLoader of 7-slice float32 stacks, a thresholded, eroded mask,
  labelled components, one float32 chunk per candidate through a second DataLoader.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from diskcache import FanoutCache
from scipy import ndimage
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bench.common import route_convolutions, synchronize, time_batches
from p2ch_luna.data.augment import BOOK_NOISE_HU, BOOK_OFFSET, BOOK_SCALE, AugmentConfig
from p2ch_luna.data.candidates import CandidateDataset
from p2ch_luna.data.masks import grown_box_mask
from p2ch_luna.data.sampling import BalancedSampler
from p2ch_luna.data.segmentation import CONTEXT_SLICES, TRAIN_CROP, TRAIN_WINDOW
from p2ch_luna.diagnose.model_set import DiagnosisModels
from p2ch_luna.geometry import chunk_bounds
from p2ch_luna.io.ct import HU_MAX, HU_MIN, extract_chunk, find_series_path, load_ct
from p2ch_luna.models import LunaModel
from p2ch_luna.models.classifier import LunaConv3d
from p2ch_luna.models.unet import UNetWrapper
from p2ch_luna.training.losses import segmentation_loss

# --- classifier training (p2ch12) ---------------------------------------------------------
BOOK_CLASSIFIER_BATCH_SIZE = 32

BOOK_LR = 1e-3

BOOK_MOMENTUM = 0.99


class BookStyleDataset(torch.utils.data.Dataset):
    """Float32 chunks augmented one at a time on the CPU in ``__getitem__`` (book p2ch12)."""

    def __init__(self, dataset: CandidateDataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str, torch.Tensor]:
        item = self.dataset[index]
        chunk = item["image"].to(torch.float32)
        rng = random.Random(self.seed * 1_000_003 + index)
        return book_augment(chunk, rng), item["label"], item["series_uid"], item["center_irc"]


def book_augment(chunk: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """The book's per-sample augmentation: one random affine + grid_sample, then noise."""
    transform = torch.eye(4)
    for axis in range(3):
        if rng.random() > 0.5:
            transform[axis, axis] *= -1
        transform[axis, 3] = BOOK_OFFSET * (rng.random() * 2 - 1)
        transform[axis, axis] *= 1.0 + BOOK_SCALE * (rng.random() * 2 - 1)
    angle = rng.random() * math.pi * 2
    cos, sin = math.cos(angle), math.sin(angle)
    rotation = torch.tensor([[cos, -sin, 0, 0], [sin, cos, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float32)
    transform @= rotation
    volume = chunk.unsqueeze(0)
    grid = F.affine_grid(transform[:3].unsqueeze(0), list(volume.shape), align_corners=False)
    augmented = F.grid_sample(volume, grid, padding_mode="border", align_corners=False)[0]
    return augmented + torch.randn_like(augmented) * BOOK_NOISE_HU


def book_training_rate(dataset: CandidateDataset, sampler: BalancedSampler, workers: int, batches: int,
               device: torch.device = torch.device("cpu")) -> float:
    """Samples/s of the book's loop over ``batches`` batches after one warm-up batch per worker."""
    step = book_classifier_step(dataset, sampler, workers, device)
    for _ in range(max(1, workers)):  # warm-up: worker start, first allocations, one batch per worker
        step()
    return time_batches(step, batches, device)


def as_book_classifier(model: LunaModel) -> LunaModel:
    """``model`` computing as the book's LunaModel does, on any device: ``nn.BatchNorm3d`` on the input, then
    each convolution on cuDNN as ``nn.Conv3d`` (no folded batch norm, no channel padding, no Triton kernels)."""
    norm = torch.nn.BatchNorm3d(model.tail_batchnorm.num_features).to(model.tail_batchnorm.weight.device)
    norm.load_state_dict(model.tail_batchnorm.state_dict())
    norm.train(model.tail_batchnorm.training)
    model.tail_batchnorm = norm
    model.fold_input_normalisation = False
    route_convolutions(model, 0)
    for conv in model.modules():
        if isinstance(conv, LunaConv3d):
            conv.channel_multiple = 1
    return model


def book_classifier_step(dataset: CandidateDataset, sampler: BalancedSampler, workers: int,
                    device: torch.device) -> Callable[[], int]:
    """One step of the book's loop per call (the book's float32 channels-first model, per-sample CPU
    augmentation in the workers); returns the batch size."""
    torch.manual_seed(0)
    model = as_book_classifier(LunaModel(input_shape=dataset.chunk_shape_irc)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=BOOK_LR, momentum=BOOK_MOMENTUM)
    loader = torch.utils.data.DataLoader(BookStyleDataset(dataset, seed=0), batch_size=BOOK_CLASSIFIER_BATCH_SIZE,
                                         sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda")
    iterator = iter(loader)

    def step() -> int:
        images, labels, _uids, _centers = next(iterator)
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        model.train()
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        return len(labels)

    return step

# --- segmenter training (p2ch13) ----------------------------------------------------------

BOOK_SEGMENTATION_BATCH_SIZE = 16

BOOK_SHARDS = 64

BOOK_CHUNK_WIDTH = (2 * CONTEXT_SLICES + 1, TRAIN_WINDOW, TRAIN_WINDOW)


def book_raw_candidate(data_root: Path, cache_dir: Path, annotations: pd.DataFrame) -> Callable:
    """The book's memoised ``getCtRawCandidate(series_uid, center_xyz, width_irc)`` -> (ct, mask, irc)."""
    cache = FanoutCache(str(cache_dir), shards=BOOK_SHARDS, timeout=1)

    @functools.lru_cache(1, typed=True)
    def get_ct(series_uid: str):
        ct = load_ct(find_series_path(data_root, series_uid))
        hu = ct.hu.astype(np.float32)
        rows = annotations[annotations["series_uid"] == series_uid]
        centers = ct.geometry.xyz_to_irc(rows[["center_x", "center_y", "center_z"]].to_numpy(float)).reshape(-1, 3)
        return hu, grown_box_mask(hu, centers), ct.geometry

    @cache.memoize(typed=True)
    def get_raw_candidate(series_uid: str, center_xyz: tuple, width_irc: tuple):
        hu, mask, geometry = get_ct(series_uid)
        center_irc = geometry.xyz_to_irc(center_xyz)
        window = tuple(slice(start, end) for start, end in chunk_bounds(center_irc, width_irc, hu.shape))
        ct_chunk = np.array(hu[window])
        ct_chunk.clip(HU_MIN, HU_MAX, ct_chunk)
        return ct_chunk, np.array(mask[window]), center_irc

    return get_raw_candidate


class BookTrainingDataset(Dataset):
    """The book's ``TrainingLuna2dSegmentationDataset``: a random 64×64 crop of each nodule's 7×96×96 chunk."""

    def __init__(self, nodules: list[tuple[str, tuple[float, float, float]]], get_raw_candidate, size: int) -> None:
        self.nodules = nodules
        self.get_raw_candidate = get_raw_candidate
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        series_uid, center_xyz = self.nodules[index % len(self.nodules)]
        ct_a, pos_a, center_irc = self.get_raw_candidate(series_uid, center_xyz, BOOK_CHUNK_WIDTH)
        pos_a = pos_a[CONTEXT_SLICES:CONTEXT_SLICES + 1]
        limit = TRAIN_WINDOW - TRAIN_CROP
        row, col = random.randrange(0, limit), random.randrange(0, limit)
        ct_t = torch.from_numpy(ct_a[:, row:row + TRAIN_CROP, col:col + TRAIN_CROP]).to(torch.float32)
        pos_t = torch.from_numpy(pos_a[:, row:row + TRAIN_CROP, col:col + TRAIN_CROP]).to(torch.long)
        return ct_t, pos_t, series_uid, int(center_irc[0])


class BookSegmentationAugmentation(nn.Module):
    """The book's ``SegmentationAugmentation``: one random transform for the whole batch."""

    def __init__(self, config: AugmentConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, input_g: torch.Tensor, label_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        transform = self._transform().expand(input_g.shape[0], -1, -1).to(input_g.device, torch.float32)
        grid = F.affine_grid(transform[:, :2], input_g.size(), align_corners=False)
        input_g = F.grid_sample(input_g, grid, padding_mode="border", align_corners=False)
        label_g = F.grid_sample(label_g.to(torch.float32), grid, padding_mode="border", align_corners=False)
        if self.config.noise:
            input_g = input_g + torch.randn_like(input_g) * self.config.noise
        return input_g, label_g > 0.5

    def _transform(self) -> torch.Tensor:
        transform = torch.eye(3)
        for axis in range(2):
            if self.config.flip and random.random() > 0.5:
                transform[axis, axis] *= -1
            if self.config.offset:
                transform[2, axis] = self.config.offset * (random.random() * 2 - 1)
            if self.config.scale:
                transform[axis, axis] *= 1.0 + self.config.scale * (random.random() * 2 - 1)
        if self.config.rotate:
            angle = random.random() * math.pi * 2
            cos, sin = math.cos(angle), math.sin(angle)
            transform = transform @ torch.tensor([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]])
        return transform


def book_segmentation_epoch(model: nn.Module, augmentation: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
               device: torch.device, train: bool = True) -> tuple[int, float]:
    """One book-style epoch (``train=False``: only iterate the loader); (samples, seconds)."""
    samples, started = 0, time.perf_counter()
    for batch in loader:
        samples += book_segmentation_step(model, augmentation, optimizer, batch, device) if train else len(batch[0])
    synchronize(device)
    return samples, time.perf_counter() - started


def book_segmentation_step(model: nn.Module, augmentation: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple,
              device: torch.device) -> int:
    """The book's training step on one ``(input, label, series, slice)`` batch; returns its size."""
    input_t, label_t, _series, _slices = batch
    optimizer.zero_grad()
    input_g = input_t.to(device, non_blocking=True)
    label_g = label_t.to(device, non_blocking=True)
    input_g, label_g = augmentation(input_g, label_g)
    prediction_g = model(input_g)
    loss = segmentation_loss(prediction_g, label_g).mean()
    loss.backward()
    optimizer.step()
    return len(input_t)


class BookSegmentationModel(nn.Module):
    """The book's ``UNetWrapper``: ends with a sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.wrapper = UNetWrapper()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.wrapper(x))

# --- diagnosis (p2ch14) -------------------------------------------------------------------

BOOK_DIAGNOSE_BATCH_SIZE = 4

BOOK_CHUNK_SHAPE = (32, 48, 48)


class BookSlices(Dataset):
    """The book's Luna2dSegmentationDataset(fullCt_bool=True): a 7-slice float32 stack per item."""

    def __init__(self, hu: np.ndarray) -> None:
        self.hu = hu

    def __len__(self) -> int:
        return self.hu.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        stack = torch.zeros((2 * CONTEXT_SLICES + 1, *self.hu.shape[1:]))
        for channel, context in enumerate(range(index - CONTEXT_SLICES, index + CONTEXT_SLICES + 1)):
            context = min(max(context, 0), self.hu.shape[0] - 1)
            stack[channel] = torch.from_numpy(self.hu[context].astype(np.float32))
        return stack, index


class BookChunks(Dataset):
    """The book's LunaDataset on candidate centres: one float32 (1, I, R, C) chunk per item."""

    def __init__(self, hu: np.ndarray, centers: np.ndarray, shape: tuple[int, int, int] = BOOK_CHUNK_SHAPE) -> None:
        self.hu, self.centers, self.shape = hu, centers, shape

    def __len__(self) -> int:
        return len(self.centers)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(extract_chunk(self.hu, self.centers[index], self.shape).astype(np.float32))[None]


BOOK_DIAGNOSE_WORKERS = 4  # nodule_analysis's --num-workers default


@dataclasses.dataclass
class BookDiagnosis:
    """What the book-style diagnosis of one CT found: candidate centres (index, row, column), their nodule
    probabilities, and seconds per stage (segmentation, grouping, classification)."""

    centers_irc: np.ndarray
    probabilities: np.ndarray
    timings: dict[str, float]


def book_candidate_centers(probabilities: np.ndarray, clipped_hu: np.ndarray) -> np.ndarray:
    """The book's grouping (``groupSegmentationOutput``): probability > 0.5, one erosion, connected components,
    each one's centre of mass weighted by HU + 1001; rounded (index, row, column) centres, one row each."""
    mask = ndimage.binary_erosion(probabilities > 0.5, iterations=1)
    labels, count = ndimage.label(mask)
    centers = ndimage.center_of_mass(clipped_hu + 1001, labels, np.arange(1, count + 1))
    return np.rint(np.asarray(centers, dtype=np.float64).reshape(-1, 3)).astype(np.int64)


def book_diagnose_stages(hu: np.ndarray, segmentation: torch.nn.Module, classifier: torch.nn.Module,
                         device: torch.device = torch.device("cpu"), workers: int = 0) -> BookDiagnosis:
    """The book's diagnosis (p2ch14 ``nodule_analysis``) of one CT, stage by stage, in float32, no mirror views."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    clipped = np.clip(hu, HU_MIN, HU_MAX)
    output = np.zeros(hu.shape, dtype=np.float32)
    shape = tuple(getattr(classifier, "input_shape", BOOK_CHUNK_SHAPE))
    pin = device.type == "cuda"
    with torch.no_grad():
        for inputs, indices in DataLoader(BookSlices(clipped), batch_size=BOOK_DIAGNOSE_BATCH_SIZE, pin_memory=pin,
                                          num_workers=workers):
            prediction = torch.sigmoid(segmentation(inputs.to(device, non_blocking=True)))
            output[indices.numpy()] = prediction[:, 0].cpu().numpy()
        timings["segmentation_s"] = time.perf_counter() - started
        started = time.perf_counter()
        centers = book_candidate_centers(output, clipped)
        timings["grouping_s"] = time.perf_counter() - started
        started = time.perf_counter()
        probabilities = [torch.softmax(classifier(chunks.to(device, non_blocking=True)), dim=1)[:, 1].cpu()
                         for chunks in DataLoader(BookChunks(clipped, centers, shape), pin_memory=pin,
                                                  batch_size=BOOK_DIAGNOSE_BATCH_SIZE, num_workers=workers)]
        timings["classification_s"] = time.perf_counter() - started
    scores = torch.cat(probabilities).numpy() if probabilities else np.zeros(0, dtype=np.float32)
    return BookDiagnosis(centers_irc=centers, probabilities=scores, timings=timings)


def book_diagnose(hu: np.ndarray, segmentation: torch.nn.Module, classifier: torch.nn.Module,
               device: torch.device = torch.device("cpu"), workers: int = 0) -> int:
    """The book's diagnosis of one CT; returns the number of candidates classified."""
    return len(book_diagnose_stages(hu, segmentation, classifier, device, workers).centers_irc)


def book_copies(models: DiagnosisModels, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Copies of the segmentation and nodule models for the book-style path: on ``device``, default layout, the
    classifier computing as the book's."""
    segmentation, nodule = (copy.deepcopy(loaded.model).to(device, memory_format=torch.contiguous_format).eval()
                            for loaded in (models.segmentation, models.nodule))
    return segmentation, as_book_classifier(nodule)
