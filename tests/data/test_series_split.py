"""--resume compares the data's split with the one the checkpoint recorded."""

from __future__ import annotations

import pytest

from p2ch_luna.data.series_split import SeriesSplit, check_resumed_split
from p2ch_luna.errors import DataError

RECORDED = SeriesSplit.from_uids(["a", "b", "d"], ["c"], 3)


def test_the_same_split_or_nothing_to_compare_resumes() -> None:
    check_resumed_split(RECORDED, SeriesSplit.from_uids(["d", "b", "a"], ["c"], 3), "x.state")
    check_resumed_split(None, RECORDED, "x.state")
    check_resumed_split(RECORDED, None, "x.state")


@pytest.mark.parametrize("current, message", [
    (SeriesSplit.from_uids(["a", "b", "d"], ["c"], 5), "x.state: the checkpoint's split has --val-stride 3, this run's 5"),
    (SeriesSplit.from_uids(["a", "b", "d", "e"], ["c"], 3), r"\(1 series added, 0 missing, 0 changed role\)"),
    (SeriesSplit.from_uids(["a", "b"], ["c"], 3), r"\(0 series added, 1 missing, 0 changed role\)"),
    (SeriesSplit.from_uids(["a", "c", "d"], ["b"], 3), r"\(0 series added, 0 missing, 2 changed role\)"),
])
def test_a_different_split_is_refused_in_one_line(current: SeriesSplit, message: str) -> None:
    with pytest.raises(DataError, match=message) as raised:
        check_resumed_split(RECORDED, current, "x.state")
    assert "\n" not in str(raised.value) and str(raised.value).startswith("--resume x.state: ")
