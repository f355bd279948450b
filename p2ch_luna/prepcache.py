"""Fill the chunk cache before training: ``python -m p2ch_luna.prepcache``.

Every series on disk that has candidates is read once and stored as a clipped
int16 volume (see :mod:`p2ch_luna.data.cache`); classification and segmentation
chunks are then cut from it without touching the CT again. Finished series are
kept when the run is interrupted, and a rerun skips them.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Iterator, Sequence

from tqdm import tqdm

from p2ch_luna.cli import add_series_uid_argument, make_parser, run_command
from p2ch_luna.data.cache import ChunkCache, open_cache
from p2ch_luna.data.luna import read_candidate_table
from p2ch_luna.errors import DataError, LunaError, UsageError
from p2ch_luna.paths import paths_from_args

log = logging.getLogger(__name__)

BYTES_PER_GB = 10**9

_worker_cache: ChunkCache | None = None


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("python -m p2ch_luna.prepcache", __doc__.splitlines()[0])
    parser.add_argument("--num-workers", type=int, default=1, metavar="N",
                        help="processes reading CTs in parallel")
    add_series_uid_argument(parser, "cache only these series (default: every series with candidates)")
    parser.add_argument("--cache-size-gb", type=float, default=None, metavar="GB",
                        help="bound on the cache folder, remembered for later runs "
                             "(default: the last bound set, else 300 GB)")
    parser.add_argument("--verify", action="store_true",
                        help="checksum entries already cached instead of only checking their size")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_run, build_parser(), argv)


def _run(args: argparse.Namespace) -> int:
    if args.num_workers < 1:
        raise UsageError(f"--num-workers must be at least 1, got {args.num_workers}")
    if args.cache_size_gb is not None and args.cache_size_gb <= 0:
        raise UsageError(f"--cache-size-gb must be positive, got {args.cache_size_gb}")
    paths = paths_from_args(args)
    paths.require_data_root()
    limit = None if args.cache_size_gb is None else int(args.cache_size_gb * BYTES_PER_GB)
    cache = open_cache(paths, limit)
    series_uids = _select_series(paths.data_root, args.series_uid)

    started = time.perf_counter()
    built = skipped = 0
    failures: list[tuple[str, str]] = []
    results = _prepare_all(cache, series_uids, args.num_workers, args.verify)
    for uid, was_built, error in tqdm(results, total=len(series_uids), unit="series", desc="prepcache"):
        if error is not None:
            log.warning("series %s could not be cached: %s", uid, error)
            failures.append((uid, error))
        elif was_built:
            built += 1
        else:
            skipped += 1
    elapsed = time.perf_counter() - started

    size = cache.size_bytes()
    print(f"cached {built + skipped} of {len(series_uids)} series ({built} built, {skipped} already cached) "
          f"in {elapsed:.1f} s; cache {cache.directory} holds {size / BYTES_PER_GB:.2f} GB "
          f"of a {cache.size_limit_bytes / BYTES_PER_GB:.1f} GB bound")
    cache.close()
    if failures:
        uid, error = failures[0]
        raise DataError(f"{len(failures)} of {len(series_uids)} series could not be cached; first: {uid}: {error}")
    return 0


def _select_series(data_root, requested: Sequence[str] | None) -> list[str]:
    """Series with candidates on disk, or the requested ones (each must be among them)."""
    table = read_candidate_table(data_root)
    available = sorted(set(table["series_uid"]))
    if not available:
        raise DataError(f"no series under {data_root}/subset*/ has candidates")
    if not requested:
        return available
    known = set(available)
    unknown = [uid for uid in requested if uid not in known]
    if unknown:
        raise UsageError(f"--series-uid {unknown[0]} has no candidates or no .mhd under {data_root}")
    return list(dict.fromkeys(requested))


def _prepare_all(cache: ChunkCache, series_uids: Sequence[str], num_workers: int,
                 verify: bool) -> Iterator[tuple[str, bool, str | None]]:
    """(uid, built, error message) per series, in completion order."""
    if num_workers == 1 or len(series_uids) <= 1:
        for uid in series_uids:
            yield _prepare_one(cache, uid, verify)
        return
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    executor = ProcessPoolExecutor(max_workers=min(num_workers, len(series_uids)),
                                   mp_context=multiprocessing.get_context(method),
                                   initializer=_init_worker, initargs=(cache,))
    try:
        pending: set[Future] = {executor.submit(_prepare_in_worker, uid, verify) for uid in series_uids}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
    finally:
        # On Ctrl-C, workers finish the series they hold (so no work is half done) and stop.
        executor.shutdown(wait=True, cancel_futures=True)


def _prepare_one(cache: ChunkCache, uid: str, verify: bool) -> tuple[str, bool, str | None]:
    try:
        return uid, cache.ensure_volume(uid, verify=verify), None
    except LunaError as error:
        return uid, False, str(error)


def _init_worker(cache: ChunkCache) -> None:
    global _worker_cache
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    _worker_cache = cache


def _prepare_in_worker(uid: str, verify: bool) -> tuple[str, bool, str | None]:
    assert _worker_cache is not None
    return _prepare_one(_worker_cache, uid, verify)


if __name__ == "__main__":
    sys.exit(main())
