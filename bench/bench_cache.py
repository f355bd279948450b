"""Benchmark the chunk cache against the book's per-candidate gzip-pickle FanoutCache.

Both run in this process on the same synthetic dataset, pinned to one core:

- prepcache wall time: ``python -m p2ch_luna.prepcache`` vs the book's loop
  (each series' CT loaded once, every candidate's float32 chunk memoised);
- warm random-access chunks/s of ``ChunkCache.chunk`` vs the memoised function;
- bytes on disk of each cache vs the raw CT bytes they cover.

    python -m bench.bench_cache                       # small: 6 series of 256 x 256
    python -m bench.bench_cache --series 12 --shape 512 512
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import io
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from diskcache import FanoutCache

from p2ch_luna.data.cache import ChunkCache
from p2ch_luna.data.luna import read_candidate_table
from p2ch_luna.geometry import chunk_bounds
from p2ch_luna.io.ct import HU_MAX, HU_MIN, find_series_path, list_series_on_disk, load_ct
from p2ch_luna.prepcache import main as prepcache_main

CHUNK_WIDTH = (32, 48, 48)
"""The book's classification chunk (index, row, col)."""
BOOK_GZIP_LEVEL = 1
BOOK_SHARDS = 64
BOOK_SIZE_LIMIT = 3e11
TARGET_SPEEDUP = 5.0
TARGET_DISK_RATIO = 1.1
TARGET_PREPCACHE_SPEEDUP = 3.0


def make_dataset(root: Path, series: int, shape: tuple[int, int], slices: tuple[int, int], seed: int) -> None:
    """A synthetic LUNA16 folder: p2ch_luna.synth when present, else random volumes."""
    try:
        from p2ch_luna.synth.generator import generate_dataset
    except ImportError:
        _random_dataset(root, series, shape, slices, seed)
    else:
        generate_dataset(root, series=series, seed=seed, shape=shape, slices=slices, progress=False)


def _random_dataset(root: Path, series: int, shape: tuple[int, int], slices: tuple[int, int], seed: int) -> None:
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    rows = []
    for number in range(series):
        uid = f"1.2.826.0.1.{seed}.{number}"
        depth = int(rng.integers(slices[0], slices[1] + 1))
        image = sitk.GetImageFromArray(rng.integers(-1200, 1500, size=(depth, *shape)).astype(np.int16))
        image.SetSpacing((0.7, 0.7, 2.5))
        image.SetOrigin((-180.0, -180.0, -300.0))
        folder = root / f"subset{number % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(folder / f"{uid}.mhd"))
        for _ in range(200):
            irc = rng.uniform(0, (depth, *shape))
            xyz = image.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in irc[::-1]))
            rows.append(f"{uid},{xyz[0]:.3f},{xyz[1]:.3f},{xyz[2]:.3f},0")
    (root / "candidates.csv").write_text("seriesuid,coordX,coordY,coordZ,class\n" + "\n".join(rows) + "\n")
    (root / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n")


def book_getter(data_root: Path, cache_dir: Path, compress: bool = True):
    """The book's memoised ``getCtRawCandidate``: gzip(pickle(float32 chunk, irc)) per (uid, centre).

    ``compress=False`` stores the plain pickle, which is what the book's
    ``GzipDisk`` really does for the (chunk, irc) tuples it memoises (it only
    compresses ``bytes`` values).
    """
    cache = FanoutCache(str(cache_dir), shards=BOOK_SHARDS, timeout=1, size_limit=BOOK_SIZE_LIMIT)

    @functools.lru_cache(1, typed=True)
    def get_ct(uid: str):
        ct = load_ct(find_series_path(data_root, uid))
        hu = ct.hu.astype(np.float32)
        hu.clip(HU_MIN, HU_MAX, hu)
        return hu, ct.geometry

    def get_chunk(uid: str, center_xyz: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
        key = ("getCtRawCandidate", uid, center_xyz, CHUNK_WIDTH)
        stored = cache.get(key)
        if stored is None:
            hu, geometry = get_ct(uid)
            center_irc = geometry.xyz_to_irc(center_xyz)
            bounds = chunk_bounds(center_irc, CHUNK_WIDTH, hu.shape)
            chunk = np.array(hu[tuple(slice(start, end) for start, end in bounds)])
            stored = pickle.dumps((chunk, center_irc))
            if compress:
                stored = gzip.compress(stored, BOOK_GZIP_LEVEL)
            cache.set(key, stored)
        return pickle.loads(gzip.decompress(stored) if compress else stored)

    return get_chunk


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def rate(function, samples: Sequence[tuple[str, tuple[float, float, float]]]) -> float:
    started = time.perf_counter()
    for uid, center in samples:
        function(uid, center)
    return len(samples) / (time.perf_counter() - started)


def run(args: argparse.Namespace, work: Path) -> None:
    data_root = work / "data"
    started = time.perf_counter()
    make_dataset(data_root, args.series, tuple(args.shape), tuple(args.slices), args.seed)
    table = read_candidate_table(data_root)
    uids = sorted(set(table["series_uid"]))
    candidates = [(row.series_uid, (float(row.center_x), float(row.center_y), float(row.center_z)))
                  for row in table.sort_values("series_uid", kind="mergesort").itertuples()]
    on_disk = list_series_on_disk(data_root)
    ct_bytes = sum(on_disk[uid].with_suffix(".raw").stat().st_size for uid in uids)
    print(f"dataset: {len(uids)} series of {args.shape[0]}x{args.shape[1]} x {args.slices[0]}-{args.slices[1]} "
          f"slices, {len(candidates)} candidates, {ct_bytes / 1e6:.1f} MB of CT "
          f"(made in {time.perf_counter() - started:.1f} s)")

    book_dir = work / "book-cache"
    started = time.perf_counter()
    read_candidate_table(data_root)
    get_book_chunk = book_getter(data_root, book_dir)
    for uid, center in candidates:
        get_book_chunk(uid, center)
    book_prep_s = time.perf_counter() - started
    plain_dir = work / "book-cache-plain"
    started = time.perf_counter()
    get_plain_chunk = book_getter(data_root, plain_dir, compress=False)
    for uid, center in candidates:
        get_plain_chunk(uid, center)
    plain_prep_s = time.perf_counter() - started

    ours_dir = work / "chunk-cache"
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        status = prepcache_main(["--data-root", str(data_root), "--cache-dir", str(ours_dir),
                                 "--log-level", "WARNING"])
    ours_prep_s = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"prepcache failed with exit code {status}")

    rng = np.random.default_rng(args.seed)
    samples = [candidates[i] for i in rng.integers(0, len(candidates), size=args.samples)]
    cache = ChunkCache(ours_dir, data_root)
    started = time.perf_counter()
    for uid in uids:
        cache.volume(uid)  # first open per process: size, header and checksum
    verify_s = time.perf_counter() - started

    def ours(uid: str, center: tuple[float, float, float]):
        return cache.chunk(uid, center, CHUNK_WIDTH)

    def ours_float32(uid: str, center: tuple[float, float, float]):
        return cache.chunk(uid, center, CHUNK_WIDTH)[0].astype(np.float32)

    rate(get_book_chunk, samples[:1000])  # warm both equally
    rate(get_plain_chunk, samples[:1000])
    rate(ours, samples[:1000])
    book_rate = rate(get_book_chunk, samples)
    plain_rate = rate(get_plain_chunk, samples)
    ours_rate = rate(ours, samples)
    ours_float_rate = rate(ours_float32, samples)

    book_bytes = folder_bytes(book_dir)
    plain_bytes = folder_bytes(plain_dir)
    ours_bytes = folder_bytes(ours_dir)
    print(f"warm random access ({args.samples} chunks of {CHUNK_WIDTH}, one core):")
    print(f"  book FanoutCache gzip-pickle float32: {book_rate:10,.0f} chunks/s")
    print(f"  book FanoutCache pickle float32:      {plain_rate:10,.0f} chunks/s  (no gzip)")
    print(f"  ChunkCache int16 memmap:              {ours_rate:10,.0f} chunks/s  "
          f"x{ours_rate / book_rate:.1f} (target >= x{TARGET_SPEEDUP:g}; x{ours_rate / plain_rate:.1f} vs no gzip)")
    print(f"  ChunkCache + astype(float32):         {ours_float_rate:10,.0f} chunks/s  "
          f"x{ours_float_rate / book_rate:.1f} (x{ours_float_rate / plain_rate:.1f} vs no gzip)")
    print(f"  first open of {len(uids)} volumes (checksums) in a new process: {verify_s:.2f} s")
    print("disk bytes vs raw CT bytes:")
    print(f"  book cache:          {book_bytes / 1e6:10.1f} MB  x{book_bytes / ct_bytes:.2f}")
    print(f"  book cache, no gzip: {plain_bytes / 1e6:10.1f} MB  x{plain_bytes / ct_bytes:.2f}")
    print(f"  ChunkCache:          {ours_bytes / 1e6:10.1f} MB  x{ours_bytes / ct_bytes:.2f} (target <= x{TARGET_DISK_RATIO:g})")
    print("prepcache wall time:")
    print(f"  book loop:  {book_prep_s:8.2f} s  ({plain_prep_s:.2f} s without gzip)")
    print(f"  prepcache:  {ours_prep_s:8.2f} s  x{book_prep_s / ours_prep_s:.1f} faster "
          f"(target >= x{TARGET_PREPCACHE_SPEEDUP:g})")
    met = (ours_rate / book_rate >= TARGET_SPEEDUP and ours_bytes / ct_bytes <= TARGET_DISK_RATIO
           and book_prep_s / ours_prep_s >= TARGET_PREPCACHE_SPEEDUP)
    print(f"targets {'met' if met else 'NOT met'}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=6)
    parser.add_argument("--shape", type=int, nargs=2, default=(256, 256), metavar=("ROWS", "COLS"))
    parser.add_argument("--slices", type=int, nargs=2, default=(80, 120), metavar=("MIN", "MAX"))
    parser.add_argument("--samples", type=int, default=20000, help="random chunk reads timed per cache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="folder for the dataset and both caches (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        run(args, args.work_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_cache_") as work:
            run(args, Path(work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
