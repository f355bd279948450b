"""Candidate tables and the chunk dataset over the tiny synthetic LUNA16 set."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from batch_checks import assert_same_batch
from p2ch_luna.cache import ChunkCache
from p2ch_luna.datasets import CandidateDataset, malignancy_table, nodule_table, split_table
from p2ch_luna.luna import read_candidate_table
from p2ch_luna.tasks.base import collate_batch

CHUNK = (8, 16, 16)


def _table() -> pd.DataFrame:
    rows = [
        # series, is_nodule, is_malignant, source
        ("a", True, True, "annotation"),
        ("a", True, False, "annotation"),
        ("b", True, pd.NA, "annotation"),
        ("a", True, True, "candidate"),
        ("a", False, False, "candidate"),
        ("b", False, False, "candidate"),
        ("b", False, False, "candidate"),
    ]
    frame = pd.DataFrame(rows, columns=["series_uid", "is_nodule", "is_malignant", "source"])
    frame["is_malignant"] = frame["is_malignant"].astype("boolean")
    frame["center_x"] = frame["center_y"] = frame["center_z"] = np.arange(len(rows), dtype=float)
    return frame


def test_nodule_table_takes_annotations_as_positives_and_class0_candidates_as_negatives() -> None:
    table = nodule_table(_table())
    assert table["label"].tolist() == [True, True, True, False, False, False]
    assert (table.loc[table["label"], "source"] == "annotation").all()
    assert not table.loc[~table["label"], "is_nodule"].any()


def test_malignancy_table_skips_unknown_and_can_add_non_nodules() -> None:
    table = malignancy_table(_table())
    assert table["label"].tolist() == [True, False]
    mixed = malignancy_table(_table(), non_nodules_per_benign=2.0, seed=1)
    assert mixed["label"].tolist() == [True, False, False, False]
    assert (mixed["source"] == "candidate").sum() == 2


def test_split_keeps_each_series_on_one_side(tiny_dataset: Path) -> None:
    table = nodule_table(read_candidate_table(tiny_dataset))
    train, val = split_table(table, val_stride=3)
    assert not set(train["series_uid"]) & set(val["series_uid"])
    assert len(train) + len(val) == len(table)


@pytest.fixture(scope="module")
def dataset(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> CandidateDataset:
    table = nodule_table(read_candidate_table(tiny_dataset))
    cache = ChunkCache(tmp_path_factory.mktemp("cache"), tiny_dataset)
    return CandidateDataset(table, cache, CHUNK)


def test_item_is_a_dict_with_an_int16_chunk(dataset: CandidateDataset) -> None:
    item = dataset[0]
    assert item["image"].shape == (1, *CHUNK) and item["image"].dtype == torch.int16
    assert item["label"].item() == 1
    assert item["series_uid"] == dataset.table.loc[0, "series_uid"]
    assert item["center_irc"].shape == (3,)
    assert item["image"].min() >= -1000 and item["image"].max() <= 1000


def test_batched_fetch_matches_items(dataset: CandidateDataset) -> None:
    indices = [0, len(dataset) - 1, 3]
    batch = collate_batch(dataset.__getitems__(indices))
    assert_same_batch(batch, torch.utils.data.default_collate([dataset[index] for index in indices]))
    assert batch["image"].shape == (3, 1, *CHUNK) and batch["index"].tolist() == indices


def test_dataset_pickles_and_works_in_a_worker(dataset: CandidateDataset) -> None:
    clone = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(clone[5]["image"], dataset[5]["image"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=[5, 1, 2, 0], num_workers=1,
                                         collate_fn=collate_batch)
    batch = next(iter(loader))
    assert torch.equal(batch["image"][0], dataset[5]["image"])
