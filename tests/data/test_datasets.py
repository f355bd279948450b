"""Candidate tables and the chunk dataset over the tiny synthetic LUNA16 set."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from p2ch_luna.data.cache import ChunkCache
from p2ch_luna.data.candidates import (
    CandidateDataset,
    drop_centres_outside,
    malignancy_table,
    nodule_table,
    split_table,
)
from p2ch_luna.data.luna import read_candidate_table
from p2ch_luna.geometry import Geometry
from p2ch_luna.training.tasks.base import collate_batch
from tests.batch_checks import assert_same_batch

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


def test_rows_centred_outside_their_ct_are_left_out_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """Nearest-voxel rule per series geometry (a flipped axis included); all-inside tables come back as they are."""
    upright = Geometry(np.array([-10.0, -20.0, -30.0]), np.array([1.0, 1.0, 2.0]), np.eye(3), (10, 20, 20))
    flipped = Geometry(np.array([0.0, 0.0, 0.0]), np.array([1.0, 1.0, 1.0]), np.diag([1.0, 1.0, -1.0]), (5, 8, 8))
    table = pd.DataFrame({
        "series_uid": ["a", "a", "b", "a", "b", "b"],
        "center_x": [-10.0, 9.4, 3.0, 9.6, 3.0, 3.0],
        "center_y": [-20.0, -1.0, 3.0, -1.0, 3.0, 3.0],
        "center_z": [-30.0, -12.0, -4.4, -12.0, -4.6, 0.6],
        "label": [True, False, False, False, True, False],
    })
    with caplog.at_level("WARNING", logger="p2ch_luna.data.candidates"):
        kept = drop_centres_outside(table, {"a": upright, "b": flipped})
    # a: x 9.6 is voxel col 20 of 20; b: z -4.6 is index 5 of 5 and z 0.6 index -1
    assert kept["center_x"].tolist() == [-10.0, 9.4, 3.0]
    assert kept["center_z"].tolist() == [-30.0, -12.0, -4.4]
    assert "3 row(s) left out" in caplog.text and "series a at (9.6, -1.0, -12.0) mm" in caplog.text
    caplog.clear()
    assert drop_centres_outside(kept, {"a": upright, "b": flipped}) is kept
    assert not caplog.text


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
