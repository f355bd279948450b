"""Tests for p2ch_luna.models: classifier, U-Net, registry and checkpoints."""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from p2ch_luna.errors import DataError
from p2ch_luna.models import (
    MODEL_REGISTRY,
    LunaModel,
    UNet,
    UNetWrapper,
    build_model,
    find_latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from p2ch_luna.models.checkpoint import CALIBRATION_FIELD, update_checkpoint
from p2ch_luna.models.classifier import LunaConv3d
from tests.locations import SHARED_DATA

BOOK_CHECKPOINTS = SHARED_DATA / "book-checkpoints"
TINY_CHUNK = (16, 16, 16)


def book_checkpoint(prefix: str) -> Path:
    found = sorted(BOOK_CHECKPOINTS.glob(f"{prefix}_*.state")) if BOOK_CHECKPOINTS.is_dir() else []
    if not found:
        pytest.skip(f"no book {prefix}_*.state checkpoint under {BOOK_CHECKPOINTS}")
    return found[0]


@pytest.mark.parametrize("input_shape", [(32, 48, 48), (16, 24, 32)])
def test_luna_model_logits_shape(input_shape: tuple[int, int, int]) -> None:
    model = LunaModel(input_shape=input_shape).eval()
    logits = model(torch.randn(3, 1, *input_shape))
    assert logits.shape == (3, 2)


def test_luna_model_head_size_derived_from_input_shape() -> None:
    assert LunaModel().head_linear.in_features == 1152
    assert LunaModel(input_shape=(16, 24, 32), conv_channels=4).head_linear.in_features == 32 * 1 * 1 * 2
    with pytest.raises(ValueError):
        LunaModel(input_shape=(8, 8, 8))


def test_luna_model_accepts_channels_last_3d() -> None:
    torch.manual_seed(0)
    model = LunaModel(input_shape=TINY_CHUNK).eval()
    batch = torch.randn(2, 1, *TINY_CHUNK)
    expected = model(batch)
    got = model.to(memory_format=torch.channels_last_3d)(batch.to(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_registry_builds_wide_variant() -> None:
    assert {"luna", "luna-wide", "unet"} <= set(MODEL_REGISTRY)
    wide = build_model("luna-wide", input_shape=TINY_CHUNK)
    assert wide.block1.conv1.out_channels == 16
    with pytest.raises(ValueError, match="unknown model"):
        build_model("no-such-model")


def test_book_classifier_checkpoint_loads_strict() -> None:
    path = book_checkpoint("cls")
    state = torch.load(path, map_location="cpu", weights_only=True)["model_state"]
    LunaModel().load_state_dict(state, strict=True)
    loaded = load_checkpoint(path, expected_task="nodule")
    assert loaded.is_book and loaded.task == "nodule" and isinstance(loaded.model, LunaModel)
    assert loaded.samples_seen == 4_500_000
    assert loaded.temperature == 1.0  # the book's files hold no calibration: the plain softmax
    assert loaded.model(torch.zeros(1, 1, 32, 48, 48)).shape == (1, 2)


def test_book_segmentation_checkpoint_loads_strict() -> None:
    path = book_checkpoint("seg")
    state = torch.load(path, map_location="cpu", weights_only=True)["model_state"]
    UNetWrapper().load_state_dict(state, strict=True)
    loaded = load_checkpoint(path, expected_task="segmentation")
    assert loaded.task == "segmentation" and isinstance(loaded.model, UNetWrapper)
    with pytest.raises(DataError, match="is a segmentation checkpoint, expected nodule or malignancy"):
        load_checkpoint(path, expected_task=("nodule", "malignancy"))


@pytest.mark.parametrize("height, width", [(65, 77), (7, 9), (16, 16)])
def test_unet_wrapper_keeps_odd_sizes(height: int, width: int) -> None:
    model = UNetWrapper().eval()
    assert model(torch.randn(2, 7, height, width)).shape == (2, 1, height, width)


def test_unet_valid_convolutions_shrink_output() -> None:
    # depth 2 on 20x20: 20 -conv-> 16 -pool-> 8 -conv-> 4 -up-> 8 -conv-> 4
    model = UNet(in_channels=1, n_classes=2, depth=2, wf=1, padding=False).eval()
    assert model(torch.randn(1, 1, 20, 20)).shape == (1, 2, 4, 4)


def test_unet_block_layout_matches_book_keys() -> None:
    keys = set(UNet(depth=2, wf=1, padding=True, batch_norm=True, up_mode="upsample").state_dict())
    assert {"down_path.0.block.0.weight", "down_path.0.block.2.running_mean", "down_path.0.block.3.weight",
            "down_path.0.block.5.weight", "up_path.0.up.1.weight", "last.weight"} <= keys


@pytest.mark.parametrize(
    "model_name, model_kwargs, task, input_shape",
    [
        ("luna-wide", {"input_shape": TINY_CHUNK}, "malignancy", (2, 1, *TINY_CHUNK)),
        ("unet", {"in_channels": 3, "depth": 2, "wf": 2}, "segmentation", (2, 3, 9, 11)),
    ],
)
def test_checkpoint_round_trip(tmp_path: Path, model_name: str, model_kwargs: dict, task: str,
                               input_shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(model_name, **model_kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batch = torch.randn(*input_shape)
    model(batch).sum().backward()
    optimizer.step()
    model.eval()
    path = save_checkpoint(
        tmp_path / "models" / "ckpt.best.state", model, model_name=model_name, model_kwargs=model_kwargs,
        task=task, optimizer=optimizer, epoch=3, samples_seen=96,
        config={"data_root": tmp_path, "lr": 0.01}, metrics={"loss": 0.5},
    )
    loaded = load_checkpoint(path, expected_task=task)
    assert not loaded.is_book and loaded.model_name == model_name and loaded.task == task
    assert (loaded.epoch, loaded.samples_seen, loaded.optimizer_name) == (3, 96, "SGD")
    assert loaded.raw["totalTrainingSamples_count"] == 96
    assert loaded.config["data_root"] == str(tmp_path) and loaded.metrics == {"loss": 0.5}
    torch.testing.assert_close(loaded.model(batch), model(batch), atol=0, rtol=0)
    fresh_optimizer = torch.optim.SGD(loaded.model.parameters(), lr=0.01, momentum=0.9)
    fresh_optimizer.load_state_dict(loaded.optimizer_state)
    assert list(tmp_path.joinpath("models").iterdir()) == [path]  # no temporary files left


def _tiny_classifier_checkpoint(path: Path, **extra: object) -> tuple[Path, LunaModel, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = LunaModel(input_shape=TINY_CHUNK, conv_channels=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(torch.randn(2, 1, *TINY_CHUNK)).sum().backward()
    optimizer.step()
    kwargs = {"input_shape": list(TINY_CHUNK), "conv_channels": 2}
    save_checkpoint(path, model.eval(), model_name="luna", model_kwargs=kwargs, task="nodule", optimizer=optimizer,
                    epoch=2, samples_seen=64, config={"lr": 0.01}, metrics={"roc_auc": 0.75}, extra=extra or None)
    return path, model, optimizer


def test_a_checkpoint_without_calibration_loads_with_temperature_one(tmp_path: Path) -> None:
    path, _, _ = _tiny_classifier_checkpoint(tmp_path / "old.best.state")
    assert CALIBRATION_FIELD not in torch.load(path, weights_only=True)
    assert load_checkpoint(path).temperature == 1.0


def test_update_checkpoint_stores_the_calibration_and_keeps_everything_else(tmp_path: Path) -> None:
    path, model, optimizer = _tiny_classifier_checkpoint(tmp_path / "models" / "run.best.state")
    before = torch.load(path, weights_only=True)
    update_checkpoint(path, {CALIBRATION_FIELD: {"method": "temperature", "temperature": 2.5, "ece_before": 0.2,
                                                 "ece_after": np.float64(0.05), "reason": None}})
    loaded = load_checkpoint(path, expected_task="nodule")
    assert loaded.temperature == 2.5 and loaded.raw[CALIBRATION_FIELD]["ece_after"] == 0.05
    assert (loaded.epoch, loaded.samples_seen, loaded.metrics, loaded.config) == (2, 64, {"roc_auc": 0.75},
                                                                                   {"lr": 0.01})
    assert loaded.raw["time"] == before["time"] and loaded.raw["code_version"] == before["code_version"]
    batch = torch.randn(2, 1, *TINY_CHUNK)
    torch.testing.assert_close(loaded.model(batch), model(batch), atol=0, rtol=0)
    torch.testing.assert_close(loaded.optimizer_state, optimizer.state_dict())
    assert list(path.parent.iterdir()) == [path]  # atomic: no temporary file left
    with pytest.raises(ValueError, match="does not replace"):
        update_checkpoint(path, {"model_state": {}})


def test_a_platt_calibration_loads_its_bias_and_a_temperature_one_loads_bias_zero(tmp_path: Path) -> None:
    platt, _, _ = _tiny_classifier_checkpoint(tmp_path / "platt.best.state", **{
        CALIBRATION_FIELD: {"method": "platt", "temperature": 1.5, "bias": -4.25}})
    loaded = load_checkpoint(platt)
    assert (loaded.temperature, loaded.bias) == (1.5, -4.25)
    older, _, _ = _tiny_classifier_checkpoint(tmp_path / "older.best.state", **{
        CALIBRATION_FIELD: {"method": "temperature", "temperature": 2.0}})
    assert (load_checkpoint(older).temperature, load_checkpoint(older).bias) == (2.0, 0.0)
    bad, _, _ = _tiny_classifier_checkpoint(tmp_path / "bad.best.state", **{
        CALIBRATION_FIELD: {"temperature": 2.0, "bias": math.nan}})
    with pytest.raises(DataError, match="bad.best.state has calibration bias nan"):
        load_checkpoint(bad)


def test_update_checkpoint_leaves_a_book_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "cls_book.state"
    torch.save({"model_state": LunaModel().state_dict(), "model_name": "LunaModel"}, path)
    with pytest.raises(DataError, match="not a p2ch_luna checkpoint"):
        update_checkpoint(path, {CALIBRATION_FIELD: {"temperature": 2.0}})
    assert load_checkpoint(path).temperature == 1.0


@pytest.mark.parametrize("calibration", [{"temperature": 0.0}, {"temperature": -1.0}, {"temperature": math.nan},
                                         {"temperature": math.inf}, {"temperature": "2"}, {"temperature": True},
                                         {"method": "temperature"}, [2.0]])
def test_a_bad_stored_temperature_is_a_data_error(tmp_path: Path, calibration: object) -> None:
    path, _, _ = _tiny_classifier_checkpoint(tmp_path / "bad.best.state", **{CALIBRATION_FIELD: calibration})
    with pytest.raises(DataError, match="bad.best.state has calibration temperature .*expected a positive number"):
        load_checkpoint(path)


def test_non_checkpoint_files_give_data_error(tmp_path: Path) -> None:
    text = tmp_path / "notes.state"
    text.write_text("hello world\n")
    empty = tmp_path / "empty.state"
    empty.write_bytes(b"")
    no_model = tmp_path / "dict.state"
    torch.save({"weights": torch.zeros(2)}, no_model)
    for path in (text, empty, no_model):
        with pytest.raises(DataError, match="is not a p2ch_luna or book checkpoint"):
            load_checkpoint(path)
    with pytest.raises(DataError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.state")


class _CreatesMarker:
    """Unpickling this runs ``open(marker, 'w')``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_pickled_code_is_refused_not_run(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.state"
    payload = {"model_state": {}, "model_name": "LunaModel", "hook": _CreatesMarker(marker)}
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(DataError, match="was refused: it contains pickled objects"):
        load_checkpoint(path)
    assert not marker.exists()


def test_wrong_architecture_gives_data_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.state"
    model = LunaModel(input_shape=TINY_CHUNK)
    save_checkpoint(path, model, model_name="luna", model_kwargs={}, task="nodule",
                    epoch=0, samples_seen=0, config={}, metrics={})
    with pytest.raises(DataError, match="does not fit model 'luna'"):
        load_checkpoint(path)


def test_find_latest_checkpoint_goes_by_contents_not_names(tmp_path: Path) -> None:
    assert find_latest_checkpoint(tmp_path, "nodule") is None
    model = LunaModel(input_shape=TINY_CHUNK)
    kwargs = {"input_shape": list(TINY_CHUNK)}

    def save(path: Path, task: str, epoch: int, best_epoch: int, mtime: int) -> Path:
        save_checkpoint(path, model, model_name="luna", model_kwargs=kwargs, task=task, epoch=epoch,
                        samples_seen=epoch, config={}, metrics={}, extra={"best_epoch": best_epoch})
        os.utime(path, (1_000_000 + mtime, 1_000_000 + mtime))
        return path

    older = save(tmp_path / "a.state", "nodule", 1, 1, 0)
    newer = save(tmp_path / "sub" / "b", "nodule", 2, 2, 1)
    save(tmp_path / "nodule_x.last.state", "nodule", 3, 2, 2)  # not its run's best epoch
    other_task = save(tmp_path / "nodule_y.best.state", "malignancy", 1, 1, 3)
    (tmp_path / "notes.best.state").write_text("not a checkpoint\n")
    assert older.exists()
    assert find_latest_checkpoint(tmp_path, "nodule") == newer
    assert find_latest_checkpoint(tmp_path, "malignancy") == other_task


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("channels", [1, 3])
def test_input_batchnorm_matches_torch_batchnorm(momentum: float | None, channels: int) -> None:
    """Outputs, parameter gradients and running statistics equal nn.BatchNorm3d's, step after step."""
    from torch import nn

    from p2ch_luna.models.classifier import InputBatchNorm3d

    torch.manual_seed(0)
    reference = nn.BatchNorm3d(channels, momentum=momentum)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-0.5, 0.5)
    ours = InputBatchNorm3d(channels, momentum=momentum)
    ours.load_state_dict(reference.state_dict())
    for _ in range(3):
        x = torch.randn(4, channels, 6, 7, 8) * 300 - 500
        expected, actual = reference(x), ours(x)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        expected_grads = torch.autograd.grad(expected.pow(2).sum(), [reference.weight, reference.bias])
        actual_grads = torch.autograd.grad(actual.pow(2).sum(), [ours.weight, ours.bias])
        for got, want in zip(actual_grads, expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-5, atol=1e-5)
    reference.eval(), ours.eval()
    x = torch.randn(2, channels, 5, 5, 5) * 300 - 500
    torch.testing.assert_close(ours(x), reference(x))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("channels", [1, 3, 8])
def test_channel_padding_keeps_the_convolution_and_its_gradients(memory_format: torch.memory_format,
                                                                 channels: int) -> None:
    from p2ch_luna.models.classifier import pad_channels

    torch.manual_seed(0)
    x = torch.randn(2, channels, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, channels, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64)
    padded_x, padded_weight = pad_channels(x, weight, 8, memory_format)
    assert padded_x.shape[1] == padded_weight.shape[1] == 8
    assert padded_x.is_contiguous(memory_format=memory_format)
    assert padded_weight.is_contiguous(memory_format=memory_format)
    expected = torch.nn.functional.conv3d(x, weight, bias, padding=1)
    actual = torch.nn.functional.conv3d(padded_x, padded_weight, bias, padding=1)
    torch.testing.assert_close(actual, expected)
    upstream = torch.randn_like(expected)
    torch.testing.assert_close(torch.autograd.grad(actual, [x, weight], upstream),
                               torch.autograd.grad(expected, [x, weight], upstream))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
def test_folded_input_normalisation_gives_the_plain_outputs_gradients_and_statistics(
        memory_format: torch.memory_format) -> None:
    """LunaModel in training: normalised_convolution against batch norm then convolution, step after step."""
    torch.manual_seed(0)
    models = {}
    for fold in (False, True):
        torch.manual_seed(0)
        model = LunaModel(input_shape=TINY_CHUNK).double().to(memory_format=memory_format).train()
        model.fold_input_normalisation = fold
        with torch.no_grad():  # a batch norm that is not the identity at the start
            model.tail_batchnorm.weight.fill_(1.7)
            model.tail_batchnorm.bias.fill_(-0.3)
        models[fold] = model
    optimizers = {fold: torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9) for fold, model in models.items()}
    for step in range(3):
        inputs = (torch.randn(4, 1, *TINY_CHUNK, dtype=torch.float64) * 300 - 600).contiguous(
            memory_format=memory_format)
        results = {}
        for fold, model in models.items():
            optimizers[fold].zero_grad()
            logits = model(inputs)
            torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 1, 0])).backward()
            results[fold] = logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}
            optimizers[fold].step()
        torch.testing.assert_close(results[True][0], results[False][0])
        torch.testing.assert_close(results[True][1], results[False][1])
        assert results[True][1]["tail_batchnorm.weight"].abs().item() > 0
    torch.testing.assert_close(models[True].state_dict(), models[False].state_dict())
    assert models[True].tail_batchnorm.num_batches_tracked.item() == 3


def test_compiled_folded_model_matches_the_eager_plain_one() -> None:
    """``--compile`` traces LunaModel's folded first layer (the CUDA default) to the eager model's values and
    gradients (float64, CPU inductor)."""
    torch.manual_seed(0)
    folded = LunaModel(conv_channels=2, depth=2, input_shape=(8, 16, 16)).double()
    folded.fold_input_normalisation = True
    plain = LunaModel(conv_channels=2, depth=2, input_shape=(8, 16, 16)).double()
    plain.load_state_dict(folded.state_dict())
    plain.fold_input_normalisation = False
    inputs = torch.randn(4, 1, 8, 16, 16, dtype=torch.float64) * 300 - 500
    compiled_logits = torch.compile(folded)(inputs)
    compiled_logits.pow(2).sum().backward()
    logits = plain(inputs)
    logits.pow(2).sum().backward()
    torch.testing.assert_close(compiled_logits, logits)
    torch.testing.assert_close([p.grad for p in folded.parameters()], [p.grad for p in plain.parameters()])
    torch.testing.assert_close(folded.state_dict(), plain.state_dict())  # running statistics updated alike


def test_convolutions_thinner_than_the_kernel_leave_cpu_bfloat16_and_give_finite_gradients() -> None:
    """The last block of a 16-slice chunk sees 2 slices; bfloat16 weight gradients of such a convolution came out
    NaN now and then on the CPU (about 1 in 8 steps of this layer, one thread), so that layer runs in float32."""
    torch.manual_seed(0)
    conv = LunaConv3d(64, 64, kernel_size=3, padding=1)
    thick = LunaConv3d(8, 8, kernel_size=3, padding=1)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(40):
            x = torch.randn(16, 64, 2, 4, 4)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = conv.rectified(x)
                assert thick(torch.randn(2, 8, 4, 4, 4)).dtype == torch.bfloat16
            assert y.dtype == torch.float32
            y.sum().backward()
            assert torch.isfinite(conv.weight.grad).all()
            conv.zero_grad()
    finally:
        torch.set_num_threads(previous_threads)
