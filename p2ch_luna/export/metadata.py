"""What an exported model carries besides its graph: task, architecture, calibration and input geometry.

Diagnosis needs the classifiers' calibration (temperature and bias of the logit margin), a classifier's chunk
shape and a segmenter's slice context and pooling grid; an exported file holds them itself (ONNX
``metadata_props``, a TorchScript archive's extra file), as one JSON object under :data:`METADATA_KEY`, so the
file alone is enough to run it.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from p2ch_luna import __version__
from p2ch_luna.models.checkpoint import LoadedCheckpoint

METADATA_KEY = "p2ch_luna"
"""The ONNX metadata key (and TorchScript extra file name, with ``.json``) holding the JSON metadata."""
METADATA_FORMAT_VERSION = 1


def model_metadata(loaded: LoadedCheckpoint, source_sha256: str, export_format: str) -> dict[str, Any]:
    """JSON-ready description of ``loaded`` for an exported file of it."""
    model = loaded.model
    metadata: dict[str, Any] = {
        "format_version": METADATA_FORMAT_VERSION,
        "export_format": export_format,
        "task": loaded.task,
        "model_name": loaded.model_name,
        "model_kwargs": loaded.model_kwargs,
        "is_book": loaded.is_book,
        "epoch": loaded.epoch,
        "samples_seen": loaded.samples_seen,
        "temperature": loaded.temperature,
        "bias": loaded.bias,
        "source": str(loaded.path),
        "source_sha256": source_sha256,
        "p2ch_luna_version": __version__,
        "torch_version": torch.__version__,
    }
    if hasattr(model, "input_shape"):
        metadata["input_shape"] = list(model.input_shape)
    if hasattr(model, "in_channels"):
        metadata["in_channels"] = int(model.in_channels)
    if hasattr(model, "pooling_grid"):
        metadata["pooling_grid"] = int(model.pooling_grid)
    return metadata


def metadata_text(metadata: dict[str, Any]) -> str:
    return json.dumps(metadata, sort_keys=True)
