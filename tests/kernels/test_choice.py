"""--kernels: torch's operators by default, the Triton kernels only when asked and only where they run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from p2ch_luna.diagnose import cli as diagnose_cli
from p2ch_luna.kernels import choice
from p2ch_luna.kernels.support import interpreting, triton_usable
from p2ch_luna.models import LunaModel
from p2ch_luna.models.classifier import LunaConv3d, select_kernels
from p2ch_luna.training import cli as training_cli
from p2ch_luna.training.tasks import get_task_class


def _training_config(*options: str):
    args = training_cli.build_parser("nodule").parse_args(["nodule", "--device", "cpu", "--augmented", *options])
    return training_cli.config_from_args(args, get_task_class("nodule"))


def _convolutions(model: torch.nn.Module) -> list[LunaConv3d]:
    return [module for module in model.modules() if isinstance(module, LunaConv3d)]


@pytest.mark.skipif(not (triton_usable() and interpreting()),
                    reason="needs Triton (the [triton] extra) in its interpreter: the kernels must be able to run")
def test_the_default_is_torch_even_where_the_triton_kernels_run() -> None:
    """Triton imports and its kernels run here (a layer set to them takes them), yet the default configuration
    and a freshly built model convolve with torch and augment without the fused kernel."""
    config = _training_config()
    assert config.kernels == choice.DEFAULT_KERNELS == "torch"
    assert config.augment.fused is False
    x = torch.zeros(1, 1, 4, 8, 8).contiguous(memory_format=torch.channels_last_3d)
    forced = LunaConv3d(1, 4, kernel_size=3, padding=1)
    forced.triton = True
    assert forced.uses_triton(x)  # the kernels are usable: the default below is a choice, not a fallback
    for model in (LunaModel(conv_channels=4, depth=2, input_shape=(4, 8, 8)),
                  select_kernels(LunaModel(conv_channels=4, depth=2, input_shape=(4, 8, 8)), config.kernels)):
        first = _convolutions(model)[0]
        assert first.triton is False and not first.uses_triton(x)


def test_kernels_triton_hands_the_layers_and_the_augmentation_to_the_kernels() -> None:
    config = _training_config("--kernels", "triton")
    assert config.kernels == "triton" and config.augment.fused is True
    model = select_kernels(LunaModel(conv_channels=4, depth=2, input_shape=(4, 8, 8)), config.kernels)
    assert all(conv.triton is None for conv in _convolutions(model))  # on CUDA, layers of <= 16 channels
    assert all(conv.triton is False for conv in _convolutions(select_kernels(model, "torch")))


def test_check_kernels_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    choice.check_kernels("torch", torch.device("cpu"))
    with pytest.raises(choice.UsageError, match="--kernels triton needs a CUDA device, not cpu"):
        choice.check_kernels("triton", torch.device("cpu"))
    monkeypatch.setattr(choice, "triton_usable", lambda: False)
    with pytest.raises(choice.UsageError, match=r"--kernels triton needs Triton >= 3\.6 \(pip install"):
        choice.check_kernels("triton", torch.device("cuda"))


def test_training_with_kernels_triton_on_the_cpu_is_one_line_and_writes_nothing(
        tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    models, runs = tmp_path / "models", tmp_path / "runs"
    code = training_cli.main(["nodule", "--kernels", "triton", "--device", "cpu", "--data-root", str(tiny_dataset),
                              "--cache-dir", str(tmp_path / "cache"), "--models-dir", str(models),
                              "--runs-dir", str(runs), "--log-level", "WARNING"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and "--kernels triton needs a CUDA device" in error[0]
    assert not any(models.rglob("*")) and not any(runs.rglob("*"))


def test_diagnose_with_kernels_triton_on_the_cpu_is_one_line(tiny_dataset: Path, untrained_models: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    code = diagnose_cli.main(["--validation", "--data-root", str(tiny_dataset), "--models-dir", str(untrained_models),
                              "--kernels", "triton", "--device", "cpu"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and "--kernels triton needs a CUDA device" in error[0]
