"""Loading CTs and finding their lungs ahead in worker processes gives what loading them here gives."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from p2ch_luna.diagnose import prefetch
from p2ch_luna.errors import DataError
from p2ch_luna.io.ct import list_series_on_disk


def _selection(root: Path) -> list[tuple[str, Path]]:
    on_disk = list_series_on_disk(root)
    return [(uid, on_disk[uid]) for uid in sorted(on_disk)]


def test_workers_give_the_same_cts_and_lungs_in_order(tiny_dataset: Path) -> None:
    selection = _selection(tiny_dataset)[:4]
    here = list(prefetch.prepared_cts(selection, margin_mm=3.0, workers=0))
    ahead = list(prefetch.prepared_cts(selection, margin_mm=3.0, workers=2))
    assert [p.ct.series_uid for p in ahead] == [uid for uid, _ in selection]
    for mine, theirs in zip(here, ahead):
        assert np.array_equal(mine.ct.hu, theirs.ct.hu) and not theirs.ct.hu.flags.writeable
        assert np.array_equal(mine.ct.geometry.affine, theirs.ct.geometry.affine)
        assert mine.ct.shape == theirs.ct.shape and mine.ct.source == theirs.ct.source
        assert np.array_equal(mine.lungs.mask, theirs.lungs.mask)
        assert np.array_equal(mine.lungs.labels, theirs.lungs.labels)
        assert theirs.load_s > 0 and theirs.lungs_s > 0


def test_a_bad_ct_raises_its_error_when_its_turn_comes(tiny_dataset: Path, tmp_path: Path) -> None:
    selection = _selection(tiny_dataset)[:3]
    broken = tmp_path / selection[1][1].name
    shutil.copy(selection[1][1], broken)  # the header without its .raw
    selection[1] = (selection[1][0], broken)
    prepared = prefetch.prepared_cts(selection, margin_mm=3.0, workers=1)
    assert next(prepared).ct.series_uid == selection[0][0]
    with pytest.raises(DataError, match=str(broken.with_suffix(""))):
        next(prepared)
    prepared.close()
