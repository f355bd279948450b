"""The models a diagnosis runs: segmentation, nodule and (optional) malignancy checkpoints."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from p2ch_luna.errors import DataError
from p2ch_luna.models.catalog import CheckpointSummary, newest_checkpoints
from p2ch_luna.models.checkpoint import LoadedCheckpoint, load_checkpoint
from p2ch_luna.models.classifier import select_kernels
from p2ch_luna.models.layout import channels_last
from p2ch_luna.paths import Paths

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DiagnosisModels:
    """The loaded models; ``malignancy`` is optional."""

    segmentation: LoadedCheckpoint
    nodule: LoadedCheckpoint
    malignancy: LoadedCheckpoint | None = None

    def place(self, device: torch.device) -> DiagnosisModels:
        """Every model on ``device``, in eval mode and channels-last (faster on the CPU: ``python -m bench.bench_diagnose``); returns self."""
        for loaded in (self.segmentation, self.nodule, self.malignancy):
            if loaded is not None:
                channels_last(loaded.model.to(device).eval())
        return self

    def select_kernels(self, kernels: str) -> DiagnosisModels:
        """The classifiers' convolutions by ``kernels`` (``--kernels``: torch or triton); returns self."""
        for loaded in (self.nodule, self.malignancy):
            if loaded is not None:
                select_kernels(loaded.model, kernels)
        return self

    def describe(self) -> dict[str, Any]:
        """JSON-ready description of each model (file, task, architecture, book or ours, the calibration
        temperature and bias of its logit margin: 1 and 0 for uncalibrated files)."""
        described: dict[str, Any] = {}
        for name in ("segmentation", "nodule", "malignancy"):
            loaded = getattr(self, name)
            described[name] = None if loaded is None else {
                "path": str(loaded.path), "task": loaded.task, "model_name": loaded.model_name,
                "is_book": loaded.is_book, "epoch": loaded.epoch, "samples_seen": loaded.samples_seen,
                "temperature": loaded.temperature, "calibration_bias": loaded.bias,
            }
        return described



RUNTIMES = ("torch", "onnx")
"""``--runtime``: the checkpoints in PyTorch, or their ONNX exports in onnxruntime (CPU)."""


def load_models(paths: Paths, segmentation_path: Path | None, classification_path: Path | None,
                malignancy_path: Path | None, device: torch.device, runtime: str = "torch") -> DiagnosisModels:
    """Load the three models: given files, else the newest checkpoint of each task in the models folder,
    recognised by its contents whatever the file is called (:mod:`p2ch_luna.models.catalog`).

    With ``runtime`` onnx each is run from its ONNX export under ``--cache-dir``/onnx, exported and checked
    against PyTorch the first time (:func:`p2ch_luna.export.files.cached_onnx`)."""
    found: dict[str, CheckpointSummary] | None = None

    def resolve(path: Path | None, task: str, flag: str, required: bool) -> Path | None:
        nonlocal found
        if path is not None:
            return path
        if found is None:  # one look at the folder for all three tasks
            found = newest_checkpoints(paths.models_dir)
        if task not in found:
            if required:
                where = "" if paths.models_dir.is_dir() else " (no such folder)"
                raise DataError(f"no {task} checkpoint among the files under {paths.models_dir}{where}; "
                                f"pass {flag} FILE or --models-dir DIR")
            return None
        chosen = found[task]
        log.info("using %s as the %s model (the newest %s checkpoint under %s: %s%s, epoch %s)", chosen.path,
                 task, task, paths.models_dir, chosen.model_name, ", the book's" if chosen.is_book else "",
                 chosen.epoch)
        return chosen.path

    segmentation_file = resolve(segmentation_path, "segmentation", "--segmentation-path", True)
    nodule_file = resolve(classification_path, "nodule", "--classification-path", True)
    malignancy_file = resolve(malignancy_path, "malignancy", "--malignancy-path", False)

    def load(path: Path, task: str) -> LoadedCheckpoint:
        if runtime == "torch":
            return load_checkpoint(path, task, map_location=device)
        from p2ch_luna.export.files import cached_onnx
        from p2ch_luna.export.runtime import OnnxModel

        exported = cached_onnx(path, task, paths.cache_dir)  # the checkpoint's split and calibration are kept
        return dataclasses.replace(load_checkpoint(path, task), path=exported, model=OnnxModel(exported))

    models = DiagnosisModels(
        segmentation=load(segmentation_file, "segmentation"),
        nodule=load(nodule_file, "nodule"),
        malignancy=None if malignancy_file is None else load(malignancy_file, "malignancy"),
    )
    if models.malignancy is None:
        log.info("no malignancy model: malignancy is not estimated")
    return models.place(device)
