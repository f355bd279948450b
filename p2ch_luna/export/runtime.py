"""An exported ONNX model run by onnxruntime on the CPU, called like the torch model it came from.

:class:`OnnxModel` is an ``nn.Module`` without parameters whose forward takes a float32 tensor and returns the
logits as a tensor, with the attributes diagnosis reads of a torch model (a classifier's ``input_shape``, a
segmenter's ``in_channels`` and ``pooling_grid``) from the file's metadata, so the diagnosis steps run it
unchanged (``diagnose --runtime onnx``). onnxruntime is imported only here (the ``[onnx]`` extra).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from p2ch_luna.errors import DataError, UsageError
from p2ch_luna.export.metadata import METADATA_KEY
from p2ch_luna.models.checkpoint import LoadedCheckpoint

ONNX_EXTRA = "onnx"
"""The package extra that installs onnx, onnxruntime and onnxscript."""


def import_onnxruntime() -> Any:
    """The onnxruntime module, or a one-line UsageError saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise UsageError(f"ONNX needs onnxruntime (pip install '.[{ONNX_EXTRA}]')") from None
    return onnxruntime


class OnnxModel(nn.Module):
    """An ONNX file run by onnxruntime's CPU provider with as many threads as torch uses."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        super().__init__()
        onnxruntime = import_onnxruntime()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
            raise DataError(f"{path} is not an ONNX model onnxruntime can run ({type(error).__name__})") from error
        self.path = path
        self.metadata = read_metadata(self.session, path)
        self.input_name = self.session.get_inputs()[0].name
        if "input_shape" in self.metadata:
            self.input_shape = tuple(self.metadata["input_shape"])
        if "in_channels" in self.metadata:
            self.in_channels = int(self.metadata["in_channels"])
        if "pooling_grid" in self.metadata:
            self.pooling_grid = int(self.metadata["pooling_grid"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        (logits,) = self.session.run(None, {self.input_name: array})
        return torch.from_numpy(logits)


def read_metadata(session: Any, path: Path) -> dict[str, Any]:
    """The p2ch_luna metadata of a loaded session's model, or a one-line DataError."""
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if text is None:
        raise DataError(f"{path} is an ONNX model without p2ch_luna metadata (export it with python -m "
                        "p2ch_luna.export)")
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path} has unreadable p2ch_luna metadata: {error}") from error
    return metadata


def load_onnx_checkpoint(path: Path, expected_task: str | None = None, threads: int | None = None,
                         ) -> LoadedCheckpoint:
    """An exported ONNX file as a :class:`LoadedCheckpoint` whose model runs in onnxruntime, with the
    task, calibration and counters its metadata holds."""
    model = OnnxModel(path, threads)
    metadata = model.metadata
    task = metadata.get("task")
    if expected_task is not None and task != expected_task:
        raise DataError(f"{path} is a {task} model, expected {expected_task}")
    return LoadedCheckpoint(
        path=path, model=model, task=task, model_name=metadata.get("model_name"),
        model_kwargs=dict(metadata.get("model_kwargs") or {}), epoch=metadata.get("epoch"),
        samples_seen=metadata.get("samples_seen"), optimizer_name=None, optimizer_state=None, config={},
        metrics={}, is_book=bool(metadata.get("is_book")), raw={},
        temperature=float(metadata.get("temperature", 1.0)), bias=float(metadata.get("bias", 0.0)))
