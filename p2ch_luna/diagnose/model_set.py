"""The models a diagnosis runs: segmentation, nodule and (optional) malignancy checkpoints."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from p2ch_luna.errors import DataError
from p2ch_luna.models.checkpoint import LoadedCheckpoint, find_latest_checkpoint, load_checkpoint
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
        """JSON-ready description of each model (file, task, architecture, book or ours)."""
        described: dict[str, Any] = {}
        for name in ("segmentation", "nodule", "malignancy"):
            loaded = getattr(self, name)
            described[name] = None if loaded is None else {
                "path": str(loaded.path), "task": loaded.task, "model_name": loaded.model_name,
                "is_book": loaded.is_book, "epoch": loaded.epoch, "samples_seen": loaded.samples_seen,
            }
        return described



def load_models(paths: Paths, segmentation_path: Path | None, classification_path: Path | None,
                malignancy_path: Path | None, device: torch.device) -> DiagnosisModels:
    """Load the three models: given files, else the newest best checkpoint of each task."""

    def resolve(path: Path | None, task: str, flag: str, required: bool) -> Path | None:
        if path is not None:
            return path
        found = find_latest_checkpoint(paths.models_dir, task)
        if found is None and required:
            raise DataError(f"no {task} checkpoint ({task}_*.best.state) under {paths.models_dir}; "
                            f"pass {flag} FILE or --models-dir DIR")
        if found is not None:
            log.info("using the newest %s checkpoint %s", task, found)
        return found

    segmentation_file = resolve(segmentation_path, "segmentation", "--segmentation-path", True)
    nodule_file = resolve(classification_path, "nodule", "--classification-path", True)
    malignancy_file = resolve(malignancy_path, "malignancy", "--malignancy-path", False)
    models = DiagnosisModels(
        segmentation=load_checkpoint(segmentation_file, "segmentation", map_location=device),
        nodule=load_checkpoint(nodule_file, "nodule", map_location=device),
        malignancy=None if malignancy_file is None else load_checkpoint(malignancy_file, "malignancy",
                                                                          map_location=device),
    )
    if models.malignancy is None:
        log.info("no malignancy model: malignancy is not estimated")
    return models.place(device)
