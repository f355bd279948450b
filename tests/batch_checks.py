"""A check shared by the loader tests: two dict batches hold the same keys, in order, and values."""

from __future__ import annotations

from typing import Any, Mapping

import torch


def assert_same_batch(got: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    assert list(got) == list(expected)
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
        else:
            assert got[key] == value, key
