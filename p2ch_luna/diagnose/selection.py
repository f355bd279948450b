"""Which series ``diagnose --validation`` diagnoses: the validation series of the nodule checkpoint's split.

The split comes from the nodule checkpoint (:mod:`p2ch_luna.data.series_split`), because the nodule
classifier decides what is a finding. Series on disk that the checkpoint never saw (neither training
nor validation) are left out with a warning naming them; a series named with ``--series-uid`` that the
checkpoint trained on is refused. A checkpoint that records no split (the book's, or one written
before splits were recorded) falls back to the book's rule over the series on disk now, with the
stride from its config when it has one, and a warning that says so. The segmentation and malignancy
checkpoints may have been trained on other splits: a warning names the chosen series they trained on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from p2ch_luna.data.luna import VALIDATION_STRIDE, split_by_series
from p2ch_luna.data.series_split import TRAINING, VALIDATION, SeriesSplit, recorded_split
from p2ch_luna.errors import DataError
from p2ch_luna.models.checkpoint import LoadedCheckpoint

log = logging.getLogger(__name__)

NAMED_SERIES = 3
"""How many series a warning or error names before it gives the count of the rest."""


def name_series(series_uids: Sequence[str], limit: int = NAMED_SERIES) -> str:
    """The first ``limit`` UIDs, then ``and N more``."""
    named = ", ".join(series_uids[:limit])
    rest = len(series_uids) - limit
    return f"{named} and {rest} more" if rest > 0 else named


def checkpoint_split(checkpoint: LoadedCheckpoint, on_disk_uids: Iterable[str]) -> tuple[SeriesSplit, bool]:
    """The split ``checkpoint`` records and True; else the book's rule over ``on_disk_uids`` and False.

    The fallback takes ``val_stride`` from the checkpoint's config (our checkpoints), else the book's
    :data:`~p2ch_luna.data.luna.VALIDATION_STRIDE`.
    """
    split = recorded_split(checkpoint.raw, checkpoint.path)
    if split is not None:
        return split, True
    stride = checkpoint.config.get("val_stride")
    stride = stride if isinstance(stride, int) and stride >= 2 else VALIDATION_STRIDE
    train, validation = split_by_series(on_disk_uids, stride)
    return SeriesSplit.from_uids(train, validation, stride), False


def select_validation(candidates: Sequence[tuple[str, Path]], on_disk_uids: Iterable[str], split: SeriesSplit,
                      recorded: bool, source: str, *, include_train: bool = False,
                      requested: bool = False) -> list[tuple[str, Path]]:
    """The ``(series_uid, path)`` of ``candidates`` to diagnose as validation under ``split``.

    ``candidates`` are every series on disk or, with ``requested``, the series named on the command
    line: each of those must be a validation series of ``split`` (a training series, or one the split
    does not hold, is a one-line :class:`DataError`). With ``include_train`` every candidate is kept.
    ``source`` names the checkpoint in messages; ``recorded`` says whether ``split`` is its recorded
    one or the fallback rule.
    """
    how = (f"the split recorded in nodule checkpoint {source}" if recorded else
           f"every {split.val_stride}-th series on disk sorted by UID (nodule checkpoint {source} records no split)")
    if not recorded:
        log.warning("nodule checkpoint %s records no split (the book's, or written before checkpoints recorded "
                    "one): validation is every %d-th series on disk sorted by UID, which matches its training "
                    "only if the folder holds the series it was trained on", source, split.val_stride)
    if requested:
        return _requested_validation(candidates, split, how)
    roles = {uid: split.role(uid) for uid, _ in candidates}
    trained = [uid for uid, role in roles.items() if role == TRAINING]
    if include_train:
        log.info("--include-train: all %d series on disk, %d of them training series under %s: their scores "
                 "are not held out", len(candidates), len(trained), how)
        return list(candidates)
    unseen = sorted(uid for uid, role in roles.items() if role is None)
    if unseen:
        log.warning("%d series on disk were never seen by nodule checkpoint %s (neither training nor validation) "
                    "and are not diagnosed as validation: %s", len(unseen), source, name_series(unseen))
    chosen = [(uid, path) for uid, path in candidates if roles[uid] == VALIDATION]
    on_disk = set(on_disk_uids)
    absent = sum(uid not in on_disk for uid in split.validation_series)
    if not chosen:
        raise DataError(f"none of the {len(split.validation_series)} validation series of {how} is on disk")
    log.info("validation: %d series from %s (%s)%s", len(chosen), how, split.describe(),
             f"; {absent} of its validation series are not on disk" if absent else "")
    return chosen


def _requested_validation(candidates: Sequence[tuple[str, Path]], split: SeriesSplit,
                          how: str) -> list[tuple[str, Path]]:
    roles = {uid: split.role(uid) for uid, _ in candidates}
    trained = [uid for uid, role in roles.items() if role == TRAINING]
    if trained:
        raise DataError(f"{len(trained)} requested series were training series under {how}, not diagnosed as "
                        f"validation: {name_series(trained)} (without --validation they are diagnosed as named)")
    unseen = [uid for uid, role in roles.items() if role is None]
    if unseen:
        raise DataError(f"{len(unseen)} requested series are neither training nor validation series under {how}: "
                        f"{name_series(unseen)} (without --validation they are diagnosed as named)")
    log.info("validation: the %d requested series are validation series under %s", len(candidates), how)
    return list(candidates)


def warn_of_training_overlap(chosen: Sequence[tuple[str, Path]], checkpoint: LoadedCheckpoint | None) -> None:
    """Warn, naming them, when ``checkpoint`` (segmentation or malignancy) trained on chosen series."""
    if checkpoint is None:
        return
    split = recorded_split(checkpoint.raw, checkpoint.path)
    if split is None:
        log.info("%s checkpoint %s records no split: whether it trained on the validation series is unknown",
                 checkpoint.task, checkpoint.path)
        return
    trained = [uid for uid, _ in chosen if split.role(uid) == TRAINING]
    if trained:
        log.warning("%s checkpoint %s was trained on %d of the %d validation series: its part in their results "
                    "is not held out: %s", checkpoint.task, checkpoint.path, len(trained), len(chosen),
                    name_series(trained))


def validation_selection(candidates: Sequence[tuple[str, Path]], on_disk_uids: Iterable[str],
                         checkpoints: Mapping[str, LoadedCheckpoint | None], *, include_train: bool = False,
                         requested: bool = False) -> list[tuple[str, Path]]:
    """:func:`select_validation` under the ``"nodule"`` checkpoint's split, then the overlap warnings for the
    ``"segmentation"`` and ``"malignancy"`` ones (each may be None)."""
    nodule = checkpoints["nodule"]
    if nodule is None:
        raise ValueError("validation needs the nodule checkpoint")
    on_disk_uids = list(on_disk_uids)
    split, recorded = checkpoint_split(nodule, on_disk_uids)
    chosen = select_validation(candidates, on_disk_uids, split, recorded, str(nodule.path),
                               include_train=include_train, requested=requested)
    if not include_train:
        for task in ("segmentation", "malignancy"):
            warn_of_training_overlap(chosen, checkpoints.get(task))
    return chosen
