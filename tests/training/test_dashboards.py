"""What TensorBoard shows after training: every dashboard item, read back from the event files.

One tiny nodule run and one tiny segmentation run (a few seconds each on a CPU);
the tags are the ones the README's Dashboards section describes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from p2ch_luna.training import cli as training

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
tensor_util = pytest.importorskip("tensorboard.util.tensor_util")

CLASSIFICATION_SCALARS = ("loss/all", "loss/pos", "loss/neg", "correct/all", "correct/pos", "correct/neg",
                          "pr/precision", "pr/recall", "pr/f1", "auc/roc")
SEGMENTATION_SCALARS = ("loss/all", "loss/dice", "pr/dice", "pr/precision", "pr/recall",
                        "percent_all/tp", "percent_all/fn", "percent_all/fp")
HPARAMS_TAGS = ("_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info")


def _folders(data_root: Path, out: Path) -> list[str]:
    return ["--data-root", str(data_root), "--cache-dir", str(out / "cache"), "--models-dir", str(out / "models"),
            "--runs-dir", str(out / "runs"), "--device", "cpu", "--log-level", "WARNING", "--val-stride", "3"]


def _load(runs_dir: Path, mode: str, task: str) -> event_accumulator.EventAccumulator:
    found = sorted(runs_dir.rglob(f"*-{mode}-{task}-dash"))
    assert len(found) == 1, found
    accumulator = event_accumulator.EventAccumulator(
        str(found[0]), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


@pytest.fixture(scope="module")
def nodule_runs(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("nodule_dash")
    assert training.main(["nodule", *_folders(tiny_dataset, out), "--epochs", "2", "--batch-size", "4",
                          "--epoch-size", "16", "--val-size", "12", "--ratio", "1",
                          "--model-kwargs", '{"conv_channels": 2, "depth": 2}', "--chunk-shape", "8", "16", "16",
                          "--comment", "dash"]) == 0
    return {mode: _load(out / "runs", mode, "nodule") for mode in ("trn", "val")}


@pytest.fixture(scope="module")
def segmentation_runs(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("segmentation_dash")
    assert training.main(["segmentation", *_folders(tiny_dataset, out), "--epochs", "1", "--batch-size", "4",
                          "--epoch-size", "8", "--ratio", "0", "--val-negative-fraction", "0.05",
                          "--tb-images", "2", "--model-kwargs", '{"depth": 2, "wf": 2}', "--comment", "dash"]) == 0
    return {mode: _load(out / "runs", mode, "segmentation") for mode in ("trn", "val")}


def _assert_finite_scalars(accumulator: event_accumulator.EventAccumulator, tags: tuple[str, ...]) -> None:
    present = accumulator.Tags()["scalars"]
    for tag in tags:
        assert tag in present, tag
        values = [event.value for event in accumulator.Scalars(tag)]
        assert values and all(math.isfinite(value) for value in values), (tag, values)


def _assert_config_text(accumulator: event_accumulator.EventAccumulator, task: str) -> None:
    assert "config/text_summary" in accumulator.Tags()["tensors"]
    text = tensor_util.make_ndarray(accumulator.Tensors("config/text_summary")[0].tensor_proto).item().decode()
    assert f'"task": "{task}"' in text


def _assert_hparams(accumulator: event_accumulator.EventAccumulator, metric: str) -> None:
    content = accumulator.PluginTagToContent("hparams")
    for tag in HPARAMS_TAGS:
        assert tag in content, tag
    _assert_finite_scalars(accumulator, (f"hparam/{metric}", "hparam/best_score"))


@pytest.mark.parametrize("mode", ["trn", "val"])
def test_classification_scalars_curves_and_histograms(nodule_runs: dict, mode: str) -> None:
    accumulator = nodule_runs[mode]
    _assert_finite_scalars(accumulator, CLASSIFICATION_SCALARS)
    curve = tensor_util.make_ndarray(accumulator.Tensors("pr")[-1].tensor_proto)
    assert curve.shape[0] == 6 and np.isfinite(curve).all()  # TP, FP, TN, FN, precision, recall per threshold
    assert accumulator.summary_metadata["pr"].plugin_data.plugin_name == "pr_curves"
    tags = accumulator.Tags()
    for tag in ("prob/neg", "prob/pos"):
        histogram = accumulator.Histograms(tag)[-1].histogram_value
        assert tag in tags["histograms"] and histogram.num > 0 and 0.0 <= histogram.min <= histogram.max <= 1.0
    roc = accumulator.Images("roc")[-1]
    assert roc.width > 0 and roc.encoded_image_string.startswith(b"\x89PNG")


def test_classification_config_and_hparams(nodule_runs: dict) -> None:
    _assert_config_text(nodule_runs["trn"], "nodule")
    _assert_hparams(nodule_runs["val"], "roc_auc")


def test_segmentation_scalars_images_config_and_hparams(segmentation_runs: dict) -> None:
    for accumulator in segmentation_runs.values():
        _assert_finite_scalars(accumulator, SEGMENTATION_SCALARS)
    images = segmentation_runs["val"].Tags()["images"]
    assert len(images) == 2 and all(tag.startswith("val/") for tag in images)
    overlay = segmentation_runs["val"].Images(images[0])[-1]
    assert overlay.encoded_image_string.startswith(b"\x89PNG") and overlay.width > 0
    _assert_config_text(segmentation_runs["trn"], "segmentation")
    _assert_hparams(segmentation_runs["val"], "dice")
