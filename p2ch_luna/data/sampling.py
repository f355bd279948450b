"""Samplers: balanced training epochs and sharded validation, seeded and DDP-aware.

Every training epoch is one *global* sequence of dataset indices drawn from a
generator seeded by ``(seed, epoch)``; with ``world_size`` processes, rank
``r`` takes positions ``r, r + world_size, ...`` of it, so ranks are disjoint
and their union is the global sequence. The same seed and epoch give the
same sequence whatever the number of processes, which is what makes
``--resume`` and 1-vs-N-process runs reproducible.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

log = logging.getLogger(__name__)

EPOCH_SEED_STRIDE = 1_000_003
"""Mixes the epoch into the seed: (seed, epoch) -> seed * stride + epoch."""


def epoch_seed(seed: int, epoch: int) -> int:
    """One integer seed for (``seed``, ``epoch``); used by samplers and augmentation."""
    return (int(seed) * EPOCH_SEED_STRIDE + int(epoch)) % 2**63


def equal_bin_weights(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """One weight per value such that every bin of ``edges`` (``np.digitize``'s: below the first edge, between
    neighbours, from the last one up) that holds values weighs the same in total; the weights sum to 1."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return np.zeros(0)
    bins = np.digitize(values, np.asarray(edges, dtype=np.float64))
    counts = np.bincount(bins)
    weights = 1.0 / counts[bins]
    return weights / weights.sum()


def shard_length(total: int, rank: int, world_size: int) -> int:
    """How many of ``total`` strided positions rank ``rank`` gets."""
    return len(range(rank, total, world_size))


class BalancedSampler(Sampler[int]):
    """Training order with ``ratio`` negatives per positive (0: unbalanced, natural mix).

    ``labels`` holds one boolean per dataset item (True = positive). With a
    ratio, each epoch cycles through shuffled positives and shuffled negatives
    (as the book's ``ratio_int``) and exactly one in ``ratio + 1`` samples is
    positive; the order is then shuffled. Without a ratio, the epoch is a
    random permutation of the dataset (repeated when ``epoch_size`` is larger).
    ``epoch_size`` counts samples over all ranks and is rounded down to a
    multiple of ``world_size`` so every rank runs the same number of batches.

    ``hard`` marks some negatives as hard (mined from our own segmenter's candidates): with a ratio,
    ``hard_fraction`` of the negative slots are drawn from them (cycled as above) and the rest from the
    other negatives, whatever their numbers; without one, every item is drawn alike. ``hard_weights`` (one
    per item, read for the hard negatives) draws them with replacement in proportion to it instead of cycling
    them (:func:`equal_bin_weights` of their diameters: every size drawn alike).
    """

    def __init__(
        self,
        labels: np.ndarray,
        ratio: int = 0,
        epoch_size: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        hard: np.ndarray | None = None,
        hard_fraction: float = 0.0,
        hard_weights: np.ndarray | None = None,
    ) -> None:
        self.labels = np.asarray(labels, dtype=bool)
        hard = np.zeros(self.labels.size, dtype=bool) if hard is None else np.asarray(hard, dtype=bool)
        if not 0.0 <= hard_fraction <= 1.0:
            raise ValueError(f"hard_fraction must lie in [0, 1], not {hard_fraction}")
        if ratio < 0:
            raise ValueError(f"ratio must be >= 0, not {ratio}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.positive_indices = np.flatnonzero(self.labels)
        self.negative_indices = np.flatnonzero(~self.labels)
        self.hard_fraction = float(hard_fraction) if ratio else 0.0
        self.hard_indices = np.flatnonzero(~self.labels & hard)
        self.easy_indices = np.flatnonzero(~self.labels & ~hard)
        if self.hard_fraction > 0 and self.hard_indices.size == 0:
            raise ValueError("hard_fraction > 0 needs hard negatives; none are marked")
        if self.hard_fraction < 1 and self.hard_indices.size and self.easy_indices.size == 0:
            self.hard_fraction = 1.0
        self.hard_probabilities: np.ndarray | None = None
        if hard_weights is not None and self.hard_indices.size:
            weights = np.asarray(hard_weights, dtype=np.float64)
            if weights.shape != self.labels.shape:
                raise ValueError(f"hard_weights has {weights.size} values for {self.labels.size} items")
            weights = weights[self.hard_indices]
            if not (np.isfinite(weights).all() and (weights >= 0).all() and weights.sum() > 0):
                raise ValueError("hard_weights must be finite, >= 0 and not all 0 over the hard negatives")
            self.hard_probabilities = weights / weights.sum()
        if ratio and (self.positive_indices.size == 0 or self.negative_indices.size == 0):
            raise ValueError(
                f"a balanced epoch needs positives and negatives; have {self.positive_indices.size} "
                f"positive and {self.negative_indices.size} negative samples"
            )
        self.ratio = int(ratio)
        total = self.labels.size if epoch_size is None else int(epoch_size)
        self.global_size = (total // world_size) * world_size
        if self.global_size <= 0:
            raise ValueError(f"epoch size {total} is smaller than the {world_size} processes")
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_indices(self) -> np.ndarray:
        """This epoch's sequence over all ranks."""
        rng = np.random.default_rng(epoch_seed(self.seed, self.epoch))
        if not self.ratio:
            repeats = -(-self.global_size // self.labels.size)
            order = np.concatenate([rng.permutation(self.labels.size) for _ in range(repeats)])
            return order[: self.global_size]
        slots = np.arange(self.global_size)
        is_positive_slot = slots % (self.ratio + 1) == 0
        n_positive = int(is_positive_slot.sum())
        sequence = np.empty(self.global_size, dtype=np.int64)
        sequence[is_positive_slot] = _cycled_permutation(self.positive_indices, n_positive, rng)
        n_negative = self.global_size - n_positive
        if self.hard_fraction > 0:
            n_hard = int(round(self.hard_fraction * n_negative))
            hard = (_cycled_permutation(self.hard_indices, n_hard, rng) if self.hard_probabilities is None else
                    rng.choice(self.hard_indices, size=n_hard, p=self.hard_probabilities))
            negatives = np.concatenate([hard,
                                        _cycled_permutation(self.easy_indices, n_negative - n_hard, rng)])
            sequence[~is_positive_slot] = negatives[rng.permutation(n_negative)]
        else:
            sequence[~is_positive_slot] = _cycled_permutation(self.negative_indices, n_negative, rng)
        return sequence[rng.permutation(self.global_size)]

    def __iter__(self) -> Iterator[int]:
        return iter(self.global_indices()[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return self.global_size // self.world_size


class ShardedSequentialSampler(Sampler[int]):
    """Indices ``0..size-1`` (capped by ``limit``, evenly spread when capped) strided by rank.

    Every index appears on exactly one rank; nothing is padded, so gathered
    validation metrics count each sample once.
    """

    def __init__(self, size: int, limit: int | None = None, rank: int = 0, world_size: int = 1) -> None:
        if limit is not None and limit < size:
            self.indices = np.linspace(0, size - 1, num=max(limit, 0)).round().astype(np.int64)
            self.indices = np.unique(self.indices)
        else:
            self.indices = np.arange(size, dtype=np.int64)
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return shard_length(self.indices.size, self.rank, self.world_size)


def set_sampler_epoch(loader: Any, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on a loader's sampler (or batch sampler) when it has one."""
    for attribute in ("sampler", "batch_sampler"):
        sampler = getattr(loader, attribute, None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        inner = getattr(sampler, "sampler", None)
        if hasattr(inner, "set_epoch") and inner is not sampler:
            inner.set_epoch(epoch)


def _cycled_permutation(indices: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` items from ``indices``: shuffled, and reshuffled each time it wraps around."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    repeats = -(-count // indices.size)
    return np.concatenate([rng.permutation(indices) for _ in range(repeats)])[:count]


def make_generator(seed: int, epoch: int, device: torch.device, rank: int = 0) -> torch.Generator:
    """A torch generator on ``device`` seeded by (``seed``, ``epoch``, ``rank``), for on-device augmentation.

    Each rank draws its own augmentation stream; rank 0's is the one-process stream.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed((epoch_seed(seed, epoch) + rank * EPOCH_SEED_STRIDE**2) % 2**63)
    return generator
