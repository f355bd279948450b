"""python -m p2ch_luna.export and diagnose --runtime onnx: each kind of checkpoint exported, onnxruntime agreeing
with PyTorch at batch 1 and 3, the calibration kept, the same findings, and bad input as one line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from p2ch_luna.diagnose import cli as diagnose_cli
from p2ch_luna.diagnose.report import REPORT_FILE
from p2ch_luna.errors import DataError
from p2ch_luna.export import main as export_main
from p2ch_luna.export.exporters import example_input
from p2ch_luna.export.metadata import METADATA_KEY
from p2ch_luna.export.runtime import load_onnx_checkpoint
from p2ch_luna.export.verify import LOGIT_ATOL, LOGIT_RTOL, PROBABILITY_TOLERANCE
from p2ch_luna.io.ct import list_series_on_disk
from p2ch_luna.models import build_model, load_checkpoint
from p2ch_luna.models.checkpoint import CALIBRATION_FIELD, save_checkpoint

needs_onnx = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or
                                importlib.util.find_spec("onnxscript") is None,
                                reason="onnxruntime/onnxscript not installed (pip install '.[onnx]')")

SMALL_MODELS = {
    "segmentation": ("unet", {"in_channels": 3, "n_classes": 1, "depth": 2, "wf": 2, "padding": True,
                              "batch_norm": True}),
    "nodule": ("luna", {"conv_channels": 2, "input_shape": [8, 16, 16], "depth": 2}),
    "malignancy": ("luna", {"conv_channels": 2, "input_shape": [8, 16, 16], "depth": 2}),
}
CALIBRATION = {"temperature": 2.5, "bias": -0.75, "method": "platt"}
HU_SCALE = 300.0
BOOK_FILES = {"segmentation": "seg_*.best.state", "nodule": "cls_*.best.state"}


def _small_checkpoint(folder: Path, task: str) -> Path:
    torch.manual_seed(1)
    name, kwargs = SMALL_MODELS[task]
    model = build_model(name, **kwargs)
    for module in model.modules():  # running statistics away from 0/1, so a dropped batch norm shows
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    first_norm = model.input_batchnorm if task == "segmentation" else model.tail_batchnorm
    first_norm.running_var.fill_(HU_SCALE**2)  # the input in units of HU_SCALE, as a trained model learns
    extra = None if task == "segmentation" else {CALIBRATION_FIELD: CALIBRATION}
    return save_checkpoint(folder / f"{task}.state", model, model_name=name, model_kwargs=kwargs, task=task,
                           epoch=3, samples_seen=10, config={}, metrics={}, extra=extra)


def _inputs(model: torch.nn.Module, task: str, batch: int, seed: int) -> torch.Tensor:
    return example_input(model, task, batch, (37, 45), seed=seed + 100)  # not the exporter's own example shape


def _ort_session(path: Path):  # noqa: ANN202
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _assert_onnx_agrees(checkpoint: Path, exported: Path) -> dict:
    loaded = load_checkpoint(checkpoint)
    session = _ort_session(exported)
    for seed, batch in enumerate((1, 3)):
        inputs = _inputs(loaded.model, loaded.task, batch, seed)
        with torch.no_grad():
            expected = loaded.model(inputs).numpy()
        (got,) = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})
        assert got.shape == expected.shape and got.shape[0] == batch
        np.testing.assert_allclose(got, expected, rtol=LOGIT_RTOL, atol=LOGIT_ATOL)
        sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
        assert np.abs(sigmoid(got) - sigmoid(expected)).max() <= PROBABILITY_TOLERANCE
    return json.loads(session.get_modelmeta().custom_metadata_map[METADATA_KEY])


@needs_onnx
@pytest.mark.parametrize("task", SMALL_MODELS)
def test_onnx_export_of_each_kind_agrees_with_torch_at_batch_1_and_3_and_keeps_the_calibration(
        task: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = _small_checkpoint(tmp_path, task)
    out = tmp_path / f"{task}.onnx"
    assert export_main([str(checkpoint), "--format", "onnx", str(out)]) == 0
    assert "agrees with PyTorch at batch 1, 3" in capsys.readouterr().out
    metadata = _assert_onnx_agrees(checkpoint, out)
    assert metadata["task"] == task and metadata["epoch"] == 3
    expected = (1.0, 0.0) if task == "segmentation" else (CALIBRATION["temperature"], CALIBRATION["bias"])
    assert (metadata["temperature"], metadata["bias"]) == expected
    if task == "segmentation":
        assert (metadata["in_channels"], metadata["pooling_grid"]) == (3, 2)
    else:
        assert metadata["input_shape"] == [8, 16, 16]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([checkpoint.name, out.name])  # no staging left
    exported = load_onnx_checkpoint(out, task)  # the file alone, as a server would load it
    assert (exported.task, exported.temperature, exported.bias, exported.epoch) == (task, *expected, 3)
    assert getattr(exported.model, "input_shape", None) == (None if task == "segmentation" else (8, 16, 16))
    with pytest.raises(DataError, match=f"is a {task} model, expected"):
        load_onnx_checkpoint(out, "nodule" if task != "nodule" else "segmentation")


@pytest.mark.parametrize("task", SMALL_MODELS)
def test_torchscript_export_of_each_kind_runs_any_batch_and_carries_the_metadata(task: str, tmp_path: Path) -> None:
    checkpoint = _small_checkpoint(tmp_path, task)
    out = tmp_path / f"{task}.pt"
    assert export_main([str(checkpoint), "--format", "torchscript", str(out)]) == 0
    extra = {f"{METADATA_KEY}.json": ""}
    traced = torch.jit.load(str(out), map_location="cpu", _extra_files=extra)
    loaded = load_checkpoint(checkpoint)
    for seed, batch in enumerate((1, 3)):
        inputs = _inputs(loaded.model, task, batch, seed)
        with torch.no_grad():
            torch.testing.assert_close(traced(inputs), loaded.model(inputs))
    assert json.loads(extra[f"{METADATA_KEY}.json"])["temperature"] == (1.0 if task == "segmentation" else 2.5)


@needs_onnx
@pytest.mark.parametrize("task", BOOK_FILES)
def test_the_books_checkpoints_export_to_onnx_within_tolerance(task: str, book_checkpoints_dir: Path,
                                                               tmp_path: Path) -> None:
    (checkpoint,) = book_checkpoints_dir.glob(BOOK_FILES[task])
    out = tmp_path / "book.onnx"
    assert export_main([str(checkpoint), "--format", "onnx", str(out), "--task", task]) == 0
    metadata = _assert_onnx_agrees(checkpoint, out)
    assert metadata["is_book"] is True and metadata["task"] == task


@pytest.mark.reliability
def test_not_a_checkpoint_is_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bogus = tmp_path / "notes.txt"
    bogus.write_text("not a checkpoint")
    out = tmp_path / "out.pt"
    assert export_main([str(bogus), "--format", "torchscript", str(out)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "notes.txt is not a p2ch_luna or book checkpoint" in lines[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.reliability
def test_an_unknown_format_or_the_wrong_task_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = _small_checkpoint(tmp_path, "nodule")
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(checkpoint), "--format", "tflite", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    assert export_main([str(checkpoint), "--format", "torchscript", "--task", "segmentation",
                        str(tmp_path / "x.pt")]) == 1
    assert "is a nodule checkpoint, expected segmentation" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


@needs_onnx
@pytest.mark.slow
def test_diagnose_on_onnx_gives_the_findings_of_torch(tiny_dataset: Path, untrained_models: Path,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    uid = sorted(list_series_on_disk(tiny_dataset))[0]
    reports = {}
    for runtime in ("torch", "onnx", "onnx"):  # the second onnx run reuses the cached exports
        out = tmp_path / f"out-{runtime}-{len(reports)}"
        assert diagnose_cli.main(["--data-root", str(tiny_dataset), "--models-dir", str(untrained_models),
                                  "--cache-dir", str(tmp_path / "cache"), "--series-uid", uid, "--output", str(out),
                                  "--runtime", runtime, "--segmentation-threshold", "0.9",
                                  "--nodule-threshold", "0.2", "--min-diameter-mm", "0"]) == 0
        reports[out.name] = json.loads((out / REPORT_FILE).read_text())
    exports = sorted((tmp_path / "cache" / "onnx").glob("*.onnx"))
    assert [p.name.split("-")[0] for p in exports] == ["malignancy", "nodule", "segmentation"]
    torch_run, *onnx_runs = reports.values()
    reference = torch_run["series"][0]["candidates"]
    assert len(reference) > 0 and sum(c["nodule_probability"] >= 0.2 for c in reference) > 0
    for onnx_run in onnx_runs:
        assert onnx_run["config"]["runtime"] == "onnx" and onnx_run["models"]["nodule"]["path"].endswith(".onnx")
        candidates = onnx_run["series"][0]["candidates"]
        assert [(c["center_x"], c["center_y"], c["center_z"]) for c in candidates] == [
            (c["center_x"], c["center_y"], c["center_z"]) for c in reference]
        for key in ("nodule_probability", "malignancy_probability"):
            got = np.array([c.get(key) for c in candidates], dtype=float)
            expected = np.array([c.get(key) for c in reference], dtype=float)
            np.testing.assert_allclose(got, expected, atol=PROBABILITY_TOLERANCE, rtol=0)


@needs_onnx
@pytest.mark.reliability
def test_diagnose_onnx_refuses_amp(tiny_dataset: Path, capsys: pytest.CaptureFixture) -> None:
    assert diagnose_cli.main(["--data-root", str(tiny_dataset), "--validation", "--runtime", "onnx", "--amp"]) == 2
    assert "--runtime onnx runs float32 on the CPU" in capsys.readouterr().err
