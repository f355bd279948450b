"""Segmentation: samples, sampler, loss, TensorBoard overlay and a tiny end-to-end training run."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from p2ch_luna.data.cache import ChunkCache
from p2ch_luna.data.luna import ANNOTATIONS_FILE, read_annotations
from p2ch_luna.data.segmentation import (
    CANDIDATE_CROP,
    RANDOM_CROP,
    SameShapeBatchSampler,
    SegmentationSeries,
    SegmentationTrainDataset,
    SegmentationTrainSampler,
    SegmentationValDataset,
    context_indices,
    crop_start,
    read_sample,
    validation_slices,
)
from p2ch_luna.io.ct import HU_MIN, list_series_on_disk
from p2ch_luna.training.losses import dice_loss, segmentation_loss
from p2ch_luna.training.tasks.segmentation import OVERLAY_COLORS, overlay_image


class _ArraySeries:
    """Stands in for SegmentationSeries with in-memory arrays (what read_sample needs)."""

    def __init__(self, hu: np.ndarray, mask: np.ndarray) -> None:
        self.hu, self.mask_array = hu, mask

    def volume(self, series_uid: str) -> np.ndarray:
        return self.hu

    def mask_window(self, series_uid: str, slice_index: int, rows: slice, cols: slice) -> np.ndarray:
        return self.mask_array[slice_index, rows, cols]


@pytest.fixture(scope="module")
def tiny_series(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> SegmentationSeries:
    cache = ChunkCache(tmp_path_factory.mktemp("seg_cache"), tiny_dataset)
    annotations = read_annotations(tiny_dataset / ANNOTATIONS_FILE)
    return SegmentationSeries(cache, sorted(list_series_on_disk(tiny_dataset)), annotations, progress=False)


def test_context_indices_clamp_at_both_ends() -> None:
    np.testing.assert_array_equal(context_indices(0, 10), [0, 0, 0, 0, 1, 2, 3])
    np.testing.assert_array_equal(context_indices(9, 10), [6, 7, 8, 9, 9, 9, 9])
    np.testing.assert_array_equal(context_indices(5, 10, context=1), [4, 5, 6])


def test_read_sample_clamps_context_and_pads_outside() -> None:
    hu = np.broadcast_to(np.arange(5, dtype=np.int16)[:, None, None] * 100, (5, 8, 8)).copy()
    mask = np.zeros((5, 8, 8), dtype=bool)
    mask[4, 2, 5] = True
    first = read_sample(_ArraySeries(hu, mask), "uid", 0)
    assert first["image"].shape == (7, 8, 8) and first["mask"].shape == (1, 8, 8)
    np.testing.assert_array_equal(first["image"][:, 0, 0], [0, 0, 0, 0, 100, 200, 300])
    last = read_sample(_ArraySeries(hu, mask), "uid", 4, rows=(-2, 6), cols=(4, 12))
    np.testing.assert_array_equal(last["image"][:, 2, 0], [100, 200, 300, 400, 400, 400, 400])
    assert last["image"].shape == (7, 8, 8) and (last["image"][:, :2] == HU_MIN).all()
    assert (last["image"][:, :, 4:] == HU_MIN).all() and not last["mask"][:, :2].any()
    assert last["mask"][0, 4, 1] and last["mask"].sum() == 1 and first["image"].flags.writeable


def test_crop_stays_inside_the_window() -> None:
    rng = np.random.default_rng(0)
    starts = {crop_start(50, 128, rng) for _ in range(300)}
    assert min(starts) == 2 and max(starts) == 34  # window 2..98 around 50, crop 64
    assert {crop_start(3, 128, rng) for _ in range(50)} <= set(range(0, 33))  # window shifted to 0..96


def test_training_and_validation_sample_shapes(tiny_series: SegmentationSeries) -> None:
    dataset = SegmentationTrainDataset(tiny_series)
    sampler = SegmentationTrainSampler(len(tiny_series.nodules), 0.5, epoch_size=8, seed=3)
    samples = [dataset[item] for item in sampler]
    assert len(samples) == 8
    for sample in samples:
        assert sample["image"].shape == (7, 64, 64) and sample["image"].dtype == np.int16
        assert sample["mask"].shape == (1, 64, 64) and sample["mask"].dtype == bool
    nodule_items = [i for i, (item, _) in enumerate(sampler) if item >= 0]
    assert len(nodule_items) == 4 and all(samples[i]["mask"].any() for i in nodule_items)

    items = validation_slices(tiny_series, negative_fraction=0.1)
    positives = sum(tiny_series.positive_slices[uid].size for uid in tiny_series.series_uids)
    assert positives < len(items) < positives + sum(shape[0] for shape in tiny_series.shapes.values())
    val = SegmentationValDataset(tiny_series, items)
    sample = val[0]
    rows, cols = tiny_series.shapes[sample["series_uid"]][1:]
    assert sample["image"].shape == (7, rows, cols) and sample["mask"].shape == (1, rows, cols)


def test_train_sampler_is_seeded_and_sharded() -> None:
    def draws(seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[tuple[int, int]]:
        sampler = SegmentationTrainSampler(5, 0.3, epoch_size=20, seed=seed, rank=rank, world_size=world_size)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert draws(0, 1) == draws(0, 1) and draws(0, 1) != draws(0, 2) and draws(0, 1) != draws(1, 1)
    assert sum(item < 0 for item, _ in draws(0, 1)) == 6
    ranks = draws(0, 1, 0, 2) + draws(0, 1, 1, 2)
    assert sorted(ranks) == sorted(draws(0, 1))
    with pytest.raises(ValueError, match="no annotated nodules"):
        SegmentationTrainSampler(0, 0.3)


def test_candidate_crops_are_drawn_in_their_share_and_leave_other_draws_unchanged() -> None:
    plain = SegmentationTrainSampler(5, 0.3, epoch_size=20, seed=4)
    assert list(plain) == list(SegmentationTrainSampler(5, 0.3, epoch_size=20, seed=4, candidate_crop_fraction=0.0))
    mixed = list(SegmentationTrainSampler(5, 0.3, epoch_size=20, seed=4, candidate_crop_fraction=0.25))
    kinds = [item for item, _ in mixed]
    assert kinds.count(RANDOM_CROP) == 6 and kinds.count(CANDIDATE_CROP) == 5 and sum(k >= 0 for k in kinds) == 9
    only_negatives = SegmentationTrainSampler(0, 0.5, epoch_size=10, candidate_crop_fraction=0.5)
    assert sorted({item for item, _ in only_negatives}) == [CANDIDATE_CROP, RANDOM_CROP]
    with pytest.raises(ValueError, match="their sum"):
        SegmentationTrainSampler(5, 0.6, epoch_size=10, candidate_crop_fraction=0.5)


def test_candidate_crops_hold_the_candidate(tiny_dataset: Path, tiny_series: SegmentationSeries) -> None:
    cache = tiny_series.cache
    uid = tiny_series.series_uids[0]
    geometry = cache.geometry(uid)
    centre_irc = np.array(geometry.shape_irc) // 2
    centre_xyz = geometry.irc_to_xyz(centre_irc.reshape(1, 3)).reshape(3)
    outside_xyz = geometry.irc_to_xyz((np.array(geometry.shape_irc) + 50).reshape(1, 3)).reshape(3)
    table = pd.DataFrame({"series_uid": [uid, uid, "not-a-series"], "center_x": [centre_xyz[0], outside_xyz[0], 0.0],
                          "center_y": [centre_xyz[1], outside_xyz[1], 0.0],
                          "center_z": [centre_xyz[2], outside_xyz[2], 0.0]})
    annotations = read_annotations(tiny_dataset / ANNOTATIONS_FILE)
    series = SegmentationSeries(cache, tiny_series.series_uids, annotations, progress=False, negative_candidates=table)
    assert series.negatives == [(uid, tuple(int(v) for v in centre_irc))]
    dataset = SegmentationTrainDataset(series)
    hu = cache.volume(uid)
    for seed in range(5):
        sample = dataset[(CANDIDATE_CROP, seed)]
        assert sample["series_uid"] == uid and sample["slice_index"] == centre_irc[0]
        window = hu[centre_irc[0], centre_irc[1] - 16 : centre_irc[1] + 17, centre_irc[2] - 16 : centre_irc[2] + 17]
        found = [(r, c) for r in range(64 - 32) for c in range(64 - 32)
                 if np.array_equal(sample["image"][3, r : r + 33, c : c + 33], window)]
        assert found, "the candidate's neighbourhood is not inside its crop"


def test_same_shape_batches() -> None:
    shapes = [(8, 8)] * 3 + [(6, 6)] * 2
    batches = list(SameShapeBatchSampler(range(5), shapes, batch_size=2))
    assert batches == [[0, 1], [2], [3, 4]]


def test_dice_loss_hand_cases() -> None:
    label = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    label[:, 0, :2, :2] = True
    perfect = label.float()
    assert dice_loss(perfect, label).abs().max() < 1e-6
    # Half of the 4 positives found, nothing else: dice = (2*2 + 1) / (2 + 4 + 1).
    half = torch.zeros_like(perfect)
    half[:, 0, 0, :2] = 1
    assert dice_loss(half, label)[0].item() == pytest.approx(1 - 5 / 7)
    empty = torch.zeros(1, 1, 4, 4)
    assert dice_loss(empty, empty.bool()).item() == pytest.approx(0.0)
    assert segmentation_loss(perfect, label).abs().max() < 1e-6


def test_false_negative_weighting() -> None:
    label = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    label[0, 0, :2, :2] = True
    missing = label.float()
    missing[0, 0, 0, 0] = 0  # one false negative
    extra = label.float()
    extra[0, 0, 3, 3] = 1  # one false positive
    plain_missing, plain_extra = dice_loss(missing, label).item(), dice_loss(extra, label).item()
    weighted_missing = segmentation_loss(missing, label, fn_weight=8).item()
    weighted_extra = segmentation_loss(extra, label, fn_weight=8).item()
    assert weighted_missing > plain_missing and weighted_extra == pytest.approx(plain_extra)
    assert weighted_missing > weighted_extra
    assert segmentation_loss(missing, label, fn_weight=0).item() == pytest.approx(plain_missing)


def test_overlay_colours() -> None:
    ct = np.full((2, 2), HU_MIN, dtype=np.float32)
    label = np.array([[1, 1], [0, 0]], dtype=bool)
    prediction = np.array([[1, 0], [1, 0]], dtype=bool)
    image = overlay_image(ct, label, prediction)
    assert image.shape == (2, 2, 3) and image.dtype == np.float32
    np.testing.assert_allclose(image[0, 0], 0.5 * np.array(OVERLAY_COLORS["tp"]))
    np.testing.assert_allclose(image[0, 1], 0.5 * np.array(OVERLAY_COLORS["fn"]))
    np.testing.assert_allclose(image[1, 0], 0.5 * np.array(OVERLAY_COLORS["fp"]))
    np.testing.assert_allclose(image[1, 1], 0.0)


def test_training_end_to_end(tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from p2ch_luna.models.catalog import find_latest_checkpoint
    from p2ch_luna.models.checkpoint import load_checkpoint
    from p2ch_luna.models.unet import UNetWrapper
    from p2ch_luna.training import cli as training

    code = training.main([
        "segmentation", "--data-root", str(tiny_dataset), "--cache-dir", str(tmp_path / "cache"),
        "--models-dir", str(tmp_path / "models"), "--runs-dir", str(tmp_path / "runs"),
        "--epochs", "1", "--epoch-size", "8", "--batch-size", "4", "--ratio", "0", "--val-stride", "3",
        "--augmented", "--val-negative-fraction", "0.05", "--tb-images", "2", "--comment", "seg-test",
        "--candidate-crop-fraction", "0.25",
    ])
    assert code == 0
    negatives = re.search(r"(\d+) negative candidates", capsys.readouterr().err)
    assert negatives and int(negatives.group(1)) > 0
    best = find_latest_checkpoint(tmp_path / "models", "segmentation")
    assert best is not None
    loaded = load_checkpoint(best, expected_task="segmentation")
    assert isinstance(loaded.model, UNetWrapper) and "recall" in loaded.metrics
    with torch.no_grad():
        assert loaded.model(torch.zeros(1, 7, 20, 24)).shape == (1, 1, 20, 24)

    val_runs = sorted((tmp_path / "runs").rglob("*-val-segmentation-seg-test"))
    assert val_runs
    accumulator = event_accumulator.EventAccumulator(str(val_runs[0]), size_guidance={"images": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    assert len(tags["images"]) == 2
    assert "loss/all" in tags["scalars"]


def test_bad_segmentation_option_is_a_usage_error(tmp_path: Path) -> None:
    from p2ch_luna.training import cli as training

    code = training.main(["segmentation", "--data-root", str(tmp_path), "--ratio", "0",
                          "--random-crop-fraction", "1.5"])
    assert code == 2
    assert training.main(["segmentation", "--data-root", str(tmp_path), "--ratio", "0",
                          "--random-crop-fraction", "0.5", "--candidate-crop-fraction", "0.5"]) == 2


def test_batched_crops_are_the_single_crops(tiny_series: SegmentationSeries) -> None:
    """The batched fetch (and so the batch ring's) writes each draw's crop and mask as __getitem__ reads it,
    crops over the CT's border included; the window's mask bits are unpacked at odd column offsets."""
    dataset = SegmentationTrainDataset(tiny_series)
    draws = SegmentationTrainSampler(len(tiny_series.nodules), 0.5, epoch_size=24, seed=7)
    items = list(draws)
    batch = dataset.__getitems__(items)
    assert batch["image"].dtype == torch.int16 and batch["mask"].dtype == torch.bool
    assert batch["image"].shape == (24, 7, 64, 64) and batch["mask"].shape == (24, 1, 64, 64)
    for position, item in enumerate(items):
        sample = dataset[item]
        assert np.array_equal(batch["image"][position].numpy(), sample["image"])
        assert np.array_equal(batch["mask"][position].numpy(), sample["mask"])
        assert batch["series_uid"][position] == sample["series_uid"]
        assert batch["slice_index"][position] == sample["slice_index"]
    assert batch["mask"].any()
    uid, (index, _, _) = tiny_series.nodules[0]
    full = tiny_series.mask_slice(uid, index)
    for rows, cols in [(slice(0, full.shape[0]), slice(0, full.shape[1])), (slice(3, 40), slice(5, 61)),
                       (slice(10, 11), slice(13, 14))]:
        assert np.array_equal(tiny_series.mask_window(uid, index, rows, cols), full[rows, cols])


def test_batch_ring_trains_the_segmenter_to_the_same_weights(tiny_dataset: Path, tmp_path: Path) -> None:
    from p2ch_luna.models.catalog import find_latest_checkpoint
    from p2ch_luna.models.checkpoint import load_checkpoint
    from p2ch_luna.training import cli as training

    def run(out: Path, *extra: str) -> Any:
        assert training.main([
            "segmentation", "--data-root", str(tiny_dataset), "--cache-dir", str(tmp_path / "cache"),
            "--models-dir", str(out), "--runs-dir", str(out / "runs"), "--device", "cpu", "--epochs", "2",
            "--epoch-size", "8", "--batch-size", "4", "--val-stride", "3", "--val-size", "4", "--augmented",
            "--num-workers", "1", "--log-level", "WARNING", *extra]) == 0
        return load_checkpoint(find_latest_checkpoint(out, "segmentation"), expected_task="segmentation")

    plain, ring = run(tmp_path / "plain"), run(tmp_path / "ring", "--batch-ring")
    assert ring.config["batch_ring"] is True and ring.samples_seen == plain.samples_seen == 16
    for name, value in plain.model.state_dict().items():
        assert torch.equal(value, ring.model.state_dict()[name]), name
