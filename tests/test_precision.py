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
