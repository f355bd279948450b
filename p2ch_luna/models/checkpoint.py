"""Self-describing checkpoints shared by every task, and loading of the book's files.

A checkpoint is a dict saved with ``torch.save`` holding the weights, the model's
registry name and constructor arguments, optimizer state, progress counters,
config, metrics and code version, so inference rebuilds the model with no
architecture literals. A classifier's checkpoint may also hold its calibration
(``calibration``: the temperature and bias of its logit margin, :mod:`p2ch_luna.training.calibrate`);
files without one, the book's among them, load with temperature 1 and bias 0. Loading always uses ``torch.load(weights_only=True)``:
files that need arbitrary pickled objects are refused, never executed.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import io
import logging
import math
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from p2ch_luna import __version__
from p2ch_luna.errors import DataError
from p2ch_luna.io.atomic import atomic_write_bytes
from p2ch_luna.models.registry import build_model

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "p2ch_luna-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
TASKS = ("nodule", "malignancy", "segmentation")
BEST_SUFFIX = ".best.state"
LAST_SUFFIX = ".last.state"
PICKLED_OBJECTS = "it contains pickled objects (weights_only)"

BOOK_SEGMENTATION_KWARGS: dict[str, Any] = {
    "in_channels": 7,
    "n_classes": 1,
    "depth": 3,
    "wf": 4,
    "padding": True,
    "batch_norm": True,
    "up_mode": "upconv",
}
"""The architecture of the book's ``seg_*.state`` files (p2ch13 training.py)."""

BOOK_MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "LunaModel": ("nodule", "luna", {}),
    "UNetWrapper": ("segmentation", "unet", BOOK_SEGMENTATION_KWARGS),
}
"""Book ``model_name`` -> (task, our registry name, constructor arguments)."""
CALIBRATION_FIELD = "calibration"
"""Checkpoint field of a classifier's calibration: ``{"temperature": T, "bias": b, "method": ..., ...}``."""
IDENTITY_FIELDS = ("format", "format_version", "model_state", "model_name", "model_kwargs", "task")
"""Fields :func:`update_checkpoint` never replaces: what the file is and which model it holds."""


@dataclasses.dataclass
class LoadedCheckpoint:
    """A loaded checkpoint: the rebuilt model (in eval mode) and what the file says about it."""

    path: Path
    model: nn.Module
    task: str
    model_name: str
    model_kwargs: dict[str, Any]
    epoch: int | None
    samples_seen: int | None
    optimizer_name: str | None
    optimizer_state: dict[str, Any] | None
    config: dict[str, Any]
    metrics: dict[str, Any]
    is_book: bool
    raw: dict[str, Any]
    temperature: float = 1.0
    """What the logit margin is divided by: the stored calibration, 1 without one."""
    bias: float = 0.0
    """What is added to the divided margin (Platt scaling): the stored calibration, 0 without one."""


def checkpoint_path(models_dir: str | os.PathLike, task: str, timestamp: str, comment: str, best: bool) -> Path:
    """``{models_dir}/{task}_{timestamp}_{comment}.best.state`` (or ``.last.state``)."""
    _check_task(task)
    suffix = BEST_SUFFIX if best else LAST_SUFFIX
    return Path(models_dir) / f"{task}_{timestamp}_{comment}{suffix}"


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    model_name: str,
    model_kwargs: Mapping[str, Any],
    task: str,
    optimizer: torch.optim.Optimizer | None = None,
    epoch: int,
    samples_seen: int,
    config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically; a reader never sees half a file.

    ``config``, ``metrics`` and ``extra`` may hold only plain values (numbers,
    strings, lists, dicts, tensors); paths and NumPy scalars are converted.
    """
    _check_task(task)
    state = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "model_state": {key: value.detach().cpu() for key, value in model.state_dict().items()},
        "model_name": model_name,
        "model_kwargs": _plain(dict(model_kwargs)),
        "task": task,
        "optimizer_state": optimizer.state_dict() if optimizer is not None else None,
        "optimizer_name": type(optimizer).__name__ if optimizer is not None else None,
        "epoch": int(epoch),
        "samples_seen": int(samples_seen),
        "totalTrainingSamples_count": int(samples_seen),
        "config": _plain(dict(config)),
        "metrics": _plain(dict(metrics)),
        "code_version": code_version(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if extra:
        clashes = sorted(set(extra) & set(state))
        if clashes:
            raise ValueError(f"extra checkpoint fields would overwrite {clashes}")
        state.update(_plain(dict(extra)))
    path = Path(path)
    _write_state(path, state)
    log.info("saved %s checkpoint %s (epoch %d, %d samples)", task, path, epoch, samples_seen)
    return path


@dataclasses.dataclass(frozen=True)
class CheckpointKind:
    """What a checkpoint holds, read from its contents: the task and the model that rebuilds it."""

    task: str
    model_name: str
    model_kwargs: dict[str, Any]
    is_book: bool


def update_checkpoint(path: str | os.PathLike, fields: Mapping[str, Any]) -> Path:
    """Rewrite one of our checkpoints atomically with ``fields`` added or replaced, all else kept as it is
    (weights, optimizer state, counters). ``fields`` hold plain values, as ``save_checkpoint``'s ``extra``."""
    path = Path(path)
    raw = _torch_load(path, "cpu", False, str(path))
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path} is not a p2ch_luna checkpoint, so it is not rewritten")
    clashes = sorted(set(fields) & set(IDENTITY_FIELDS))
    if clashes:
        raise ValueError(f"update_checkpoint does not replace {clashes}")
    raw.update(_plain(dict(fields)))
    _write_state(path, raw)
    return path


def load_checkpoint(
    path: str | os.PathLike,
    expected_task: str | tuple[str, ...] | None = None,
    map_location: str | torch.device = "cpu",
    label: str | None = None,
) -> LoadedCheckpoint:
    """Load one of our checkpoints or one of the book's, rebuilding its model.

    ``expected_task`` (one task or a tuple of accepted ones) guards against
    passing, say, a segmentation file where a classifier is wanted. Every
    failure is a one-line :class:`DataError` naming the file (or ``label``).
    """
    path = Path(path)
    name = label or str(path)
    raw = read_checkpoint_dict(path, map_location, label=name)
    kind = identify_checkpoint(raw, name)
    accepted = (expected_task,) if isinstance(expected_task, str) else expected_task
    if accepted is not None and kind.task not in accepted:
        raise DataError(f"{name} is a {kind.task} checkpoint, expected {' or '.join(accepted)}")
    model = _build_and_load(name, kind.model_name, dict(kind.model_kwargs), raw["model_state"])
    temperature, bias = _stored_calibration(name, raw)
    return LoadedCheckpoint(
        path=path,
        model=model.to(map_location).eval(),
        task=kind.task,
        model_name=kind.model_name,
        model_kwargs=dict(kind.model_kwargs),
        epoch=raw.get("epoch"),
        samples_seen=samples_seen_of(raw),
        optimizer_name=raw.get("optimizer_name"),
        optimizer_state=raw.get("optimizer_state"),
        config=dict(raw.get("config") or {}),
        metrics=dict(raw.get("metrics") or {}),
        is_book=kind.is_book,
        raw=raw,
        temperature=temperature,
        bias=bias,
    )


def read_checkpoint_dict(path: Path, map_location: str | torch.device = "cpu", *, mmap: bool = False,
                         label: str | None = None) -> dict[str, Any]:
    """The dict a checkpoint file holds (``torch.load(weights_only=True)``), or a one-line :class:`DataError`.

    ``mmap`` maps the tensors of a zip-format file instead of reading them (a catalogue reads only the
    fields); the book's files are in torch's older format, which is always read whole.
    """
    name = label or str(path)
    raw = _torch_load(path, map_location, mmap and zipfile.is_zipfile(path), name)
    if not isinstance(raw, dict) or not isinstance(raw.get("model_state"), Mapping):
        raise DataError(f"{name} is not a p2ch_luna or book checkpoint")
    return raw


def identify_checkpoint(raw: Mapping[str, Any], label: str) -> CheckpointKind:
    """The task and model of a checkpoint dict, from what it holds, never from its file name.

    Ours carry ``task``, ``model_name`` and ``model_kwargs``. The book's carry ``model_name``
    (``LunaModel``, ``UNetWrapper``) or, without it, are recognised by their state dict's keys and
    shapes (:data:`BOOK_MODELS`). The book's nodule and malignancy classifiers are the same
    ``LunaModel`` and their files record nothing else (no command line, no labels), so a book
    ``LunaModel`` file is a nodule classifier; a malignancy one must be passed by path.
    """
    if raw.get("format") == CHECKPOINT_FORMAT:
        if raw.get("format_version") != CHECKPOINT_FORMAT_VERSION:
            raise DataError(f"{label} has checkpoint format version {raw.get('format_version')!r}, "
                            f"this code reads version {CHECKPOINT_FORMAT_VERSION}")
        if raw.get("task") not in TASKS:
            raise DataError(f"{label} names an unknown task {raw.get('task')!r}")
        return CheckpointKind(raw["task"], raw.get("model_name"), dict(raw.get("model_kwargs") or {}), False)
    book_name = raw.get("model_name")
    if book_name is None:
        book_name = _book_model_with_shapes(state_shapes(raw["model_state"]))
    if book_name not in BOOK_MODELS:
        raise DataError(f"{label} is not a p2ch_luna or book checkpoint (model_name {raw.get('model_name')!r})")
    task, model_name, model_kwargs = BOOK_MODELS[book_name]
    return CheckpointKind(task, model_name, dict(model_kwargs), True)


def state_shapes(model_state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Each state-dict entry's shape (reading shapes does not read a mapped tensor's data)."""
    return {key: tuple(value.shape) for key, value in model_state.items() if isinstance(value, torch.Tensor)}


def architecture_shapes(model_name: str, model_kwargs: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of the registered model, built on the meta device (no memory, milliseconds)."""
    with torch.device("meta"):
        model = build_model(model_name, **model_kwargs)
    return state_shapes(model.state_dict())


def samples_seen_of(raw: Mapping[str, Any]) -> int | None:
    """Training samples seen: ours record ``samples_seen``, the book's ``totalTrainingSamples_count``."""
    return raw.get("samples_seen", raw.get("totalTrainingSamples_count"))


@functools.cache
def _book_shapes(book_name: str) -> dict[str, tuple[int, ...]]:
    _, model_name, model_kwargs = BOOK_MODELS[book_name]
    return architecture_shapes(model_name, model_kwargs)


def _book_model_with_shapes(shapes: dict[str, tuple[int, ...]]) -> str | None:
    return next((name for name in BOOK_MODELS if _book_shapes(name) == shapes), None)


def code_version() -> str:
    """``p2ch_luna.__version__``, plus the git commit when the package sits in a checkout."""
    commit = _git_commit(Path(__file__).resolve().parents[2] / ".git")
    return f"{__version__}+g{commit[:12]}" if commit else __version__


def _torch_load(path: Path, map_location: str | torch.device, mmap: bool, label: str) -> Any:
    if not path.is_file():
        raise DataError(f"checkpoint {label} does not exist or is not a file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        if "unsupported global" in str(error).lower():
            raise DataError(f"{label} was refused: {PICKLED_OBJECTS}") from error
        raise DataError(f"{label} is not a p2ch_luna or book checkpoint") from error
    except Exception as error:  # torch.load raises many types on foreign files (KeyError, EOFError, ...)
        reason = f"{type(error).__name__}: {_first_line(error)}"
        raise DataError(f"{label} is not a p2ch_luna or book checkpoint ({reason})") from error


def _write_state(path: Path, state: Mapping[str, Any]) -> None:
    # Serialise in memory first: torch.save reports a failed write (disk full, file-size
    # limit) as a RuntimeError, a plain write gives the OSError atomic writes turn into LunaError.
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _stored_calibration(path: str, raw: Mapping[str, Any]) -> tuple[float, float]:
    """The calibration temperature and bias ``raw`` holds; (1.0, 0.0) when it holds none (bias 0 when a
    temperature-only calibration holds no bias)."""
    calibration = raw.get(CALIBRATION_FIELD)
    if calibration is None:
        return 1.0, 0.0
    temperature = calibration.get("temperature") if isinstance(calibration, Mapping) else None
    if not _is_number(temperature) or temperature <= 0:
        raise DataError(f"{path} has calibration temperature {temperature!r}, expected a positive number")
    bias = calibration.get("bias", 0.0)
    if not _is_number(bias):
        raise DataError(f"{path} has calibration bias {bias!r}, expected a finite number")
    return float(temperature), float(bias)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _build_and_load(path: str, model_name: Any, model_kwargs: dict[str, Any], model_state: Mapping) -> nn.Module:
    try:
        model = build_model(model_name, **model_kwargs)
    except (ValueError, TypeError) as error:
        raise DataError(f"{path} describes a model that cannot be built: {_first_line(error)}") from error
    try:
        model.load_state_dict(model_state, strict=True)
    except RuntimeError as error:
        raise DataError(f"{path} does not fit model {model_name!r}: {_first_line(error, 200)}") from error
    return model


def _plain(value: Any) -> Any:
    """``value`` with paths as strings and NumPy scalars as Python numbers, so weights_only can load it."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool, torch.Tensor)):
        return value
    raise TypeError(f"checkpoint fields must be plain values, not {type(value).__name__}: {value!r}")


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")


def _git_commit(git_dir: Path) -> str | None:
    """The commit HEAD points at, read from the files (no subprocess); None if unknown."""
    try:
        head = (git_dir / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head.removeprefix("ref: ")
        ref_file = git_dir / ref
        if ref_file.is_file():
            return ref_file.read_text().strip()
        packed = git_dir / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0]
    except OSError:
        pass
    return None


def _first_line(error: BaseException, limit: int = 120) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
