"""Balanced and sharded samplers: ratios, determinism, and DDP shards."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from p2ch_luna.data.sampling import (
    BalancedSampler,
    ShardedSequentialSampler,
    epoch_seed,
    make_generator,
    set_sampler_epoch,
)

LABELS = np.array([True] * 7 + [False] * 50)


@pytest.mark.parametrize("ratio", [1, 2, 5])
def test_ratio_gives_exact_share_of_positives(ratio: int) -> None:
    epoch_size = 600
    indices = np.array(list(BalancedSampler(LABELS, ratio=ratio, epoch_size=epoch_size, seed=3)))
    assert len(indices) == epoch_size
    assert LABELS[indices].sum() == epoch_size // (ratio + 1)


def test_balanced_epoch_cycles_through_every_positive_evenly() -> None:
    indices = list(BalancedSampler(LABELS, ratio=1, epoch_size=7 * 2 * 3, seed=0))
    counts = Counter(index for index in indices if LABELS[index])
    assert set(counts) == set(np.flatnonzero(LABELS))
    assert set(counts.values()) == {3}


def test_unbalanced_epoch_is_a_permutation() -> None:
    sampler = BalancedSampler(LABELS, ratio=0, seed=1)
    assert sorted(sampler) == list(range(len(LABELS)))


def test_same_seed_and_epoch_give_the_same_order_and_epochs_differ() -> None:
    first = BalancedSampler(LABELS, ratio=1, epoch_size=100, seed=5)
    second = BalancedSampler(LABELS, ratio=1, epoch_size=100, seed=5)
    first.set_epoch(2)
    second.set_epoch(2)
    assert list(first) == list(second)
    second.set_epoch(3)
    assert list(first) != list(second)
    assert epoch_seed(5, 2) != epoch_seed(5, 3)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("ratio", [0, 2])
def test_shards_are_disjoint_and_cover_the_global_epoch(world_size: int, ratio: int) -> None:
    epoch_size = 101
    reference = BalancedSampler(LABELS, ratio=ratio, epoch_size=epoch_size, seed=9, world_size=world_size)
    reference.set_epoch(4)
    global_order = reference.global_indices()
    assert len(global_order) == epoch_size // world_size * world_size
    shards = []
    for rank in range(world_size):
        sampler = BalancedSampler(LABELS, ratio=ratio, epoch_size=epoch_size, seed=9, rank=rank, world_size=world_size)
        sampler.set_epoch(4)
        shards.append(list(sampler))
        assert len(sampler) == len(shards[-1]) == epoch_size // world_size
    positions = [set(range(rank, len(global_order), world_size)) for rank in range(world_size)]
    assert all(not (a & b) for i, a in enumerate(positions) for b in positions[i + 1:])
    interleaved = np.empty(len(global_order), dtype=np.int64)
    for rank, shard in enumerate(shards):
        interleaved[rank::world_size] = shard
    np.testing.assert_array_equal(interleaved, global_order)


def test_sequential_shards_cover_every_index_once() -> None:
    shards = [list(ShardedSequentialSampler(11, rank=rank, world_size=3)) for rank in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))
    assert [len(ShardedSequentialSampler(11, rank=rank, world_size=3)) for rank in range(3)] == [4, 4, 3]


def test_sequential_limit_spreads_over_the_dataset() -> None:
    indices = list(ShardedSequentialSampler(100, limit=5))
    assert len(indices) == 5 and indices[0] == 0 and indices[-1] == 99


def test_balanced_sampler_refuses_missing_class() -> None:
    with pytest.raises(ValueError, match="positives and negatives"):
        BalancedSampler(np.zeros(10, bool), ratio=1)


def test_set_sampler_epoch_reaches_a_loader_sampler() -> None:
    sampler = BalancedSampler(LABELS, ratio=1, epoch_size=20)
    loader = torch.utils.data.DataLoader(list(range(len(LABELS))), sampler=sampler, batch_size=4)
    set_sampler_epoch(loader, 7)
    assert sampler.epoch == 7


def test_augmentation_generators_depend_on_epoch_and_rank() -> None:
    draw = lambda epoch, rank: torch.rand(3, generator=make_generator(0, epoch, torch.device("cpu"), rank))
    assert torch.equal(draw(1, 0), draw(1, 0))
    assert not torch.equal(draw(1, 0), draw(2, 0))
    assert not torch.equal(draw(1, 0), draw(1, 1))
