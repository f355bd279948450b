"""The train/validation split a model was trained on, as its checkpoints record it.

A checkpoint stores both series lists, not only the rule: LUNA16 has 888 series, so the two lists take
about 60 kB, and the split stays known when the folder it was drawn from changes (series added, removed,
or a different ``--val-stride``). ``series_sha256`` (of the sorted UIDs of both lists) names the set of
series in one value and lets a reader check the lists it loaded.

Record, under the checkpoint key :data:`SPLIT_KEY`::

    {"rule": "every val_stride-th series sorted by UID", "val_stride": 10,
     "train_series": [...], "validation_series": [...], "series_sha256": "..."}

or, for a LUNA16 fold (``training --fold K``, :mod:`p2ch_luna.data.folds`), ``"rule": FOLD_RULE``,
``"val_stride": null`` and ``"fold": K``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

from p2ch_luna.errors import DataError

SPLIT_KEY = "series_split"
"""The checkpoint field that holds the split record."""
STRIDE_RULE = "every val_stride-th series sorted by UID"
"""The rule :func:`p2ch_luna.data.luna.split_by_series` applies (the book's)."""
FOLD_RULE = "LUNA16 subsetK held out"
"""The rule of ``--fold K``: the series in the data root's ``subsetK/`` are validation."""
TRAINING = "training"
VALIDATION = "validation"


@dataclasses.dataclass(frozen=True)
class SeriesSplit:
    """Training and validation series UIDs (each sorted, disjoint), and the rule that drew them."""

    train_series: tuple[str, ...]
    validation_series: tuple[str, ...]
    val_stride: int | None = None
    rule: str = STRIDE_RULE
    fold: int | None = None
    """The LUNA16 fold held out (``rule`` is :data:`FOLD_RULE`), else None."""

    def __post_init__(self) -> None:
        overlap = set(self.train_series) & set(self.validation_series)
        if overlap:
            raise ValueError(f"{len(overlap)} series are both training and validation: {sorted(overlap)[:3]}")

    @classmethod
    def from_uids(cls, train_series: Iterable[str], validation_series: Iterable[str],
                  val_stride: int | None = None, rule: str = STRIDE_RULE, fold: int | None = None) -> SeriesSplit:
        """A split from any iterables of UIDs (duplicates dropped, sorted)."""
        return cls(tuple(sorted(set(train_series))), tuple(sorted(set(validation_series))), val_stride, rule, fold)

    @classmethod
    def for_fold(cls, train_series: Iterable[str], validation_series: Iterable[str], fold: int) -> SeriesSplit:
        """The split of ``--fold fold``: ``validation_series`` are ``subset<fold>``'s."""
        return cls.from_uids(train_series, validation_series, None, FOLD_RULE, fold)

    def describe(self) -> str:
        """``fold K (subsetK held out)`` or ``val stride N``, for messages."""
        return f"fold {self.fold} (subset{self.fold} held out)" if self.fold is not None else \
            f"val stride {self.val_stride}"

    @property
    def series_sha256(self) -> str:
        """SHA-256 of the sorted UIDs of both lists, one per line."""
        return series_sha256([*self.train_series, *self.validation_series])

    def role(self, series_uid: str) -> str | None:
        """:data:`TRAINING`, :data:`VALIDATION`, or None for a series the split does not hold."""
        if series_uid in self._validation_set:
            return VALIDATION
        if series_uid in self._train_set:
            return TRAINING
        return None

    @functools.cached_property
    def _train_set(self) -> frozenset[str]:
        return frozenset(self.train_series)

    @functools.cached_property
    def _validation_set(self) -> frozenset[str]:
        return frozenset(self.validation_series)

    def to_record(self) -> dict[str, Any]:
        """The plain dict a checkpoint stores under :data:`SPLIT_KEY`."""
        return {"rule": self.rule, "val_stride": self.val_stride, "train_series": list(self.train_series),
                "validation_series": list(self.validation_series), "series_sha256": self.series_sha256,
                "fold": self.fold}


def series_sha256(series_uids: Iterable[str]) -> str:
    """SHA-256 (hex) of the sorted, distinct UIDs joined by newlines."""
    return hashlib.sha256("\n".join(sorted(set(series_uids))).encode()).hexdigest()


def split_record(split: SeriesSplit | None) -> dict[str, Any] | None:
    """``split.to_record()``, or None when a run has no split to record."""
    return None if split is None else split.to_record()


def recorded_split(raw: Mapping[str, Any], source: object) -> SeriesSplit | None:
    """The split stored in a loaded checkpoint dict (``LoadedCheckpoint.raw``); None when it stores none.

    A record that is not a split (wrong types, lists that overlap or do not match their hash) is a
    :class:`DataError` naming ``source`` (the checkpoint's path).
    """
    record = raw.get(SPLIT_KEY)
    if record is None:
        return None
    lists = {name: record.get(name) if isinstance(record, Mapping) else None
             for name in ("train_series", "validation_series")}
    if not all(isinstance(uids, (list, tuple)) and all(isinstance(uid, str) for uid in uids)
               for uids in lists.values()):
        raise DataError(f"{source}: its {SPLIT_KEY} is not a list of training and validation series")
    stride = record.get("val_stride")
    fold = record.get("fold")
    if fold is not None and not (isinstance(fold, int) and not isinstance(fold, bool) and fold >= 0):
        raise DataError(f"{source}: its {SPLIT_KEY} fold is not a fold number: {fold!r}")
    try:
        split = SeriesSplit.from_uids(lists["train_series"], lists["validation_series"],
                                      stride if isinstance(stride, int) else None,
                                      str(record.get("rule", STRIDE_RULE)), fold)
    except ValueError as error:
        raise DataError(f"{source}: its {SPLIT_KEY} is inconsistent: {error}") from None
    if record.get("series_sha256") not in (None, split.series_sha256):
        raise DataError(f"{source}: its {SPLIT_KEY} lists do not match their series_sha256")
    return split


def check_resumed_split(recorded: SeriesSplit | None, current: SeriesSplit | None, source: object) -> None:
    """Refuse to resume (:class:`DataError` naming ``source``, the checkpoint) when this run's split differs
    from the recorded one: a different stride, or series added, missing or moved between the two lists.
    Nothing to compare (an older checkpoint, a task without a split) passes."""
    if recorded is None or current is None:
        return
    if recorded.val_stride != current.val_stride:
        raise DataError(f"--resume {source}: the checkpoint's split has --val-stride {recorded.val_stride}, "
                        f"this run's {current.val_stride}")
    if recorded.train_series == current.train_series and recorded.validation_series == current.validation_series:
        return
    before = set(recorded.train_series) | set(recorded.validation_series)
    now = set(current.train_series) | set(current.validation_series)
    moved = sum(recorded.role(uid) != current.role(uid) for uid in before & now)
    raise DataError(f"--resume {source}: the data's series split differs from the one the checkpoint recorded "
                    f"({len(now - before)} series added, {len(before - now)} missing, {moved} changed role); "
                    "resume with the data it was trained on")
