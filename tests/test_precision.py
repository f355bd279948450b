"""Mixed-precision settings: which dtype ``--amp`` means, and the warning where bfloat16 would be emulated."""

from __future__ import annotations

import pytest
import torch

from p2ch_luna import precision


@pytest.mark.parametrize("instructions, warned", [(True, False), (False, True)])
def test_amp_on_a_cpu_that_emulates_bfloat16_is_warned(instructions: bool, warned: bool,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: instructions, raising=False)
    precision.warn_if_emulated(True, torch.device("cpu"))
    precision.warn_if_emulated(False, torch.device("cpu"))
    precision.warn_if_emulated(True, torch.device("meta"))
    assert caplog.text.count("bfloat16 is emulated") == int(warned)


@pytest.mark.parametrize("device_type, runtime, native, expected", [
    ("cpu", "torch", True, True),
    ("cpu", "torch", False, False),
    ("cpu", "onnx", True, False),
    ("cuda", "torch", True, False),
])
def test_auto_precision_is_mixed_only_on_a_cpu_with_native_bfloat16(device_type: str, runtime: str, native: bool,
                                                                    expected: bool) -> None:
    assert precision.mixed_by_default(device_type, runtime, native) is expected


@pytest.mark.parametrize("native", [True, False])
def test_resolve_precision_follows_the_cpu(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: native, raising=False)
    cpu = torch.device("cpu")
    assert precision.resolve_precision("auto", cpu) is native
    assert precision.resolve_precision("auto", cpu, runtime="onnx") is False
    assert precision.resolve_precision("float32", cpu) is False and precision.resolve_precision("mixed", cpu) is True
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.resolve_precision("half", cpu)
