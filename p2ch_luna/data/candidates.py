"""Candidate datasets for the nodule and malignancy classifiers.

Rows come from the LUNA16 candidate table (:func:`p2ch_luna.data.luna.read_candidate_table`),
chunks from the chunk cache (:class:`p2ch_luna.data.cache.ChunkCache`). A sample is a
dict::

    image       int16 tensor (1, I, R, C) of clipped HU (converted to float on the device)
    label       int64 tensor (): 1 = positive (nodule / malignant)
    series_uid  str
    center_irc  int64 tensor (3,)
    index       int64 tensor (): row of the dataset's table

Chunks stay int16 until they reach the training device: a quarter of the
bytes to copy, and the float conversion runs batched where the model runs.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from p2ch_luna.columns import CENTER_COLUMNS
from p2ch_luna.data.cache import ChunkCache
from p2ch_luna.data.luna import VALIDATION_STRIDE, split_by_series
from p2ch_luna.errors import DataError
from p2ch_luna.geometry import Geometry
from p2ch_luna.models.classifier import CHUNK_SHAPE_IRC

log = logging.getLogger(__name__)

LABEL_COLUMN = "label"


def nodule_table(candidates: pd.DataFrame) -> pd.DataFrame:
    """Nodule-vs-non-nodule rows (book ch. 14): annotations are positives, class-0 candidates negatives."""
    positives = candidates[candidates["source"] == "annotation"]
    negatives = candidates[(candidates["source"] == "candidate") & ~candidates["is_nodule"].astype(bool)]
    table = pd.concat([positives, negatives], ignore_index=True)
    table[LABEL_COLUMN] = np.r_[np.ones(len(positives), bool), np.zeros(len(negatives), bool)]
    return table


MINED_SOURCE = "mined"
"""``source`` of the rows mined from our own segmenter (:mod:`p2ch_luna.mining`)."""


def add_mined_rows(table: pd.DataFrame, mined: pd.DataFrame) -> pd.DataFrame:
    """``table`` (a nodule table) with the mined candidates appended: those on a nodule (radius rule) as
    positives at the centre the grouping gave them, the others as hard negatives (``source == "mined"``)."""
    rows = mined[["series_uid", *CENTER_COLUMNS, "diameter_mm", "is_nodule"]].copy()
    rows["source"] = MINED_SOURCE
    rows[LABEL_COLUMN] = rows["is_nodule"].astype(bool).to_numpy()
    return pd.concat([table, rows], ignore_index=True)


def mined_negatives(table: pd.DataFrame) -> np.ndarray:
    """Which rows of ``table`` are mined negatives (the sampler's hard pool)."""
    if "source" not in table:
        return np.zeros(len(table), dtype=bool)
    return ((table["source"] == MINED_SOURCE) & ~table[LABEL_COLUMN].astype(bool)).to_numpy()


def malignancy_table(
    candidates: pd.DataFrame, non_nodules_per_benign: float = 0.0, seed: int = 0
) -> pd.DataFrame:
    """Malignant (positive) vs benign annotated nodules with known malignancy.

    With ``non_nodules_per_benign`` > 0, that many non-nodule candidates per
    benign nodule (a seeded random pick) join the benign class, as the book's
    ch. 14 mix of benign nodules and non-nodules.
    """
    annotations = candidates[(candidates["source"] == "annotation") & candidates["is_malignant"].notna()]
    table = annotations.copy()
    table[LABEL_COLUMN] = table["is_malignant"].astype(bool).to_numpy()
    if non_nodules_per_benign > 0:
        pool = candidates[(candidates["source"] == "candidate") & ~candidates["is_nodule"].astype(bool)]
        count = min(len(pool), int(round(non_nodules_per_benign * int((~table[LABEL_COLUMN]).sum()))))
        rng = np.random.default_rng(seed)
        picked = pool.iloc[np.sort(rng.choice(len(pool), size=count, replace=False))].copy()
        picked[LABEL_COLUMN] = False
        table = pd.concat([table, picked], ignore_index=True)
    return table.reset_index(drop=True)


def drop_centres_outside(table: pd.DataFrame, geometries: Mapping[str, Geometry]) -> pd.DataFrame:
    """``table`` without the rows whose centre's nearest voxel lies outside their series' CT, with one warning
    saying how many and naming the first (such a row would stop training whenever the sampler drew it; the
    segmenter's masks skip such annotations likewise)."""
    centres = table[list(CENTER_COLUMNS)].to_numpy(dtype=np.float64)
    inside = np.ones(len(table), dtype=bool)
    for series_uid, rows in table.groupby("series_uid", sort=False).indices.items():
        geometry = geometries[series_uid]
        inside[rows] = geometry.contains_irc(geometry.xyz_to_irc(centres[rows])).reshape(-1)
    if inside.all():
        return table
    first = table.iloc[int(np.argmin(inside))]
    log.warning("%d row(s) left out: their centre lies outside their CT (the first: series %s at (%s) mm)",
                int((~inside).sum()), first["series_uid"],
                ", ".join(f"{float(first[column]):.1f}" for column in CENTER_COLUMNS))
    return table[inside].reset_index(drop=True)


def split_table(table: pd.DataFrame, val_stride: int = VALIDATION_STRIDE) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Book split by series: every ``val_stride``-th series (sorted by UID) is validation."""
    train_uids, val_uids = split_by_series(table["series_uid"], val_stride)
    is_val = table["series_uid"].isin(set(val_uids)).to_numpy()
    if not train_uids or not val_uids:
        raise DataError(
            f"{table['series_uid'].nunique()} series are too few to split into training and "
            f"validation with --val-stride {val_stride}"
        )
    return table[~is_val].reset_index(drop=True), table[is_val].reset_index(drop=True)


class CandidateDataset(Dataset):
    """Chunks around the table's centres with the table's ``label`` column.

    Picklable (the cache reopens itself in each DataLoader worker).
    """

    def __init__(self, table: pd.DataFrame, cache: ChunkCache,
                 chunk_shape_irc: Sequence[int] = CHUNK_SHAPE_IRC) -> None:
        if LABEL_COLUMN not in table:
            raise ValueError(f"table needs a {LABEL_COLUMN!r} column")
        self.table = table.reset_index(drop=True)
        self.cache = cache
        self.chunk_shape_irc = tuple(int(n) for n in chunk_shape_irc)
        self.series_uids = self.table["series_uid"].astype(str).tolist()
        self.centers_xyz = self.table[list(CENTER_COLUMNS)].to_numpy(dtype=np.float64)
        self.labels = self.table[LABEL_COLUMN].to_numpy(dtype=bool)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict[str, Any]:
        series_uid = self.series_uids[index]
        chunk, center_irc = self.cache.chunk(series_uid, self.centers_xyz[index], self.chunk_shape_irc)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(chunk)).unsqueeze(0),
            "label": torch.tensor(int(self.labels[index]), dtype=torch.long),
            "series_uid": series_uid,
            "center_irc": torch.as_tensor(np.asarray(center_irc, dtype=np.int64)),
            "index": torch.tensor(index, dtype=torch.long),
        }

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        """A whole collated batch at once (the DataLoader's batched-fetch hook): chunks cut straight
        into one batch array, no per-item tensors or collate."""
        images = np.empty((len(indices), *self.ring_arrays()["image"][0]), dtype=np.int16)
        return {"image": torch.from_numpy(images), **self.fill_batch(indices, {"image": images})}

    def ring_arrays(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per-sample shape and dtype of the batch's large arrays (see :mod:`p2ch_luna.data.batch_ring`)."""
        return {"image": ((1, *self.chunk_shape_irc), torch.int16)}

    def fill_batch(self, indices: Sequence[int], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        """Write the chunks of ``indices`` into ``arrays["image"]`` (B, 1, I, R, C); the batch's other values."""
        images = arrays["image"]
        centers = np.empty((len(indices), 3), dtype=np.int64)
        for position, index in enumerate(indices):
            _, centers[position] = self.cache.chunk(self.series_uids[index], self.centers_xyz[index],
                                                    self.chunk_shape_irc, out=images[position, 0])
        rows = np.asarray(indices, dtype=np.int64)
        return {
            "label": torch.from_numpy(self.labels[rows].astype(np.int64)),
            "series_uid": [self.series_uids[index] for index in rows],
            "center_irc": torch.from_numpy(centers),
            "index": torch.from_numpy(rows),
        }


def positive_count(dataset: CandidateDataset) -> tuple[int, int]:
    """(positives, negatives) of a dataset, for log lines."""
    positives = int(dataset.labels.sum())
    return positives, len(dataset) - positives
