"""Handing the heap's free memory back to the system."""

from __future__ import annotations

import platform

import numpy as np
import pytest

from p2ch_luna import heap

GLIBC = platform.libc_ver()[0] == "glibc"


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_freed_heap_blocks_go_back_to_the_system() -> None:
    """Blocks under the mmap threshold stay in the heap when freed below a live one: RSS keeps them until
    ``release_free_memory``."""
    blocks = [np.ones(64 * 1024 // 8) for _ in range(3000)]  # 64 KiB each: heap, not mmap; 188 MiB in all
    last = blocks.pop()
    del blocks  # freed, but below ``last``, so glibc cannot shrink the heap's top
    before = _rss_mb()
    assert heap.release_free_memory()
    after = _rss_mb()
    assert before - after > 100, (before, after)
    assert last.sum() == len(last)  # live blocks keep their values


def test_release_is_a_no_op_without_malloc_trim(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)
    assert heap.release_free_memory() is False
