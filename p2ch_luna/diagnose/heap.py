"""Handing the C heap's free memory back to the operating system.

CPU inference batch after batch leaves glibc's heap full of freed blocks it
keeps for later: on a large CT several times the memory in use stays resident
but free. ``malloc_trim`` gives those pages back. Memory the heap then reuses
is faulted in again, which costs time when done after every batch, so a loop
trims with :class:`HeapTrimmer` only once the process has grown by a set
amount (what each costs: ``python -m bench.bench_memory``; figures in
``docs/benchmarks.md``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from typing import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl, Windows)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


def release_free_memory() -> bool:
    """Give the heap's free pages back to the system; whether the C library can (glibc)."""
    function = _malloc_trim()
    if function is None:
        return False
    function(0)
    return True


def resident_bytes() -> int | None:
    """The process's resident memory (Linux's ``/proc/self/statm``); None elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class HeapTrimmer:
    """Releases the heap's free memory once the process has grown by more than ``slack`` bytes since the last
    release (or since it was made): call :meth:`step` after each batch of a loop."""

    def __init__(self, slack: int) -> None:
        self.slack = slack
        self.mark = resident_bytes()

    def step(self) -> bool:
        """Release if the process has grown past the slack; returns whether it did."""
        resident = resident_bytes()
        if resident is None or self.mark is None or resident - self.mark <= self.slack:
            return False
        released = release_free_memory()
        self.mark = resident_bytes()
        return released
