"""A checkpoint file to an exported file, written atomically and checked before it is moved into place; and the
cache of ONNX exports that ``diagnose --runtime onnx`` runs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from p2ch_luna.errors import DataError
from p2ch_luna.export.exporters import FORMATS, export_onnx, export_torchscript
from p2ch_luna.export.metadata import METADATA_FORMAT_VERSION, model_metadata
from p2ch_luna.export.runtime import OnnxModel
from p2ch_luna.export.verify import PROBABILITY_TOLERANCE, Agreement, compare
from p2ch_luna.io.atomic import atomic_path
from p2ch_luna.io.digest import file_digest
from p2ch_luna.models.checkpoint import LoadedCheckpoint, load_checkpoint

log = logging.getLogger(__name__)

ONNX_CACHE_FOLDER = "onnx"
"""Folder under ``--cache-dir`` holding the ONNX exports diagnosis runs."""


def export_checkpoint(checkpoint: Path, export_format: str, output: Path, expected_task: str | None = None,
                      verify: bool = True) -> Agreement | None:
    """Export ``checkpoint`` (ours or the book's) to ``output`` in ``export_format``.

    With ``verify`` the written file is loaded back (onnxruntime, or ``torch.jit.load``) and compared with
    the PyTorch model on fixed inputs (:mod:`p2ch_luna.export.verify`) before it replaces ``output``; a
    model outside the tolerance is a DataError and leaves ``output`` as it was.
    """
    if export_format not in FORMATS:
        raise DataError(f"unknown export format {export_format!r}; known: {', '.join(FORMATS)}")
    loaded = load_checkpoint(checkpoint, expected_task)
    metadata = model_metadata(loaded, file_digest(checkpoint), export_format)
    exporter = export_onnx if export_format == "onnx" else export_torchscript
    agreement = None
    with atomic_path(output, suffix=output.suffix) as staged:
        exporter(loaded.model, loaded.task, staged, metadata)
        if verify:
            agreement = _verify(loaded, export_format, staged)
            if not agreement.within_tolerance:
                raise DataError(f"{output}: the exported {loaded.task} model differs from PyTorch by "
                                f"{agreement.max_probability_difference:.2g} in probability "
                                f"(tolerance {PROBABILITY_TOLERANCE:g}); nothing written")
    log.info("exported %s (%s) as %s to %s", checkpoint, loaded.task, export_format, output)
    return agreement


def _verify(loaded: LoadedCheckpoint, export_format: str, path: Path) -> Agreement:
    if export_format == "onnx":
        exported = OnnxModel(path)
    else:
        exported = torch.jit.load(str(path), map_location="cpu")
    return compare(loaded.model, exported, loaded.task, loaded.temperature, loaded.bias)


def cached_onnx(checkpoint: Path, task: str, cache_dir: Path) -> Path:
    """The ONNX export of ``checkpoint`` under ``cache_dir/onnx``, exported (and verified) when missing.

    The file name holds the checkpoint's SHA-256, torch's version and the metadata version, so a changed
    checkpoint or exporter gets a new export, never a stale one.
    """
    key = f"{file_digest(checkpoint)[:24]}-torch{torch.__version__.replace('+', '_')}-m{METADATA_FORMAT_VERSION}"
    path = Path(cache_dir) / ONNX_CACHE_FOLDER / f"{task}-{key}.onnx"
    if path.is_file():
        log.info("%s model: the ONNX export %s", task, path)
        return path
    os.makedirs(path.parent, exist_ok=True)
    agreement = export_checkpoint(checkpoint, "onnx", path, expected_task=task)
    log.info("%s model: exported %s to %s (max probability difference %.2g)", task, checkpoint, path,
             agreement.max_probability_difference if agreement else float("nan"))
    return path
