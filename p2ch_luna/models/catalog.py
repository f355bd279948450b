"""Checkpoints found by what they hold, not by their file name: a folder's catalogue, the newest of each task.

Every regular, non-hidden file under the folder is read with ``torch.load(weights_only=True)``
(tensors memory-mapped where the format allows, so their data is not read) and identified by
:func:`~p2ch_luna.models.checkpoint.identify_checkpoint`. Files that are not checkpoints are
skipped with a debug line. The newest checkpoint of a task is one saved at its run's best epoch
(ours record it; the book's files are all taken as best), then the latest by the time the file
records, else by its modification time.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from p2ch_luna.errors import DataError
from p2ch_luna.models.checkpoint import (
    BEST_SUFFIX,
    PICKLED_OBJECTS,
    architecture_shapes,
    identify_checkpoint,
    read_checkpoint_dict,
    samples_seen_of,
    state_shapes,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CheckpointSummary:
    """What one checkpoint file says about itself (``None``: not recorded)."""

    path: Path
    task: str
    model_name: str
    is_book: bool
    epoch: int | None
    samples_seen: int | None
    saved_at: datetime.datetime | None
    modified_at: float
    is_best: bool
    """Saved at its run's best validation epoch (ours: ``epoch == best_epoch``; the book's: always)."""
    score_name: str | None
    best_score: float | None
    best_epoch: int | None
    data_root: str | None
    series_count: int | None
    val_stride: int | None

    def newness(self) -> tuple[Any, ...]:
        """Sort key: best before not-best, then the recorded time (else the file's), then the file's."""
        recorded = self.saved_at.timestamp() if self.saved_at is not None else self.modified_at
        return self.is_best, recorded, self.modified_at, self.path.name.endswith(BEST_SUFFIX), str(self.path)


def summarise_checkpoint(path: Path) -> CheckpointSummary:
    """Read and identify one file; a :class:`DataError` when it is not a checkpoint this code can rebuild."""
    raw = read_checkpoint_dict(path, mmap=True)
    kind = identify_checkpoint(raw, str(path))
    try:
        fits = state_shapes(raw["model_state"]) == architecture_shapes(kind.model_name, kind.model_kwargs)
    except (ValueError, TypeError) as error:
        raise DataError(f"{path} describes a model that cannot be built: {error}") from error
    if not fits:
        raise DataError(f"{path} does not fit model {kind.model_name!r} (state-dict keys or shapes differ)")
    config = raw.get("config") if isinstance(raw.get("config"), Mapping) else {}
    paths = config.get("paths") if isinstance(config.get("paths"), Mapping) else {}
    best_epoch = raw.get("best_epoch")
    return CheckpointSummary(
        path=path,
        task=kind.task,
        model_name=kind.model_name,
        is_book=kind.is_book,
        epoch=raw.get("epoch"),
        samples_seen=samples_seen_of(raw),
        saved_at=_recorded_time(raw.get("time")),
        modified_at=path.stat().st_mtime,
        is_best=kind.is_book or best_epoch is None or best_epoch == raw.get("epoch"),
        score_name=raw.get("score_name"),
        best_score=raw.get("best_score"),
        best_epoch=best_epoch,
        data_root=paths.get("data_root"),
        series_count=_series_count(raw),
        val_stride=config.get("val_stride"),
    )


def find_checkpoints(folder: str | os.PathLike) -> list[CheckpointSummary]:
    """Every checkpoint under ``folder`` (recursively), by path; other files are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue  # hidden files include the temporary files of writes under way
        try:
            found.append(summarise_checkpoint(path))
        except DataError as error:
            # A file that is a checkpoint but cannot be used deserves a warning; any other file a debug line.
            looks_like_one = any(text in str(error) for text in (PICKLED_OBJECTS, "does not fit", "format version"))
            log.log(logging.WARNING if looks_like_one else logging.DEBUG, "skipping %s", error)
    return found


def newest_checkpoints(folder: str | os.PathLike) -> dict[str, CheckpointSummary]:
    """The newest checkpoint of each task found under ``folder`` (see the module's docstring)."""
    newest: dict[str, CheckpointSummary] = {}
    for summary in find_checkpoints(folder):
        current = newest.get(summary.task)
        if current is None or summary.newness() > current.newness():
            newest[summary.task] = summary
    return newest


def find_latest_checkpoint(folder: str | os.PathLike, task: str) -> Path | None:
    """The newest ``task`` checkpoint under ``folder``, whatever it is called, or None."""
    found = newest_checkpoints(folder).get(task)
    return None if found is None else found.path


def _recorded_time(value: Any) -> datetime.datetime | None:
    """Ours record an ISO time with its zone; the book's a local time without one (read as this machine's)."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.astimezone()


def _series_count(raw: Mapping[str, Any]) -> int | None:
    """How many series the run trained and validated on, where the checkpoint records its split
    (``series_split``, :mod:`p2ch_luna.data.series_split`)."""
    split = raw.get("series_split")
    if not isinstance(split, Mapping):
        return None
    lists = [split.get(key) for key in ("train_series", "validation_series")]
    return sum(len(uids) for uids in lists) if all(isinstance(uids, list) for uids in lists) else None
