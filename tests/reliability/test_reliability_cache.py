"""Cache faults end to end: prepcache killed, damaged entries, concurrent fillers, a full disk."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from p2ch_luna.data.cache import ChunkCache
from p2ch_luna.data.luna import split_by_series
from p2ch_luna.io.ct import HU_MAX, HU_MIN, list_series_on_disk, load_ct
from tests.reliability.reliability_helpers import (
    TEMP_FILE,
    Child,
    assert_one_line_error,
    file_size_limit,
    run,
    start,
    training_args,
)

pytestmark = pytest.mark.reliability

PREPCACHE = "p2ch_luna.prepcache"
SLOW_PREPCACHE = """
import contextlib, sys, time
import p2ch_luna.data.cache as cache
from p2ch_luna.prepcache import main

load_ct, atomic_open = cache.load_ct, cache.atomic_open

def slow_load_ct(*args, **kwargs):
    time.sleep(0.3)
    return load_ct(*args, **kwargs)

class SlowHandle:
    def __init__(self, handle):
        self.handle = handle
    def write(self, data):
        time.sleep(0.1)  # between the header and the data: a kill can land half-way through a file
        return self.handle.write(data)

@contextlib.contextmanager
def slow_atomic_open(path, mode="wb"):
    with atomic_open(path, mode) as handle:
        yield SlowHandle(handle)

cache.load_ct, cache.atomic_open = slow_load_ct, slow_atomic_open
sys.exit(main(sys.argv[1:]))
"""


def cache_args(data_root: Path, cache_dir: Path) -> list[str]:
    return ["--data-root", str(data_root), "--cache-dir", str(cache_dir)]


def built_and_kept(stdout: str) -> tuple[int, int]:
    match = re.search(r"\((\d+) built, (\d+) already cached\)", stdout)
    assert match, stdout
    return int(match[1]), int(match[2])


def assert_cache_correct(cache_dir: Path, data_root: Path) -> None:
    """Every series' cached volume equals its CT clipped, read in this (fresh) process."""
    cache = ChunkCache(cache_dir, data_root)
    try:
        for uid, path in list_series_on_disk(data_root).items():
            np.testing.assert_array_equal(cache.volume(uid), np.clip(load_ct(path).hu, HU_MIN, HU_MAX),
                                          err_msg=uid)
    finally:
        cache.close()


def entry_file(cache_dir: Path, data_root: Path, uid: str) -> Path:
    cache = ChunkCache(cache_dir, data_root)
    return cache_dir / "volumes" / f"{cache._volume_key(uid)[0]}.npy"


def test_killed_prepcache_keeps_finished_series_and_rerun_completes(luna_root: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    volumes = cache_dir / "volumes"
    series = len(list_series_on_disk(luna_root))
    child = Child([sys.executable, "-c", SLOW_PREPCACHE, *cache_args(luna_root, cache_dir)])

    def finished() -> list[Path]:
        return [p for p in volumes.glob("*.npy") if not TEMP_FILE.match(p.name)] if volumes.is_dir() else []

    child.wait_for(lambda: len(finished()) >= 2, "two cached volumes")
    child.send_signal(signal.SIGKILL)
    assert child.finish()[0] == -signal.SIGKILL
    assert 2 <= len(finished()) < series, "the kill should land part-way through"

    result = run(PREPCACHE, *cache_args(luna_root, cache_dir))
    assert result.returncode == 0, result.stderr
    built, kept = built_and_kept(result.stdout)
    assert built + kept == series
    assert kept >= 1, "series cached before the kill were rebuilt"
    assert_cache_correct(cache_dir, luna_root)


def test_damaged_entries_are_rebuilt_never_served(luna_root: Path, tmp_path: Path) -> None:
    """A truncated entry is caught by prepcache's size check; a flipped one by the checksum of a fresh reader."""
    work = tmp_path / "work"
    cache_dir = work / "cache"
    assert run(PREPCACHE, *cache_args(luna_root, cache_dir)).returncode == 0
    uids = sorted(list_series_on_disk(luna_root))
    val_uid = split_by_series(uids)[1][0]
    train_uid = next(uid for uid in uids if uid != val_uid)
    truncated = entry_file(cache_dir, luna_root, train_uid)
    flipped = entry_file(cache_dir, luna_root, val_uid)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    data = bytearray(flipped.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    flipped.write_bytes(bytes(data))

    result = run(PREPCACHE, *cache_args(luna_root, cache_dir))  # size check only: finds the truncated one
    assert result.returncode == 0, result.stderr
    assert built_and_kept(result.stdout) == (1, len(uids) - 1)
    # Training reads every validation chunk; the fresh process checksums the entry before using it.
    result = run("p2ch_luna.training", *training_args(luna_root, work, "--epochs", "1", "--epoch-size", "4"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(rf"cache entry \S*{flipped.name} is invalid \(checksum mismatch\); rebuilding", result.stderr)
    assert_cache_correct(cache_dir, luna_root)

    result = run(PREPCACHE, *cache_args(luna_root, cache_dir), "--verify")
    assert result.returncode == 0, result.stderr
    assert built_and_kept(result.stdout) == (0, len(uids))


def test_four_processes_fill_one_cache(luna_root: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    children = [start(PREPCACHE, *cache_args(luna_root, cache_dir)) for _ in range(4)]
    for child in children:
        code, _, err = child.finish()
        assert code == 0, err
    series = len(list_series_on_disk(luna_root))
    assert len([p for p in (cache_dir / "volumes").iterdir() if not TEMP_FILE.match(p.name)]) == series
    assert_cache_correct(cache_dir, luna_root)


def test_file_size_limit_while_caching_keeps_the_previous_entry(luna_copy: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    assert run(PREPCACHE, *cache_args(luna_copy, cache_dir)).returncode == 0
    uid, path = sorted(list_series_on_disk(luna_copy).items())[0]
    entry = entry_file(cache_dir, luna_copy, uid)
    before = entry.read_bytes()
    raw = path.with_suffix(".raw")
    stat = raw.stat()
    os.utime(raw, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a changed source: the entry is rebuilt

    result = run(PREPCACHE, *cache_args(luna_copy, cache_dir), preexec_fn=file_size_limit(len(before) // 2))
    assert_one_line_error(result.returncode, result.stderr, "could not be cached", uid, "File too large",
                          expected_code=1)
    assert entry.read_bytes() == before
    np.testing.assert_array_equal(np.load(entry), np.clip(load_ct(path).hu, HU_MIN, HU_MAX))
    assert not [p for p in entry.parent.iterdir() if TEMP_FILE.match(p.name)], "temporary file left behind"
