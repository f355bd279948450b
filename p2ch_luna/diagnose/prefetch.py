"""Load the next CTs and find their lungs in worker processes while this one runs the models.

Reading a CT and building its lung mask are CPU work in SimpleITK and
scipy. Most of it releases the GIL, so threads would overlap it too; processes
were chosen because they also keep the Python-level work apart and measured at
least as fast (``python -m bench.bench_diagnose --series 4 --slices 100 --threads 1``). With ``workers`` > 0, :func:`prepared_cts` hands them to that many
``spawn``-ed worker processes (no CUDA or torch state is inherited) and keeps
``workers`` CTs in flight ahead of the one being diagnosed; results come back
in the order asked. Errors are re-raised in this process when their CT's turn
comes (a bad file gives its usual one-line :class:`~p2ch_luna.errors.DataError`);
Ctrl-C is left to this process, which cancels what is queued and waits for
what is running.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import multiprocessing
import signal
import time
from pathlib import Path
from typing import Iterator, Sequence

from p2ch_luna.diagnose.lungs import Lungs, find_lungs
from p2ch_luna.errors import LunaError
from p2ch_luna.io.ct import Ct, load_ct

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PreparedCt:
    """A loaded CT, its lungs and how long each took (seconds)."""

    ct: Ct
    lungs: Lungs
    load_s: float
    lungs_s: float


def prepare_ct(series_uid: str, path: Path, margin_mm: float) -> PreparedCt:
    """Load one CT (``series_uid`` may be "") and find its lungs."""
    started = time.perf_counter()
    ct = load_ct(path, series_uid=series_uid or None)
    loaded = time.perf_counter()
    spacing_irc = tuple(float(v) for v in ct.geometry.spacing_irc)
    lungs = find_lungs(ct.hu, spacing_irc, margin_mm=margin_mm)
    return PreparedCt(ct=ct, lungs=lungs, load_s=loaded - started, lungs_s=time.perf_counter() - loaded)


def prepared_cts(selection: Sequence[tuple[str, Path]], margin_mm: float, workers: int = 0) -> Iterator[PreparedCt]:
    """:func:`prepare_ct` of each ``(series_uid, path)`` in order, up to ``workers`` of them ahead in other processes.

    With ``workers`` 0 (or a single CT) everything runs here, one CT at a time.
    """
    if workers <= 0 or len(selection) < 2:
        for series_uid, path in selection:
            yield prepare_ct(series_uid, path, margin_mm)
        return
    workers = min(workers, len(selection) - 1)
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker, initargs=(logging.getLogger().getEffectiveLevel(),))
    pending: collections.deque[tuple[Path, concurrent.futures.Future[PreparedCt]]] = collections.deque()
    queue = iter(selection)
    try:
        # The first CT is prepared here while the workers start (spawning takes a second or two).
        first_uid, first_path = next(queue)
        for series_uid, path in queue:
            pending.append((path, pool.submit(prepare_ct, series_uid, path, margin_mm)))
            if len(pending) == workers:
                break
        yield prepare_ct(first_uid, first_path, margin_mm)
        while pending:
            path, future = pending.popleft()
            following = next(queue, None)
            if following is not None:
                pending.append((following[1], pool.submit(prepare_ct, following[0], following[1], margin_mm)))
            yield _result(future, path)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _result(future: concurrent.futures.Future[PreparedCt], path: Path) -> PreparedCt:
    try:
        prepared = future.result()
    except concurrent.futures.process.BrokenProcessPool:
        raise LunaError(f"the worker process loading CT {path} died (out of memory?); "
                        "try --prefetch 0") from None
    prepared.ct.hu.setflags(write=False)  # read-only, as load_ct returns it (pickling drops the flag)
    return prepared


def _start_worker(log_level: int) -> None:
    """Worker set-up: Ctrl-C is the main process's to handle; log as it does."""
    from p2ch_luna.cli import configure_logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(logging.getLevelName(log_level))
