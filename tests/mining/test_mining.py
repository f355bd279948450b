"""Mining our own segmenter's candidates: the radius rule, the stored table's key, resuming, rebuilding a bad
table, the command's errors, and nodule training drawing hard negatives from the table."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from p2ch_luna.data.candidates import LABEL_COLUMN, MINED_SOURCE
from p2ch_luna.data.sampling import BalancedSampler, equal_bin_weights
from p2ch_luna.errors import DataError
from p2ch_luna.evaluation.truth import Truth
from p2ch_luna.mining import run as mining_run
from p2ch_luna.mining import store
from p2ch_luna.mining.cli import main as mining_main
from p2ch_luna.mining.labels import label_by_radius
from p2ch_luna.paths import resolve_paths
from p2ch_luna.training.config import TrainConfig
from p2ch_luna.training.tasks import RunContext
from p2ch_luna.training.tasks.classification import HARD_NEGATIVE_SIZE_EDGES_MM, ClassificationOptions, NoduleTask


def candidates(*points: tuple[str, float, float, float]) -> pd.DataFrame:
    return pd.DataFrame([{"series_uid": uid, "center_x": x, "center_y": y, "center_z": z, "diameter_mm": 4.0,
                          "voxel_count": 10} for uid, x, y, z in points])


def test_radius_rule_labels_inside_as_nodule_and_drops_excluded_marks() -> None:
    nodules = pd.DataFrame({"series_uid": ["a", "b"], "center_x": [0.0, 50.0], "center_y": [0.0, 0.0],
                            "center_z": [0.0, 0.0], "diameter_mm": [10.0, 6.0], "is_malignant": [np.nan, np.nan]})
    excluded = pd.DataFrame({"seriesuid": ["a"], "coordX": [100.0], "coordY": [0.0], "coordZ": [0.0],
                             "diameter_mm": [-1.0]})  # negative: the evaluation's 10 mm
    table = candidates(("a", 4.9, 0.0, 0.0),    # inside a's 5 mm radius
                       ("a", 5.0, 0.0, 0.0),    # on the radius: not strictly within
                       ("a", 50.0, 0.0, 0.0),   # b's nodule, but in series a
                       ("a", 103.0, 0.0, 0.0),  # on an excluded finding: left out
                       ("b", 52.0, 1.0, 0.0))   # inside b's 3 mm radius
    labelled = label_by_radius(table, Truth(nodules=nodules, excluded=excluded))
    assert labelled["center_x"].tolist() == [4.9, 5.0, 50.0, 52.0]
    assert labelled["is_nodule"].tolist() == [True, False, False, True]


def test_sampler_draws_the_asked_share_of_negatives_from_the_hard_ones() -> None:
    labels = np.array([True] * 10 + [False] * 90)
    hard = np.zeros(100, dtype=bool)
    hard[90:] = True  # 10 hard negatives among 90
    sampler = BalancedSampler(labels, ratio=3, epoch_size=400, seed=1, hard=hard, hard_fraction=0.5)
    drawn = sampler.global_indices()
    negatives = drawn[~labels[drawn]]
    assert labels[drawn].sum() == 100 and len(negatives) == 300
    assert hard[negatives].sum() == 150
    plain = BalancedSampler(labels, ratio=3, epoch_size=400, seed=1)
    assert np.array_equal(plain.global_indices(), BalancedSampler(labels, ratio=3, epoch_size=400, seed=1,
                                                                  hard=hard, hard_fraction=0.0).global_indices())
    with pytest.raises(ValueError):
        BalancedSampler(labels, ratio=3, hard_fraction=0.5)


def test_equal_bin_weights_give_every_occupied_bin_the_same_mass() -> None:
    weights = equal_bin_weights(np.array([1.0, 2.0, 3.0, 5.0, 6.0, 30.0]), edges=(4.0, 8.0, 16.0))
    assert np.allclose(weights, [1 / 9, 1 / 9, 1 / 9, 1 / 6, 1 / 6, 1 / 3])  # bins <4, 4-8, >=16; 8-16 empty
    assert equal_bin_weights(np.zeros(0), edges=(4.0,)).size == 0


def test_sampler_draws_hard_negatives_by_weight() -> None:
    labels = np.array([True] * 10 + [False] * 90)
    hard = np.zeros(100, dtype=bool)
    hard[50:] = True  # 50 hard negatives: 49 specks and one large one
    diameters = np.full(100, 3.0)
    diameters[99] = 20.0
    weights = np.zeros(100)
    weights[hard] = equal_bin_weights(diameters[hard], edges=(4.0,))

    def large_share(**kwargs: object) -> float:
        drawn = BalancedSampler(labels, ratio=3, epoch_size=4000, seed=2, hard=hard, hard_fraction=1.0,
                                **kwargs).global_indices()
        negatives = drawn[~labels[drawn]]
        assert hard[negatives].all() and len(negatives) == 3000
        return float(np.mean(negatives == 99))

    assert 0.45 < large_share(hard_weights=weights) < 0.55  # half the hard draws: its bin's mass
    assert large_share() == pytest.approx(1 / 50, abs=0.005)  # cycled: as often as any other
    with pytest.raises(ValueError, match="hard_weights"):
        BalancedSampler(labels, ratio=3, hard=hard, hard_fraction=0.5, hard_weights=np.ones(3))
    with pytest.raises(ValueError, match="hard_weights"):
        BalancedSampler(labels, ratio=3, hard=hard, hard_fraction=0.5, hard_weights=np.zeros(100))


@pytest.fixture()
def mining_setup(tiny_dataset: Path, untrained_models: Path, tmp_path: Path) -> tuple:
    paths = resolve_paths(tiny_dataset, tmp_path / "cache", tmp_path / "models", tmp_path / "runs")
    checkpoint = next(untrained_models.glob("segmentation_*.best.state"))
    series = mining_run.training_series(tiny_dataset, val_stride=5)
    return paths, checkpoint, series


def counting_mine_ct(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace nothing but count the series really segmented."""
    seen: list[str] = []
    real = mining_run.mine_ct

    def counted(ct, *args, **kwargs):
        seen.append(ct.series_uid)
        return real(ct, *args, **kwargs)

    monkeypatch.setattr(mining_run, "mine_ct", counted)
    return seen


@pytest.mark.slow
def test_mined_table_is_stored_reused_resumed_and_rebuilt(mining_setup: tuple, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    paths, checkpoint, series = mining_setup
    assert len(series) == 4  # 5 series, every 5th is validation and never mined
    seen = counting_mine_ct(monkeypatch)
    device = torch.device("cpu")
    first = mining_run.mine(paths, checkpoint, series, device, progress=False)
    assert sorted(seen) == sorted(series)
    assert list(first.table.columns) == list(store.MINED_COLUMNS)
    assert set(first.table["series_uid"]) <= set(series) and len(first.table) > 0
    # Same inputs: read back, nothing segmented again.
    again = mining_run.mine(paths, checkpoint, series, device, progress=False)
    assert len(seen) == len(series)
    pd.testing.assert_frame_equal(again.table, first.table)
    # A corrupt table is mined again from the series files an earlier run left (nothing re-segmented) ...
    first.path.write_text("not,a\nmined table")
    rebuilt = mining_run.mine(paths, checkpoint, series, device, progress=False)
    assert len(seen) == len(series)
    pd.testing.assert_frame_equal(rebuilt.table, first.table)
    # ... and an interrupted run resumes: only the series without a file are segmented.
    (rebuilt.folder / store.TABLE_FILE).unlink()
    (rebuilt.folder / store.SERIES_FOLDER / f"{series[0]}.csv").write_text("garbage")
    mining_run.mine(paths, checkpoint, series, device, progress=False)
    assert seen[len(series):] == [series[0]]
    # Another checkpoint (other bytes) is another key: a new folder, every series mined.
    other = tmp_path / "other.state"
    shutil.copy(checkpoint, other)
    with open(other, "ab") as handle:
        handle.write(b"\0")
    changed = mining_run.mine(paths, other, series, device, progress=False)
    assert changed.folder != first.folder and len(seen) == 2 * len(series) + 1


def test_key_changes_with_each_input(tmp_path: Path) -> None:
    ct = tmp_path / "a.mhd"
    ct.write_text("x")
    base = store.mining_key("seg", store.MiningParams(), {"a": ct}, "ann")
    assert base == store.mining_key("seg", store.MiningParams(), {"a": ct}, "ann")
    assert base != store.mining_key("seg2", store.MiningParams(), {"a": ct}, "ann")
    assert base != store.mining_key("seg", store.MiningParams(grouping="components"), {"a": ct}, "ann")
    assert base != store.mining_key("seg", store.MiningParams(), {"a": ct}, "ann2")
    assert base != store.mining_key("seg", store.MiningParams(), {}, "ann")
    ct.write_text("longer")
    assert base != store.mining_key("seg", store.MiningParams(), {"a": ct}, "ann")


def test_mining_refuses_a_folder_without_annotations(tiny_dataset: Path, untrained_models: Path,
                                                     tmp_path: Path) -> None:
    data = tmp_path / "luna"
    shutil.copytree(tiny_dataset, data)
    (data / "annotations.csv").unlink()
    paths = resolve_paths(data, tmp_path / "cache", tmp_path / "models", tmp_path / "runs")
    checkpoint = next(untrained_models.glob("segmentation_*.best.state"))
    with pytest.raises(DataError, match="annotations"):
        mining_run.mine(paths, checkpoint, ["x"], torch.device("cpu"), progress=False)


def test_mining_command_errors_are_one_line(tiny_dataset: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        mining_main(["--data-root", str(tiny_dataset), "--cache-dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "required: --segmentation-path" in capsys.readouterr().err
    code = mining_main(["--data-root", str(tiny_dataset), "--cache-dir", str(tmp_path),
                        "--segmentation-path", str(tmp_path / "missing.state")])
    error = capsys.readouterr().err.strip()
    assert code == 1 and "missing.state" in error and len(error.splitlines()) == 1 and "Traceback" not in error


@pytest.mark.slow
def test_nodule_training_adds_mined_rows_to_training_only(mining_setup: tuple) -> None:
    paths, checkpoint, series = mining_setup
    options = ClassificationOptions(chunk_shape=(16, 16, 16), hard_negatives_from=checkpoint,
                                    hard_negative_fraction=0.5)
    config = TrainConfig(task="nodule", paths=paths, batch_size=8, ratio=1, epoch_size=64, val_stride=5,
                         task_options=options)
    task = NoduleTask(RunContext(config, torch.device("cpu")))
    train, val = task.datasets()
    mined = train.table[train.table["source"] == MINED_SOURCE]
    assert len(mined) > 0 and set(mined["series_uid"]) <= set(series)
    assert MINED_SOURCE not in set(val.table["source"])
    assert (mined[LABEL_COLUMN] == mined["is_nodule"]).all()
    assert (~mined[LABEL_COLUMN]).any()  # an untrained segmenter marks plenty that is no nodule
    sampler = task.train_loader().sampler
    assert sampler.hard_fraction == 0.5 and sampler.hard_indices.size == int((~mined[LABEL_COLUMN]).sum())

    hard_diameters = train.table["diameter_mm"].to_numpy()[sampler.hard_indices]
    expected = equal_bin_weights(hard_diameters, HARD_NEGATIVE_SIZE_EDGES_MM)
    assert np.allclose(sampler.hard_probabilities, expected)  # the default: every size drawn alike
    natural = NoduleTask(RunContext(dataclasses.replace(
        config, task_options=dataclasses.replace(options, hard_negative_sizes="natural")), torch.device("cpu")))
    assert natural.train_loader().sampler.hard_probabilities is None
