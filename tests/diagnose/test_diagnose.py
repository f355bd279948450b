"""Diagnosis: pipeline steps, scoring against truth, outputs, bad inputs, end-to-end runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from p2ch_luna import RESEARCH_NOTICE, distributed
from p2ch_luna.data.luna import split_by_series
from p2ch_luna.diagnose import classify, grouping, heap, inference, model_set, pipeline, segment
from p2ch_luna.diagnose import cli as diagnose_cli
from p2ch_luna.diagnose.lungs import Lungs, find_lungs
from p2ch_luna.diagnose.report import FINDINGS_FILE, NODULES_FILE, REPORT_FILE, format_truth, score
from p2ch_luna.errors import DataError
from p2ch_luna.evaluation.truth import read_truth
from p2ch_luna.geometry import Geometry
from p2ch_luna.io.ct import HU_MAX, Ct, extract_chunk, list_series_on_disk, load_ct
from p2ch_luna.models import build_model
from p2ch_luna.models.checkpoint import BOOK_SEGMENTATION_KWARGS, LoadedCheckpoint
from p2ch_luna.synth import implant

BOOK_SEGMENTATION = "seg_2020-01-26_19.45.12_w4d3c1-bal_1_nodupe-label_pos-d1_fn8-adam.best.state"
BOOK_CLASSIFIER = "cls_2020-02-06_14.16.55_final-nodule-nonnodule.best.state"


def _ct(hu: np.ndarray, spacing_xyz=(1.0, 1.0, 1.0), uid: str = "series") -> Ct:
    geometry = Geometry(np.zeros(3), np.asarray(spacing_xyz, float), np.eye(3), hu.shape)
    return Ct(hu=hu.astype(np.int16), geometry=geometry, series_uid=uid)


class CentreSliceLogits(torch.nn.Module):
    """A stand-in U-Net: the logit of each pixel is the HU of the centre input slice."""

    in_channels = 7
    context = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.context : self.context + 1]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_segment_ct_crops_and_gathers_context_exactly(batch_size: int) -> None:
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1000, size=(12, 40, 50)).astype(np.int16)
    region = np.zeros(hu.shape, dtype=bool)
    region[2:9, 5:20, 10:30] = True
    mask = segment.segment_ct(hu, region, CentreSliceLogits(), 0.5, batch_size, torch.device("cpu"))
    pad = segment.SEGMENTATION_PAD
    expected = np.zeros(hu.shape, dtype=bool)
    expected[2:9, max(5 - pad, 0) : 20 + pad, max(10 - pad, 0) : 30 + pad] = hu[2:9, :36, :46] > 0
    assert np.array_equal(mask, expected)


class AtHuMax(torch.nn.Module):
    """A stand-in U-Net: positive logits where the centre input slice is exactly ``HU_MAX``."""

    in_channels = 7
    context = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x[:, self.context : self.context + 1]
        return 0.25 - (centre - HU_MAX) ** 2


def test_segment_ct_clips_a_read_only_ct_and_hands_back_the_heap_each_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The slices are clipped to [HU_MIN, HU_MAX] a batch at a time, with no copy of the whole CT, which stays
    unwritten; on the CPU a heap trimmer steps after each batch."""
    steps = []

    class CountedTrimmer(heap.HeapTrimmer):
        def step(self) -> bool:
            steps.append(self.slack)
            return super().step()

    monkeypatch.setattr(segment, "HeapTrimmer", CountedTrimmer)
    rng = np.random.default_rng(1)
    hu = rng.integers(-3024, 3000, size=(12, 40, 50)).astype(np.int16)
    hu.setflags(write=False)
    original = hu.copy()
    region = np.zeros(hu.shape, dtype=bool)
    region[2:9, 5:20, 10:30] = True
    mask = segment.segment_ct(hu, region, AtHuMax(), 0.5, 3, torch.device("cpu"))
    pad = segment.SEGMENTATION_PAD
    expected = np.zeros(hu.shape, dtype=bool)
    expected[2:9, : 20 + pad, : 30 + pad] = hu[2:9, :36, :46] >= HU_MAX
    assert np.array_equal(mask, expected)
    assert np.array_equal(hu, original)
    assert steps == [segment.SEGMENTATION_HEAP_SLACK] * 3  # 7 slices in batches of 3


def test_segment_ct_crops_give_the_full_slice_masks_of_a_book_unet() -> None:
    """The U-Net pools twice: cut at an offset that is not a multiple of 4, a crop sees other pooling cells than
    the book's full 512 x 512 slices and another mask (16% of the book model's mask on the real CT). Crops on
    the pooling grid give the full slices' mask but for the zero padding at their edges."""
    torch.manual_seed(5)
    model = build_model("unet", **BOOK_SEGMENTATION_KWARGS).eval()
    assert model.pooling_grid == 4
    rng = np.random.default_rng(5)
    hu = ndimage.gaussian_filter(rng.normal(-500, 900, size=(10, 128, 128)), (0, 3, 3)).astype(np.int16)
    region = np.zeros(hu.shape, dtype=bool)
    region[2:8, 37:91, 41:99] = True  # crops from rows 21 and columns 25: off the grid
    whole_slices = np.zeros(hu.shape, dtype=bool)
    whole_slices[2:8] = True
    context = np.clip(np.arange(2, 8)[:, None] + np.arange(-3, 4)[None, :], 0, 9)
    stacks = torch.from_numpy(np.clip(hu, -1000, 1000).astype(np.float32)[context])
    with torch.no_grad():  # centre the untrained logits on the region, so half of it is segmented
        model.unet.last.bias -= float(model(stacks)[:, 0, 37:91, 41:99].median())
    cpu = torch.device("cpu")
    full = segment.segment_ct(hu, whole_slices, model, 0.5, 4, cpu)[region]
    cropped = segment.segment_ct(hu, region, model, 0.5, 4, cpu)[region]
    assert 0.3 < full.mean() < 0.7
    assert np.mean(cropped != full) < 0.005  # off the grid: 64%


class RecordedBar:
    """Stands in for tqdm in ``diagnose``: records each bar's settings and updates."""

    bars: list[RecordedBar] = []

    def __init__(self, total: int, desc: str, disable: bool | None, **_: object) -> None:
        self.total, self.description, self.disable, self.done = total, desc, disable, 0
        RecordedBar.bars.append(self)

    def update(self, count: int) -> None:
        self.done += count

    def __enter__(self) -> RecordedBar:
        return self

    def __exit__(self, *_: object) -> None:
        pass


@pytest.mark.parametrize("progress", [True, False])
def test_model_stages_count_their_work_in_progress_bars(monkeypatch: pytest.MonkeyPatch, progress: bool) -> None:
    monkeypatch.setattr(inference, "tqdm", RecordedBar)
    monkeypatch.setattr(RecordedBar, "bars", [])
    hu = np.random.default_rng(1).integers(-1000, 1000, size=(12, 40, 50)).astype(np.int16)
    region = np.zeros(hu.shape, dtype=bool)
    region[2:9, 5:20, 10:30] = True
    segment.segment_ct(hu, region, CentreSliceLogits(), 0.5, 3, torch.device("cpu"), progress=progress)
    model = build_model("luna", input_shape=(16, 16, 16)).eval()
    centers = np.array([[5, 10, 20], [6, 12, 25], [4, 15, 15], [7, 18, 28], [3, 9, 12]])
    classify.classify_chunks(hu, centers, model, 2, torch.device("cpu"), flips=True, progress=progress,
                             description="nodule classification")
    segmentation, classification = RecordedBar.bars
    assert (segmentation.description, segmentation.total, segmentation.done) == ("segmentation", 7, 7)
    assert (classification.description, classification.total, classification.done) == ("nodule classification", 5, 5)
    # Shown only when asked, and then only on a terminal (tqdm's disable=None).
    assert segmentation.disable is classification.disable is (None if progress else True)


def test_component_grouping_centres_sizes_and_lung_restriction() -> None:
    hu = np.full((20, 30, 30), -800, dtype=np.int16)
    nodule_mask = np.zeros(hu.shape, dtype=bool)
    nodule_mask[4:9, 4:9, 4:9] = True  # 125 voxels, inside the region
    nodule_mask[12:17, 20:25, 20:25] = True  # outside the region
    hu[nodule_mask] = 50
    region = np.zeros(hu.shape, dtype=bool)
    region[:, :15, :15] = True
    ct = _ct(hu, spacing_xyz=(0.5, 0.5, 2.0))
    candidates = grouping.group_candidates(hu, nodule_mask, region, ct, erosion_iterations=1, grouping="components")
    assert len(candidates) == 1
    row = candidates.iloc[0]
    assert (row["index"], row["row"], row["col"]) == pytest.approx((6.0, 6.0, 6.0))
    assert (row["center_x"], row["center_y"], row["center_z"]) == pytest.approx((3.0, 3.0, 12.0))
    assert row["voxel_count"] == 125
    assert row["diameter_mm"] == pytest.approx((6 * 125 * 0.5 * 0.5 * 2.0 / np.pi) ** (1 / 3))


def _ball(shape: tuple[int, int, int], center: tuple[float, float, float], radius: float) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float64)
    return sum((grid[axis] - center[axis]) ** 2 for axis in range(3)) <= radius**2


def test_peak_grouping_centres_a_nodule_that_touches_a_vessel() -> None:
    """One connected blob (a ball on a tube): components centre off the ball, peaks centre on it."""
    shape = (40, 40, 60)
    hu = np.full(shape, -850, dtype=np.int16)
    ball = _ball(shape, (20, 20, 15), 5.0)
    grid = np.indices(shape)
    tube = ((grid[0] - 20) ** 2 + (grid[1] - 20) ** 2 <= 2.5**2) & (grid[2] >= 15)
    hu[ball | tube] = 40
    flooded = ball | tube | _ball(shape, (20, 20, 15), 7.0)  # an over-segmenting model
    region = np.ones(shape, dtype=bool)
    ct = _ct(hu)
    peaks = grouping.group_candidates(hu, flooded, region, ct, erosion_iterations=1, grouping="peaks")
    strongest = peaks.sort_values("diameter_mm", ascending=False).iloc[0]
    assert (strongest["index"], strongest["row"], strongest["col"]) == pytest.approx((20, 20, 15), abs=0.6)
    assert strongest["diameter_mm"] == pytest.approx(2 * 5.0, abs=1.5)
    assert (peaks["diameter_mm"] < 2 * grouping.MIN_PEAK_RADIUS_MM).sum() == 0
    components = grouping.group_candidates(hu, flooded, region, ct, erosion_iterations=1, grouping="components")
    assert len(components) == 1 and abs(components.iloc[0]["col"] - 15) > 3


def test_edge_shifts_move_large_candidates_near_the_edge_towards_it() -> None:
    region = np.zeros((20, 60, 60), dtype=bool)
    region[:, :, :40] = True  # the lung; from column 40 on, the wall
    centers = np.array([[10.0, 30.0, 32.0], [10.0, 30.0, 10.0], [10.0, 30.0, 36.0]])
    diameters = np.array([20.0, 20.0, 8.0])  # at the edge; far from it (30 mm > 10 + 3); too small
    shifted, source = grouping.edge_shifts(centers, diameters, region, (2.0, 1.0, 1.0))
    # 8 mm from the edge: moved 5 mm (0.5 of the radius) to column 37; 10 mm would leave the lung
    assert shifted.tolist() == [[10.0, 30.0, 37.0]] and source.tolist() == [0]
    shifted, _ = grouping.edge_shifts(centers[:1] - (0, 0, 4), diameters[:1], region, (2.0, 1.0, 1.0))
    assert shifted.tolist() == [[10.0, 30.0, 33.0], [10.0, 30.0, 38.0]]  # 12 mm from the edge: both inside


def test_peak_grouping_reaches_the_centre_of_a_juxtapleural_nodule(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 24 mm nodule centred 4 mm inside the lung's edge: the lung mask and the segmentation hold only its
    inner part, whose depth peak lies 4 mm towards the lung; an edge shift puts a candidate on its centre."""
    shape = (40, 60, 70)
    hu = np.full(shape, -850, dtype=np.int16)
    hu[:, :, 40:] = 40  # chest wall
    nodule = _ball(shape, (20, 30, 36), 12.0)
    hu[nodule] = 40
    region = np.zeros(shape, dtype=bool)
    region[:, :, :40] = True
    ct = _ct(hu)

    def distance_to_centre() -> float:
        peaks = grouping.group_candidates(hu, nodule, region, ct, erosion_iterations=1, grouping="peaks")
        return float(np.min(np.linalg.norm(peaks[["index", "row", "col"]].to_numpy() - (20, 30, 36), axis=1)))

    assert distance_to_centre() <= 1.0
    monkeypatch.setattr(grouping, "EDGE_SHIFTS", ())
    assert distance_to_centre() >= 3.5


def test_peak_grouping_centres_faint_ground_glass_and_ignores_segmented_parenchyma() -> None:
    """A -620 HU nodule in noise has half its voxels below DENSE_HU: its blob is taken at FAINT_HU."""
    shape = (40, 60, 90)
    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, 60.0, shape)
    hu = np.full(shape, -850.0) + noise
    ggo = _ball(shape, (20, 30, 20), 6.0)
    solid = _ball(shape, (20, 30, 70), 4.0)
    hu[ggo] = -620 + noise[ggo]
    hu[solid] = 40 + noise[solid]
    hu = np.rint(hu).astype(np.int16)
    air = _ball(shape, (20, 30, 45), 6.0)  # parenchyma an over-segmenting model marks: not faint
    mask = _ball(shape, (20, 30, 20), 6.5) | _ball(shape, (20, 30, 70), 4.5) | air
    assert np.mean(hu[ggo] >= grouping.DENSE_HU) < 0.5
    blobs = grouping.blob_tissue(hu, mask, (1.0, 1.0, 1.0))
    assert blobs[ggo].mean() > 0.95 and blobs[air].mean() < 0.05
    faint = _ball(shape, (20, 30, 20), 6.5)  # smoothed in its own box: as if over the whole CT
    smoothed = ndimage.gaussian_filter(hu.astype(np.float32), grouping.FAINT_SMOOTHING_MM, mode="nearest")
    assert np.array_equal(blobs[faint], (hu[faint] >= grouping.DENSE_HU) | (smoothed[faint] >= grouping.FAINT_HU))
    assert np.array_equal(blobs[:, :, 55:], mask[:, :, 55:] & (hu[:, :, 55:] >= grouping.DENSE_HU))  # solid as before
    peaks = grouping.group_candidates(hu, mask, np.ones(shape, dtype=bool), _ct(hu), 1, "peaks")
    ggo_peak = peaks.iloc[(peaks["col"] - 20).abs().argmin()]
    assert (ggo_peak["index"], ggo_peak["row"], ggo_peak["col"]) == pytest.approx((20, 30, 20), abs=1.0)
    assert ggo_peak["diameter_mm"] > 6.0  # one blob, not specks
    assert not ((peaks["col"] > 38) & (peaks["col"] < 52)).any()  # nothing in the segmented parenchyma


def test_keep_strongest_drops_candidates_inside_a_more_probable_one() -> None:
    candidates = pd.DataFrame({
        "center_x": [0.0, 2.0, 20.0, 6.0], "center_y": 0.0, "center_z": 0.0,
        "diameter_mm": [10.0, 3.0, 3.0, 3.0], "nodule_probability": [0.9, 0.8, 0.7, 0.6],
    })
    assert grouping.keep_strongest(candidates).tolist() == [True, False, True, True]


def test_group_candidates_empty_mask() -> None:
    hu = np.zeros((5, 8, 8), dtype=np.int16)
    empty = np.zeros(hu.shape, dtype=bool)
    for method in grouping.GROUPINGS:
        candidates = grouping.group_candidates(hu, empty, ~empty, _ct(hu), 1, method)
        assert list(candidates.columns) == grouping.CANDIDATE_COLUMNS and candidates.empty


def test_shard_and_merge_restore_the_requested_order() -> None:
    uids = [f"uid{i}" for i in range(7)]
    shards = [distributed.shard(uids, rank, 3) for rank in range(3)]
    assert sorted(sum(shards, [])) == sorted(uids)
    assert shards[1] == ["uid1", "uid4"]
    results = [[_diagnosis(uid) for uid in part] for part in shards]
    merged = distributed.merge_shards(results, uids, key=lambda result: result.series_uid)
    assert [d.series_uid for d in merged] == uids
    info = distributed.DistributedInfo()
    assert distributed.gather_to_main("x", info) == ["x"]


def _diagnosis(uid: str, candidates: pd.DataFrame | None = None) -> pipeline.SeriesDiagnosis:
    return pipeline.SeriesDiagnosis(
        series_uid=uid, source="", shape_irc=(1, 1, 1), spacing_irc=(1.0, 1.0, 1.0), lung_volume_ml=0.0,
        candidates=grouping._empty_candidates() if candidates is None else candidates, timings={"total_s": 0.0},
    )


def _detections_from_truth(truth: pd.DataFrame, uid: str) -> pd.DataFrame:
    """One detection on each nodule (malignancy from the truth), one false positive, one filtered out."""
    nodules = truth[truth["series_uid"] == uid]
    malignant = nodules["is_malignant"].fillna(False).to_numpy(bool)
    far = nodules[["center_x", "center_y", "center_z"]].to_numpy().max(axis=0, initial=0.0) + 200.0
    rows = {
        "center_x": [*nodules["center_x"], far[0], far[0] + 50],
        "center_y": [*nodules["center_y"], far[1], far[1]],
        "center_z": [*nodules["center_z"], far[2], far[2]],
        "nodule_probability": [0.9] * len(nodules) + [0.8, 0.2],
        "malignancy_probability": [*np.where(malignant, 0.95, 0.05), 0.1, np.nan],
    }
    frame = pd.DataFrame(rows).assign(series_uid=uid, index=0.0, row=0.0, col=0.0, voxel_count=1, diameter_mm=5.0)
    return frame[grouping.CANDIDATE_COLUMNS]


def test_scoring_synthetic_truth_fills_the_confusion_table(tiny_dataset: Path) -> None:
    truth = read_truth(tiny_dataset)
    uids = sorted(p.stem for p in tiny_dataset.glob("subset*/*.mhd"))
    results = [_diagnosis(uid, _detections_from_truth(truth.nodules, uid)) for uid in uids]
    config = pipeline.DiagnoseConfig()
    scores = score(results, truth, uids, config)
    nodules = truth.nodules[truth.nodules["series_uid"].isin(uids)]
    n_malignant = int(nodules["is_malignant"].fillna(False).sum())
    n_benign = len(nodules) - n_malignant
    expected = np.array([[0, len(uids), len(uids), 0], [0, 0, n_benign, 0], [0, 0, 0, n_malignant]])
    assert np.array_equal(scores.total, expected)
    assert len(nodules) > 0
    assert scores.froc is not None and scores.froc.cpm == pytest.approx(1.0)
    # Each nodule is its series' finding in the order of the annotations, found at its centre before the FP.
    matched = scores.nodules
    assert matched[["series_uid", "center_x", "diameter_mm"]].equals(
        nodules[["series_uid", "center_x", "diameter_mm"]].reset_index(drop=True))
    assert matched["is_detected"].all() and (matched["distance_mm"] == 0).all()
    assert matched["finding"].tolist() == matched.groupby("series_uid", sort=False).cumcount().add(1).tolist()
    assert (matched["nodule_probability"] == 0.9).all() and (matched["false_positives_above"] == 0).all()
    assert "finding #1, nodule 0.900, 0.0 mm from its centre, 0 false positives above it" in format_truth(
        matched.iloc[0])
    # Dropping the detections of one series turns its nodules into complete misses.
    first = next(uid for uid in uids if truth.has_series(uid))
    results[uids.index(first)] = _diagnosis(first)
    missed = len(nodules[nodules["series_uid"] == first])
    rescored = score(results, truth, uids, config)
    assert rescored.total[1:, 0].sum() == missed
    lost = rescored.nodules_of(first)
    assert len(lost) == missed and not lost["is_detected"].any() and (lost["finding"] == 0).all()
    assert (lost["false_positives_above"] == -1).all() and lost["nodule_probability"].isna().all()
    assert format_truth(lost.iloc[0]).endswith(f"missed (no candidate within {lost['diameter_mm'].iloc[0] / 2:.1f} mm)")


def test_truth_takes_annotations_excluded_from_the_data_root_unless_given(tmp_path: Path) -> None:
    header = "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
    (tmp_path / "annotations.csv").write_text(header + "1.2.3,0,0,0,6\n")
    assert read_truth(tmp_path).excluded is None
    (tmp_path / "annotations_excluded.csv").write_text(header + "1.2.3,10,0,0,-1\n1.2.3,20,0,0,-1\n")
    assert len(read_truth(tmp_path).excluded) == 2
    given = tmp_path / "other.csv"
    given.write_text(header + "1.2.3,30,0,0,-1\n")
    assert read_truth(tmp_path, given).excluded["coordX"].tolist() == [30.0]
    (tmp_path / "annotations_excluded.csv").write_text("seriesuid,x\n")
    with pytest.raises(DataError, match="annotations_excluded.csv"):
        read_truth(tmp_path)


@pytest.mark.slow
def test_validation_run_on_synthetic_data_completes(tiny_dataset: Path, untrained_models: Path,
                                                    tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code = diagnose_cli.main(["--validation", "--data-root", str(tiny_dataset), "--models-dir", str(untrained_models),
                          "--output", str(out), "--save-mask", "--segmentation-threshold", "0.9", "--amp",
                              "--nodule-threshold", "0.2", "--min-diameter-mm", "0"])  # untrained: specks
    assert code == 0
    printed = capsys.readouterr().out
    validation = split_by_series(p.stem for p in tiny_dataset.glob("subset*/*.mhd"))[1]
    assert f"Summary: {len(validation)} CT(s)" in printed and "Confusion table" in printed
    assert printed.rstrip().endswith(RESEARCH_NOTICE)
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["notice"] == RESEARCH_NOTICE
    assert [s["series_uid"] for s in report["series"]] == validation
    assert report["models"]["malignancy"]["task"] == "malignancy"
    assert report["config"]["amp"] is True  # --amp is honoured on the CPU (bfloat16)
    assert np.asarray(report["confusion_table"]).shape == (3, 4)
    findings = pd.read_csv(out / FINDINGS_FILE)
    assert list(findings.columns) == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    assert len(findings) == sum(len(s["candidates"]) for s in report["series"])
    threshold = report["config"]["nodule_threshold"]
    above = [(s["series_uid"], c) for s in report["series"] for c in s["candidates"]
             if c["nodule_probability"] >= threshold]
    nodules = pd.read_csv(out / NODULES_FILE)
    assert 0 < len(nodules) == len(above) and (nodules["nodule_probability"] >= threshold).all()
    assert list(nodules["seriesuid"]) == [uid for uid, _ in above]
    assert FINDINGS_FILE in report["files"] and NODULES_FILE in report["files"]
    masks = sorted(out.glob("*_mask.nii.gz"))
    assert len(masks) == len(validation) and not list(out.glob("*.mhd"))
    assert not list(tmp_path.glob(".out.*"))  # the staging folder is gone
    annotations = pd.read_csv(tiny_dataset / "annotations.csv")
    annotated = annotations[annotations["seriesuid"].isin(validation)]
    assert sum(len(s["nodules"] or []) for s in report["series"]) == len(annotated)
    assert printed.count("  truth ") == len(annotated)


@pytest.mark.slow
def test_book_models_find_the_nodules_implanted_in_a_real_ct(cptac_dir: Path, book_checkpoints_dir: Path,
                                                             tmp_path: Path) -> None:
    """The book's trained models, through our whole pipeline, on real anatomy with a known answer.

    A preprocessing fault (HU scale or clipping, the wrong slice context, a chunk cut off centre) makes the
    book's classifier miss isolated solid spheres or rank vessels above them. A lung mask that cuts off
    the pleura loses the juxtapleural nodule. Without the faint pass the ground glass is found off centre.
    """
    data = tmp_path / "implanted"
    assert implant.main([str(cptac_dir), str(data), "--diameters", "6", "10", "16", "12", "8",
                         "--placement", "isolated", "isolated", "isolated", "pleural", "isolated",
                         "--hu", "40", "40", "40", "40", "-620"]) == 0
    (uid,) = list_series_on_disk(data)
    out = tmp_path / "out"
    assert diagnose_cli.main([
        "--data-root", str(data), "--cache-dir", str(tmp_path / "cache"), "--series-uid", uid, "--output", str(out),
        "--segmentation-path", str(book_checkpoints_dir / BOOK_SEGMENTATION),
        "--classification-path", str(book_checkpoints_dir / BOOK_CLASSIFIER),
    ]) == 0
    report = json.loads((out / REPORT_FILE).read_text())
    nodules = pd.DataFrame(report["series"][0]["nodules"])
    implanted = pd.read_csv(data / "annotations.csv")
    np.testing.assert_allclose(nodules[["center_x", "center_y", "center_z", "diameter_mm"]],
                               implanted[["coordX", "coordY", "coordZ", "diameter_mm"]])
    isolated, pleural, ground_glass = nodules.iloc[:3], nodules.iloc[3], nodules.iloc[4]
    # Isolated: the first three findings, at the nodules' centres, before any false positive, with their size.
    assert sorted(isolated["finding"]) == [1, 2, 3]
    assert (isolated["distance_mm"] < isolated["diameter_mm"] / 4).all()
    assert (isolated["nodule_probability"] > 0.9).all() and (isolated["false_positives_above"] == 0).all()
    candidates = pd.DataFrame(report["series"][0]["candidates"])
    sizes = candidates.iloc[isolated["finding"] - 1]["diameter_mm"].to_numpy()
    np.testing.assert_allclose(sizes, isolated["diameter_mm"], rtol=0.2)
    # Pleural: half of it lies in the chest wall; the part in the lung is found, within its radius.
    assert pleural["is_detected"] and pleural["finding"] > 0
    # Ground glass at -620 HU: half its voxels lie below DENSE_HU; the faint pass finds it at its centre.
    assert ground_glass["is_detected"] and ground_glass["distance_mm"] < ground_glass["diameter_mm"] / 4
    # Every finding lies in the lungs of the real CT.
    ct = load_ct(next(iter(list_series_on_disk(data).values())))
    lungs = find_lungs(ct.hu, tuple(ct.geometry.spacing_irc))
    irc = ct.geometry.xyz_to_irc(candidates[["center_x", "center_y", "center_z"]].to_numpy())
    assert lungs.mask[tuple(irc.T)].all()


def _book_or_untrained(untrained_models: Path, task: str) -> str:
    return str(next(untrained_models.glob(f"{task}_*.best.state")))


@pytest.mark.reliability
@pytest.mark.parametrize("make_args, code, message", [
    (lambda d, m, t: ["--series-uid", "1.2.3.unknown", "--data-root", str(d)], 1, "1.2.3.unknown"),
    (lambda d, m, t: ["--ct", str(t)], 1, "holds no DICOM series"),
    (lambda d, m, t: ["--validation", "--ct", str(t), "--data-root", str(d)], 2, "exactly one"),
    (lambda d, m, t: ["--validation", "--include-train", "--series-uid", "x", "--data-root", str(d)], 2,
     "does not go with --series-uid"),
    (lambda d, m, t: ["--validation", "--series-uid", "1.2.3.unknown", "--data-root", str(d)], 1, "1.2.3.unknown"),
    (lambda d, m, t: ["--data-root", str(d)], 2, "exactly one"),
    (lambda d, m, t: ["--validation", "--data-root", str(d), "--classification-path",
                      _book_or_untrained(m, "segmentation")], 1, "expected nodule"),
    (lambda d, m, t: ["--validation", "--data-root", str(d), "--segmentation-path", str(d / "annotations.csv")],
     1, "annotations.csv"),
    (lambda d, m, t: ["--validation", "--data-root", str(d), "--models-dir", str(t)], 1,
     "no segmentation checkpoint"),
])
def test_bad_inputs_fail_cleanly_and_write_nothing(tiny_dataset: Path, untrained_models: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture, make_args, code: int,
                                                   message: str) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / REPORT_FILE).write_text("previous")
    args = make_args(tiny_dataset, untrained_models, empty)
    if "--models-dir" not in args:
        args += ["--models-dir", str(untrained_models)]
    assert diagnose_cli.main([*args, "--output", str(out)]) == code
    error = capsys.readouterr().err.strip().splitlines()
    assert message in error[-1] and "Traceback" not in "\n".join(error)
    assert (out / REPORT_FILE).read_text() == "previous"
    assert sorted(p.name for p in out.iterdir()) == [REPORT_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]


class LeftHeavyLogits(torch.nn.Module):
    """A stand-in classifier whose nodule logit is the mean HU of the chunk's left half (not flip-invariant)."""

    input_shape = (4, 6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = x[..., : x.shape[-1] // 2].mean(dim=(1, 2, 3, 4)) / 100.0
        return torch.stack([torch.zeros_like(left), left], dim=1)


def test_classify_chunks_with_flips_averages_the_mirror_images() -> None:
    rng = np.random.default_rng(1)
    hu = rng.integers(-300, 300, size=(10, 12, 12)).astype(np.int16)
    centers = np.array([[5, 6, 6], [4, 5, 7]])
    model = LeftHeavyLogits()
    plain = classify.classify_chunks(hu, centers, model, 8, torch.device("cpu"))
    averaged = classify.classify_chunks(hu, centers, model, 8, torch.device("cpu"), flips=True)
    expected = []
    for center in centers:
        chunk = torch.from_numpy(extract_chunk(hu, center, model.input_shape)).float()[None, None]
        views = [chunk, chunk.flip(3), chunk.flip(4), chunk.flip((3, 4))]
        expected.append(np.mean([torch.softmax(model(v), dim=1)[0, 1].item() for v in views]))
    assert averaged == pytest.approx(expected, abs=1e-6)
    assert not np.allclose(plain, averaged)


class SteepLeftHeavyLogits(LeftHeavyLogits):
    """:class:`LeftHeavyLogits` twenty times as sure: logits of a few units on random HU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 20.0 * super().forward(x)


def _logit(probability: np.ndarray) -> np.ndarray:
    return np.log(probability) - np.log1p(-probability)


def test_classify_chunks_at_temperature_two_gives_less_extreme_probabilities() -> None:
    rng = np.random.default_rng(2)
    hu = rng.integers(-300, 300, size=(10, 12, 12)).astype(np.int16)
    centers = rng.integers([3, 3, 3], [7, 9, 9], size=(6, 3))
    model, cpu = SteepLeftHeavyLogits(), torch.device("cpu")
    plain = classify.classify_chunks(hu, centers, model, 4, cpu)
    assert np.abs(_logit(plain)).min() > 0.1  # no probability of 0.5, which a temperature leaves as it is
    softened = classify.classify_chunks(hu, centers, model, 4, cpu, temperature=2.0)
    np.testing.assert_allclose(_logit(softened), _logit(plain) / 2.0, rtol=1e-4)
    assert np.all(np.abs(softened - 0.5) < np.abs(plain - 0.5))
    with_flips = classify.classify_chunks(hu, centers, model, 4, cpu, flips=True)
    softened_with_flips = classify.classify_chunks(hu, centers, model, 4, cpu, flips=True, temperature=2.0)
    assert np.all(np.abs(softened_with_flips - 0.5) < np.abs(with_flips - 0.5))
    shifted = classify.classify_chunks(hu, centers, model, 4, cpu, temperature=2.0, bias=-3.0)
    np.testing.assert_allclose(_logit(shifted), _logit(plain) / 2.0 - 3.0, rtol=1e-4, atol=1e-5)


def test_diagnosis_divides_each_classifiers_logits_by_its_checkpoints_temperature() -> None:
    shape = (24, 40, 40)
    rng = np.random.default_rng(5)
    hu = rng.integers(-900, -700, size=shape).astype(np.int16)
    for center in [(12, 12, 12), (12, 28, 27), (8, 26, 10)]:
        hu[_ball(shape, center, 4.0)] = rng.integers(0, 300)
    ct = _ct(hu)
    lungs = Lungs(labels=np.ones(shape, dtype=np.int32), mask=np.ones(shape, dtype=bool), spacing_irc=(1.0, 1.0, 1.0))
    config = pipeline.DiagnoseConfig(flips=False, nodule_threshold=0.0)
    cpu = torch.device("cpu")

    def run(nodule_temperature: float, malignancy_temperature: float) -> pd.DataFrame:
        models = model_set.DiagnosisModels(
            segmentation=_loaded(CentreSliceLogits(), "segmentation"),
            nodule=_loaded(SteepLeftHeavyLogits(), "nodule", nodule_temperature),
            malignancy=_loaded(LeftHeavyLogits(), "malignancy", malignancy_temperature))
        assert models.describe()["nodule"]["temperature"] == nodule_temperature
        return pipeline.diagnose_ct(ct, models, config, cpu, lungs=lungs)[0].candidates

    plain, calibrated = run(1.0, 1.0), run(2.0, 3.0)
    assert len(plain) >= 2 and np.array_equal(plain[["index", "row", "col"]], calibrated[["index", "row", "col"]])
    np.testing.assert_allclose(_logit(calibrated["nodule_probability"].to_numpy()),
                               _logit(plain["nodule_probability"].to_numpy()) / 2.0, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(_logit(calibrated["malignancy_probability"].to_numpy(np.float64)),
                               _logit(plain["malignancy_probability"].to_numpy(np.float64)) / 3.0, rtol=1e-4,
                               atol=1e-6)


def test_placed_models_give_the_same_results_in_channels_last() -> None:
    """``DiagnosisModels.place`` (eval, channels-last) changes the memory layout, not the results."""
    torch.manual_seed(3)
    rng = np.random.default_rng(3)
    hu = rng.integers(-1000, 400, size=(24, 64, 64)).astype(np.int16)
    region = np.zeros(hu.shape, dtype=bool)
    region[6:18, 10:50, 12:52] = True
    centers = np.array([[12, 32, 32], [8, 24, 40], [14, 40, 24]])
    segmentation = build_model("unet", **{**BOOK_SEGMENTATION_KWARGS, "depth": 2}).eval()
    classifier = build_model("luna", input_shape=[16, 16, 16]).eval()
    cpu = torch.device("cpu")
    mask = segment.segment_ct(hu, region, segmentation, 0.5, 4, cpu)
    probabilities = classify.classify_chunks(hu, centers, classifier, 2, cpu, flips=True)
    models = model_set.DiagnosisModels(segmentation=_loaded(segmentation, "segmentation"),
                                      nodule=_loaded(classifier, "nodule")).place(cpu)
    assert all(p.is_contiguous(memory_format=torch.channels_last_3d)
               for p in classifier.parameters() if p.dim() == 5)
    assert np.array_equal(segment.segment_ct(hu, region, models.segmentation.model, 0.5, 4, cpu), mask)
    assert classify.classify_chunks(hu, centers, models.nodule.model, 2, cpu, flips=True) == pytest.approx(
        probabilities, abs=1e-5)


def test_amp_on_the_cpu_runs_the_models_in_bfloat16_close_to_float32() -> None:
    """``--amp`` on the CPU: both models compute in bfloat16, and give float32's results within its precision."""
    torch.manual_seed(4)
    rng = np.random.default_rng(4)
    hu = rng.normal(-500, 400, size=(24, 64, 64)).clip(-1000, 1000).astype(np.int16)
    region = np.zeros(hu.shape, dtype=bool)
    region[6:18, 10:50, 12:52] = True
    centers = rng.integers([8, 12, 12], [16, 52, 52], size=(12, 3))
    cpu = torch.device("cpu")
    segmentation = build_model("unet", **{**BOOK_SEGMENTATION_KWARGS, "depth": 2}).eval()
    classifier = build_model("luna", input_shape=[16, 24, 24]).eval()
    computed: list[torch.dtype] = []
    for model in (segmentation, classifier):
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
                module.register_forward_hook(lambda _module, _inputs, output: computed.append(output.dtype))
    mask = segment.segment_ct(hu, region, segmentation, 0.5, 4, cpu)
    probabilities = classify.classify_chunks(hu, centers, classifier, 4, cpu, flips=True)
    assert set(computed) == {torch.float32}
    computed.clear()
    mask_bf16 = segment.segment_ct(hu, region, segmentation, 0.5, 4, cpu, amp=True)
    probabilities_bf16 = classify.classify_chunks(hu, centers, classifier, 4, cpu, amp=True, flips=True)
    assert set(computed) == {torch.bfloat16}
    assert mask_bf16.dtype == bool and np.mean(mask_bf16 != mask) < 0.02
    np.testing.assert_allclose(probabilities_bf16, probabilities, atol=3e-2)


def _loaded(model: torch.nn.Module, task: str, temperature: float = 1.0) -> LoadedCheckpoint:
    return LoadedCheckpoint(path=Path("untrained"), model=model, task=task, model_name=type(model).__name__,
                            model_kwargs={}, epoch=None, samples_seen=None, optimizer_name=None,
                            optimizer_state=None, config={}, metrics={}, is_book=False, raw={},
                            temperature=temperature)
