"""Export a loaded checkpoint's model to ONNX or TorchScript, with a dynamic batch size.

ONNX goes through ``torch.onnx.export(dynamo=True)`` (torch.export, then onnxscript's translation): the
TorchScript-based exporter (``dynamo=False``) gave the same outputs here but is deprecated in torch 2.13,
and the dynamo one states the dynamic axes as ``torch.export.Dim`` checked at export time. The
segmenter's height and width are dynamic too, as diagnosis crops each batch of slices to the lungs.
TorchScript is ``torch.jit.trace``: the models' forward passes branch only on the device and on
training mode, which tracing in eval mode on the CPU fixes, and the traced U-Net's padding follows its
input's size (checked by the tests at other sizes).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from p2ch_luna.errors import DataError
from p2ch_luna.export.metadata import METADATA_KEY, metadata_text

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
INPUT_NAME = "x"
OUTPUT_NAME = "logits"
EXAMPLE_BATCH = 2
"""Batch of the example input: torch.export specialises a dimension it sees as 1."""
EXAMPLE_SLICE_SHAPE = (64, 80)
"""Height and width of the segmenter's example input (its real ones vary with each CT's lungs)."""
MAX_SLICE_SIZE = 4096
QUIET_LOGGERS = ("torch.onnx", "torch.export", "onnx_ir", "onnxscript")


def example_input(model: torch.nn.Module, task: str, batch: int = EXAMPLE_BATCH,
                  slice_shape: tuple[int, int] = EXAMPLE_SLICE_SHAPE, seed: int = 0) -> torch.Tensor:
    """A seeded float32 input in the HU range the models see: chunks (B, C, I, R, C) for a classifier,
    stacks of slices (B, 2k+1, H, W) for the segmenter."""
    generator = torch.Generator().manual_seed(seed)
    if task == "segmentation":
        shape: tuple[int, ...] = (batch, int(model.in_channels), *slice_shape)
    else:
        shape = (batch, int(model.tail_batchnorm.num_features), *model.input_shape)
    return torch.rand(shape, generator=generator) * 2000.0 - 1000.0


def export_onnx(model: torch.nn.Module, task: str, path: Path, metadata: dict[str, Any]) -> None:
    """Write ``model`` (eval mode, CPU) as ONNX to ``path`` with ``metadata`` in its metadata_props."""
    batch = torch.export.Dim("batch", min=1)
    dims: dict[int, Any] = {0: batch}
    if task == "segmentation":
        dims.update({2: torch.export.Dim("height", min=1, max=MAX_SLICE_SIZE),
                     3: torch.export.Dim("width", min=1, max=MAX_SLICE_SIZE)})
    with _quiet_exporter():
        try:
            program = torch.onnx.export(model, (example_input(model, task),), dynamo=True, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], dynamic_shapes={"x": dims}, verbose=False)
        except Exception as error:  # torch.export raises many types; the first line says what failed
            raise DataError(f"the {task} model could not be exported to ONNX: {type(error).__name__}: "
                            f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}") from error
    program.model.metadata_props[METADATA_KEY] = metadata_text(metadata)
    program.save(str(path))


def export_torchscript(model: torch.nn.Module, task: str, path: Path, metadata: dict[str, Any]) -> None:
    """Write ``model`` (eval mode, CPU) traced as TorchScript to ``path``, ``metadata`` as its extra file."""
    with _quiet_exporter(), torch.no_grad():
        traced = torch.jit.trace(model, example_input(model, task))
    torch.jit.save(traced, str(path), _extra_files={f"{METADATA_KEY}.json": metadata_text(metadata)})


@contextlib.contextmanager
def _quiet_exporter():  # noqa: ANN202
    """The exporters' deprecation notes and torch.export's progress lines kept out of the command's output."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
