"""Training tasks run by the shared engine: nodule, malignancy and segmentation.

Each task module is imported only when its task is chosen, so a missing or
heavy dependency of one task never slows or breaks the others.
"""

from __future__ import annotations

import importlib

from p2ch_luna.training.tasks.base import (
    Batch,
    ModelSpec,
    Outputs,
    RunContext,
    Task,
    build_loader,
    collate_batch,
    to_memory_format,
)

TASK_CLASSES: dict[str, str] = {
    "nodule": "p2ch_luna.training.tasks.classification:NoduleTask",
    "malignancy": "p2ch_luna.training.tasks.classification:MalignancyTask",
    "segmentation": "p2ch_luna.training.tasks.segmentation:SegmentationTask",
}
"""Task name -> ``module:class`` of its :class:`Task` subclass."""


def get_task_class(name: str) -> type[Task]:
    """The :class:`Task` subclass for ``name`` (imported lazily)."""
    try:
        module_name, class_name = TASK_CLASSES[name].split(":")
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASK_CLASSES)}") from None
    return getattr(importlib.import_module(module_name), class_name)


__all__ = ["TASK_CLASSES", "Batch", "ModelSpec", "Outputs", "RunContext", "Task", "build_loader", "collate_batch",
           "get_task_class", "to_memory_format"]
