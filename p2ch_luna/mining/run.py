"""Mining one data folder: lungs → segmentation → grouping on each training series, labelled by the radius rule."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from p2ch_luna.data.luna import ANNOTATIONS_FILE, VALIDATION_STRIDE, read_candidate_table, split_by_series
from p2ch_luna.diagnose.grouping import group_candidates
from p2ch_luna.diagnose.lungs import find_lungs
from p2ch_luna.diagnose.segment import CPU_SEGMENTATION_BATCH, CUDA_SEGMENTATION_BATCH, segment_ct
from p2ch_luna.errors import DataError
from p2ch_luna.evaluation.truth import Truth, luna_annotations, luna_detections, read_truth
from p2ch_luna.io.ct import Ct, list_series_on_disk, load_ct
from p2ch_luna.io.digest import file_digest
from p2ch_luna.metrics.froc import radius_hits
from p2ch_luna.mining import store
from p2ch_luna.mining.labels import label_by_radius
from p2ch_luna.models.checkpoint import load_checkpoint
from p2ch_luna.models.layout import channels_last
from p2ch_luna.paths import Paths

log = logging.getLogger(__name__)


@dataclasses.dataclass
class MinedTable:
    """A mined table and where it lies."""

    folder: Path
    table: pd.DataFrame
    series_count: int

    @property
    def path(self) -> Path:
        return self.folder / store.TABLE_FILE


def mine_ct(ct: Ct, model: torch.nn.Module, params: store.MiningParams, device: torch.device) -> pd.DataFrame:
    """The candidates diagnosis would classify in ``ct`` (before classification and its suppression)."""
    return candidates_in_lungs(ct, lung_mask(ct, params), model, params, device)


def lung_mask(ct: Ct, params: store.MiningParams) -> np.ndarray:
    """The diagnosis' lung region of ``ct`` (boolean, the CT's shape), with ``params``' margin."""
    spacing = tuple(float(v) for v in ct.geometry.spacing_irc)
    return find_lungs(ct.hu, spacing, margin_mm=params.lung_margin_mm).mask


def candidates_in_lungs(ct: Ct, lungs: np.ndarray, model: torch.nn.Module, params: store.MiningParams,
                        device: torch.device) -> pd.DataFrame:
    """:func:`mine_ct` with the lung region ``lungs`` already found; the caller puts ``model`` in eval mode and
    turns gradients off (``torch.inference_mode``)."""
    batch = CUDA_SEGMENTATION_BATCH if device.type == "cuda" else CPU_SEGMENTATION_BATCH
    mask = segment_ct(ct.hu, lungs, model, params.segmentation_threshold, batch, device)
    candidates = group_candidates(ct.hu, mask, lungs, ct, params.erosion_iterations, params.grouping,
                                  workers=torch.get_num_threads(), max_shell_fill=params.max_shell_fill,
                                  min_diameter_mm=params.min_diameter_mm)
    return candidates[["series_uid", "center_x", "center_y", "center_z", "diameter_mm", "voxel_count"]]


def training_series(data_root: Path, val_stride: int = VALIDATION_STRIDE) -> list[str]:
    """The series a training run with ``--val-stride`` trains on: those of the LUNA16 CSVs on disk, less every
    ``val_stride``-th (the validation series, never mined)."""
    table = read_candidate_table(data_root)
    train, _ = split_by_series(table["series_uid"], val_stride)
    return train


def mine(paths: Paths, segmentation_path: Path, series_uids: Sequence[str], device: torch.device,
         params: store.MiningParams = store.MiningParams(), progress: bool = True) -> MinedTable:
    """The mined table of ``series_uids`` under ``paths``: read when one made from the same inputs is there,
    else mined (resuming the series an interrupted run finished) and stored."""
    data_root = paths.require_data_root()
    annotations = data_root / ANNOTATIONS_FILE
    if not annotations.is_file():
        raise DataError(f"mining needs annotations: {annotations} does not exist")
    truth = read_truth(data_root)
    on_disk = list_series_on_disk(data_root)
    missing = [uid for uid in series_uids if uid not in on_disk]
    if missing:
        raise DataError(f"series {missing[0]} to mine is not under {data_root} ({len(missing)} missing)")
    if not series_uids:
        raise DataError(f"no series to mine under {data_root}")
    series = {uid: on_disk[uid] for uid in series_uids}
    segmentation_path = Path(segmentation_path)
    if not segmentation_path.is_file():
        raise DataError(f"segmentation checkpoint {segmentation_path} does not exist")
    key = store.mining_key(file_digest(segmentation_path), params, series, file_digest(annotations))
    folder = store.table_folder(paths.cache_dir, key)
    table = store.load_table(folder, key)
    if table is not None:
        log.info("mined candidates of %d series: reusing %s", len(series), folder / store.TABLE_FILE)
        return MinedTable(folder, table, len(series))
    loaded = load_checkpoint(segmentation_path, "segmentation", map_location=device)
    model = channels_last(loaded.model.to(device).eval())
    store.start_table(folder, key, {"segmentation": str(segmentation_path), "data_root": str(data_root),
                                    "params": dataclasses.asdict(params), "series": len(series)})
    tables = []
    for series_uid in tqdm(sorted(series), desc="mining", unit="series", disable=not progress):
        done = store.load_series(folder, series_uid)
        if done is None:
            ct = load_ct(series[series_uid], series_uid)
            with torch.inference_mode():
                done = label_by_radius(mine_ct(ct, model, params, device), truth)
            store.save_series(folder, series_uid, done)
        tables.append(done)
    table = store.finish_table(folder, tables)
    log_summary(table, truth, list(series))
    return MinedTable(folder, table, len(series))


def nodules_with_a_candidate(table: pd.DataFrame, truth: Truth, series_uids: Sequence[str]) -> tuple[int, int]:
    """How many annotated nodules of ``series_uids`` at least one mined candidate hits, of how many."""
    nodules = truth.nodules[truth.nodules["series_uid"].isin(set(series_uids))]
    hit = 0
    for series_uid, rows in nodules.groupby("series_uid"):
        candidates = table[table["series_uid"] == series_uid]
        if len(candidates):
            hits = radius_hits(luna_annotations(rows), luna_detections(candidates.assign(nodule_probability=0.0)))
            hit += int(hits.any(axis=1).sum())
    return hit, len(nodules)


def log_summary(table: pd.DataFrame, truth: Truth, series_uids: Sequence[str]) -> None:
    """Candidates per CT and the segmenter's recall (annotated nodules with a candidate)."""
    per_ct = table.groupby("series_uid").size().reindex(list(series_uids), fill_value=0).to_numpy()
    hit, total = nodules_with_a_candidate(table, truth, series_uids)
    log.info("mined %d candidates in %d series (%.0f per CT, %d to %d; %d on a nodule); %d of %d annotated "
             "nodules have a candidate", len(table), len(series_uids), per_ct.mean(), per_ct.min(), per_ct.max(),
             int(table["is_nodule"].sum()), hit, total)
