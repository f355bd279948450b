"""LUNA16's ten official folds: fold K is the series in the ``subsetK/`` folder under the data root.

The LUNA16 challenge ships its 888 series in ten archives, ``subset0`` to ``subset9``, and its
protocol is ten-fold cross-validation over them: train on nine subsets, detect on the tenth, then
score the ten held-out detections together. A series' fold is the first folder of its path under
the data root (``subset3/x.mhd`` and ``subset3/subset3/x.mhd`` are both fold 3); a series outside
every ``subset<k>/`` folder belongs to no fold and is never held out.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from p2ch_luna.errors import DataError

LUNA16_FOLDS = 10
"""``subset0`` .. ``subset9``."""
SUBSET_FOLDER = re.compile(r"subset(\d+)")


def fold_argument(text: str) -> int:
    """argparse type of ``--fold``: an integer 0..9."""
    try:
        fold = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a fold number: {text!r}") from None
    if not 0 <= fold < LUNA16_FOLDS:
        raise argparse.ArgumentTypeError(f"LUNA16 folds are 0..{LUNA16_FOLDS - 1}, not {fold}")
    return fold


def fold_of_path(path: Path, data_root: Path) -> int | None:
    """The K of the ``subsetK`` folder ``path`` lies in directly under ``data_root``; None outside one."""
    try:
        parts = Path(path).resolve().relative_to(Path(data_root).resolve()).parts
    except ValueError:
        return None
    match = SUBSET_FOLDER.fullmatch(parts[0]) if len(parts) > 1 else None
    return int(match.group(1)) if match else None


def fold_series(on_disk: Mapping[str, Path], data_root: Path, fold: int) -> list[str]:
    """The sorted UIDs of ``on_disk`` (UID -> ``.mhd``) that lie in ``subset<fold>/``; a DataError when none."""
    held_out = sorted(uid for uid, path in on_disk.items() if fold_of_path(path, data_root) == fold)
    if not held_out:
        raise DataError(f"fold {fold}: no series under {Path(data_root) / f'subset{fold}'}/")
    return held_out


def split_by_fold(series_uids: Iterable[str], on_disk: Mapping[str, Path], data_root: Path,
                  fold: int) -> tuple[list[str], list[str]]:
    """``(training, validation)`` of ``series_uids``: validation is those in ``subset<fold>/``, training the rest.

    A UID with no ``.mhd`` in ``on_disk`` is a DataError (its fold cannot be known); so is a fold that
    holds none of ``series_uids``, or one that would leave nothing to train on.
    """
    uids = sorted(set(series_uids))
    missing = [uid for uid in uids if uid not in on_disk]
    if missing:
        raise DataError(f"fold {fold}: {len(missing)} series have no .mhd under {data_root}, so no fold: {missing[0]}")
    held_out = set(fold_series({uid: on_disk[uid] for uid in uids}, data_root, fold))
    train = [uid for uid in uids if uid not in held_out]
    if not train:
        raise DataError(f"fold {fold}: every series under {data_root} lies in subset{fold}/, none is left to train on")
    return train, sorted(held_out)
