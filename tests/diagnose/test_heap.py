"""Handing the heap's free memory back to the system."""

from __future__ import annotations

import platform

import numpy as np
import pytest

from p2ch_luna.diagnose import heap

GLIBC = platform.libc_ver()[0] == "glibc"
BLOCK_BYTES = 64 * 1024  # under glibc's mmap threshold: the heap holds these
needs_glibc = pytest.mark.skipif(not GLIBC or heap.resident_bytes() is None, reason="malloc_trim is glibc's")


def _resident_mb() -> float:
    resident = heap.resident_bytes()
    assert resident is not None
    return resident / 2**20


def _freed_blocks(count: int = 3000) -> np.ndarray:
    """Frees ``count`` - 1 heap blocks (188 MiB) below a live one, so glibc cannot shrink the heap's top by
    itself; returns that one."""
    blocks = [np.ones(BLOCK_BYTES // 8) for _ in range(count)]
    last = blocks.pop()
    del blocks
    return last


@needs_glibc
def test_freed_heap_blocks_go_back_to_the_system() -> None:
    last = _freed_blocks()
    before = _resident_mb()
    assert heap.release_free_memory()
    after = _resident_mb()
    assert before - after > 100, (before, after)
    assert last.sum() == len(last)  # live blocks keep their values


@needs_glibc
def test_the_trimmer_releases_once_the_process_grew_past_its_slack() -> None:
    trimmer = heap.HeapTrimmer(slack=120 << 20)
    small = _freed_blocks(count=800)  # 50 MiB: within the slack
    assert not trimmer.step()
    large = _freed_blocks()  # 188 MiB more: past it
    before = _resident_mb()
    assert trimmer.step()
    assert _resident_mb() < before - 100
    assert not trimmer.step()  # measured from the release now
    assert small.sum() == len(small) and large.sum() == len(large)


def test_without_glibc_nothing_is_released(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)
    assert heap.release_free_memory() is False
    trimmer = heap.HeapTrimmer(slack=0)
    trimmer.mark = 0  # as if the process had grown
    assert trimmer.step() is False
