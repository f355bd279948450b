"""ChunkCache: hits and misses equal direct extraction; corruption, versions, bounds, processes."""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import p2ch_luna.data.cache as cache_module
from p2ch_luna.data.cache import ChunkCache, open_cache
from p2ch_luna.data.luna import read_candidate_table
from p2ch_luna.errors import DataError
from p2ch_luna.io.ct import HU_MAX, HU_MIN, list_series_on_disk, load_ct
from p2ch_luna.paths import resolve_paths

CLASSIFIER_WIDTH = (32, 48, 48)
SEGMENTATION_WIDTH = (7, 96, 96)


@pytest.fixture
def count_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every CT the cache reads from the data folder."""
    loads: list[str] = []
    real_load_ct = cache_module.load_ct

    def counting_load_ct(path, series_uid=None):
        loads.append(series_uid)
        return real_load_ct(path, series_uid)

    monkeypatch.setattr(cache_module, "load_ct", counting_load_ct)
    return loads


def _series(data_root: Path) -> dict[str, Path]:
    series = list_series_on_disk(data_root)
    assert len(series) >= 3
    return series


def _volume_files(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "volumes").glob("*.npy"))


def test_chunks_equal_direct_extraction_on_miss_and_hit(tiny_dataset: Path, tmp_path: Path,
                                                        count_loads: list[str]) -> None:
    table = read_candidate_table(tiny_dataset)
    rows = table.groupby("series_uid").head(15)
    cts = {uid: load_ct(path) for uid, path in _series(tiny_dataset).items()}
    cold = ChunkCache(tmp_path / "cache", tiny_dataset)
    for instance in (cold, ChunkCache(tmp_path / "cache", tiny_dataset)):
        for row in rows.itertuples():
            center = (row.center_x, row.center_y, row.center_z)
            for width in (CLASSIFIER_WIDTH, SEGMENTATION_WIDTH):
                chunk, center_irc = instance.chunk(row.series_uid, center, width)
                expected, expected_irc = cts[row.series_uid].chunk(center, width)
                assert chunk.dtype == np.int16 and chunk.shape == width
                np.testing.assert_array_equal(chunk, expected)
                np.testing.assert_array_equal(center_irc, expected_irc)
    assert sorted(count_loads) == sorted(rows["series_uid"].unique())  # each CT read once, hits read none


def test_volume_and_geometry_match_the_ct(tiny_dataset: Path, tmp_path: Path) -> None:
    uid, path = next(iter(_series(tiny_dataset).items()))
    ct = load_ct(path)
    cache = ChunkCache(tmp_path / "cache", tiny_dataset)
    geometry = cache.geometry(uid)
    volume = cache.volume(uid)
    np.testing.assert_array_equal(volume, np.clip(ct.hu, HU_MIN, HU_MAX))
    assert volume.dtype == np.int16 and not volume.flags.writeable
    with pytest.raises(ValueError):
        volume[0, 0, 0] = 0
    fresh = ChunkCache(tmp_path / "cache", tiny_dataset)
    for cached in (geometry, fresh.geometry(uid)):
        assert cached.shape_irc == ct.geometry.shape_irc
        np.testing.assert_array_equal(cached.affine, ct.geometry.affine)


def _write_ct(path: Path, hu: np.ndarray, origin: tuple, spacing: tuple, direction: tuple) -> None:
    image = sitk.GetImageFromArray(hu)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


@pytest.mark.parametrize("direction", [
    (-1.0, 0, 0, 0, 1, 0, 0, 0, -1),
    (0.0, 1, 0, 1, 0, 0, 0, 0, 1),  # permuted axes take the general path
])
def test_chunk_centres_match_the_ct_for_any_direction(tmp_path: Path, direction: tuple) -> None:
    rng = np.random.default_rng(3)
    hu = rng.integers(-2000, 3000, size=(20, 30, 40)).astype(np.int16)
    data_root = tmp_path / "data"
    _write_ct(data_root / "subset0" / "1.2.3.mhd", hu, (10.0, -20.5, 300.25), (0.7, 0.8, 2.5), direction)
    ct = load_ct(data_root / "subset0" / "1.2.3.mhd")
    cache = ChunkCache(tmp_path / "cache", data_root)
    # Random points, and points exactly half-way between voxels (rounding ties).
    irc = np.concatenate([rng.uniform(-0.5, np.array(hu.shape) - 0.5, size=(300, 3)),
                          rng.integers(0, 19, size=(100, 3)) + 0.5])
    for center in ct.geometry.irc_to_xyz(irc):
        if not ct.geometry.contains_irc(ct.geometry.xyz_to_irc(center)):
            with pytest.raises(DataError, match="outside CT"):
                cache.chunk("1.2.3", center, (4, 6, 6))
            continue
        chunk, center_irc = cache.chunk("1.2.3", center, (4, 6, 6))
        expected, expected_irc = ct.chunk(center, (4, 6, 6))
        np.testing.assert_array_equal(center_irc, expected_irc)
        np.testing.assert_array_equal(chunk, expected)
    assert cache.volume("1.2.3").max() == HU_MAX and cache.volume("1.2.3").min() == HU_MIN


def test_centre_outside_the_ct_is_a_clear_error(tiny_dataset: Path, tmp_path: Path) -> None:
    uid = next(iter(_series(tiny_dataset)))
    cache = ChunkCache(tmp_path / "cache", tiny_dataset)
    with pytest.raises(DataError, match=f"outside CT {uid}"):
        cache.chunk(uid, (1e5, 0.0, 0.0), CLASSIFIER_WIDTH)
    with pytest.raises(DataError, match="not found"):
        cache.volume("no.such.series")


def test_pickled_cache_reopens_without_handles(tiny_dataset: Path, tmp_path: Path,
                                               count_loads: list[str]) -> None:
    uid = next(iter(_series(tiny_dataset)))
    cache = ChunkCache(tmp_path / "cache", tiny_dataset, size_limit_bytes=10**9)
    expected = np.array(cache.volume(uid))
    state = cache.__getstate__()
    assert set(state) == {"directory", "data_root", "size_limit_bytes"}
    clone = pickle.loads(pickle.dumps(cache))
    np.testing.assert_array_equal(clone.volume(uid), expected)
    assert clone.size_limit_bytes == 10**9
    assert count_loads == [uid]


def _fill_in_process(args: tuple[Path, Path, list[str]]) -> dict[str, int]:
    cache_dir, data_root, uids = args
    cache = ChunkCache(cache_dir, data_root)
    return {uid: zlib.crc32(np.ascontiguousarray(cache.volume(uid))) for uid in uids}


def test_two_processes_filling_at_once_give_correct_volumes(tiny_dataset: Path, tmp_path: Path) -> None:
    series = _series(tiny_dataset)
    uids = sorted(series)
    expected = {uid: zlib.crc32(np.clip(load_ct(path).hu, HU_MIN, HU_MAX)) for uid, path in series.items()}
    jobs = [(tmp_path / "cache", tiny_dataset, uids), (tmp_path / "cache", tiny_dataset, uids[::-1])]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map(_fill_in_process, jobs)
    assert results == [expected, expected]
    fresh = ChunkCache(tmp_path / "cache", tiny_dataset)
    assert {uid: zlib.crc32(np.ascontiguousarray(fresh.volume(uid))) for uid in uids} == expected
    assert len(_volume_files(tmp_path / "cache")) == len(uids)
    assert not list((tmp_path / "cache" / "volumes").glob(".*.tmp"))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def _flip_byte(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size - 100)
        value = handle.read(1)[0]
        handle.seek(-1, 1)
        handle.write(bytes([value ^ 0x01]))


@pytest.mark.parametrize("damage", [_truncate, _flip_byte])
def test_damaged_entry_is_detected_and_rebuilt(tiny_dataset: Path, tmp_path: Path, damage,
                                               count_loads: list[str], caplog: pytest.LogCaptureFixture) -> None:
    uid, path = next(iter(_series(tiny_dataset).items()))
    expected = np.clip(load_ct(path).hu, HU_MIN, HU_MAX)
    ChunkCache(tmp_path / "cache", tiny_dataset).volume(uid)
    (entry,) = _volume_files(tmp_path / "cache")
    size = entry.stat().st_size
    damage(entry)
    with caplog.at_level(logging.WARNING, logger="p2ch_luna.data.cache"):
        volume = ChunkCache(tmp_path / "cache", tiny_dataset).volume(uid)
    np.testing.assert_array_equal(volume, expected)
    assert "invalid" in caplog.text
    assert count_loads == [uid, uid]
    assert entry.stat().st_size == size
    np.testing.assert_array_equal(ChunkCache(tmp_path / "cache", tiny_dataset).volume(uid), expected)
    assert count_loads == [uid, uid]  # the rebuilt entry is served again


def test_verify_checksums_entries_that_only_look_complete(tiny_dataset: Path, tmp_path: Path) -> None:
    uid = next(iter(_series(tiny_dataset)))
    cache = ChunkCache(tmp_path / "cache", tiny_dataset)
    assert cache.ensure_volume(uid) is True
    assert cache.ensure_volume(uid) is False
    _flip_byte(_volume_files(tmp_path / "cache")[0])
    assert cache.ensure_volume(uid) is False  # same size and header: only a checksum can tell
    assert cache.ensure_volume(uid, verify=True) is True
    assert cache.ensure_volume(uid, verify=True) is False


def test_format_version_bump_invalidates(tiny_dataset: Path, tmp_path: Path, count_loads: list[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    uid = next(iter(_series(tiny_dataset)))
    ChunkCache(tmp_path / "cache", tiny_dataset).volume(uid)
    ChunkCache(tmp_path / "cache", tiny_dataset).volume(uid)
    assert count_loads == [uid]
    monkeypatch.setattr(cache_module, "FORMAT_VERSION", cache_module.FORMAT_VERSION + 1)
    ChunkCache(tmp_path / "cache", tiny_dataset).volume(uid)
    assert count_loads == [uid, uid]
    monkeypatch.setattr(cache_module, "HU_MIN", HU_MIN + 1)
    ChunkCache(tmp_path / "cache", tiny_dataset).volume(uid)
    assert count_loads == [uid, uid, uid]


def test_changed_source_ct_is_rebuilt(tmp_path: Path, count_loads: list[str]) -> None:
    data_root = tmp_path / "data"
    path = data_root / "subset0" / "1.2.3.mhd"
    hu = np.full((5, 8, 8), -500, dtype=np.int16)
    _write_ct(path, hu, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (1.0, 0, 0, 0, 1, 0, 0, 0, 1))
    assert ChunkCache(tmp_path / "cache", data_root).volume("1.2.3").max() == -500
    _write_ct(path, hu + 100, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (1.0, 0, 0, 0, 1, 0, 0, 0, 1))
    raw = path.with_suffix(".raw")
    stat = raw.stat()
    os.utime(raw, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert ChunkCache(tmp_path / "cache", data_root).volume("1.2.3").max() == -400
    assert count_loads == ["1.2.3", "1.2.3"]


def test_size_bound_evicts_least_recently_used(tiny_dataset: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    uids = sorted(_series(tiny_dataset))
    probe = ChunkCache(tmp_path / "probe", tiny_dataset)
    sizes = {uid: probe.volume(uid).nbytes for uid in uids[:3]}
    index_bytes = probe.size_bytes() - sum(path.stat().st_size for path in _volume_files(tmp_path / "probe"))
    limit = index_bytes + sum(sizes.values()) - min(sizes.values()) // 2 + 4096
    monkeypatch.setattr(cache_module, "TOUCH_INTERVAL_S", 0.0)
    cache = ChunkCache(tmp_path / "cache", tiny_dataset, size_limit_bytes=limit)
    cache.volume(uids[0])
    cache.volume(uids[1])
    cache.chunk(uids[0], cache.geometry(uids[0]).irc_to_xyz((1, 1, 1)), (2, 2, 2))  # uids[1] is now oldest
    cache.volume(uids[2])
    assert cache.size_bytes() <= limit
    assert sum(path.stat().st_size for path in _volume_files(tmp_path / "cache")) <= limit
    assert len(_volume_files(tmp_path / "cache")) == 2
    fresh = ChunkCache(tmp_path / "cache", tiny_dataset)
    assert fresh.size_limit_bytes == limit  # the explicit bound is remembered
    records = fresh._records()
    assert {record["key"][-1] for record in records.values()} == {uids[0], uids[2]}


def test_entry_larger_than_the_bound_is_served_but_not_stored(tiny_dataset: Path, tmp_path: Path) -> None:
    uid = next(iter(_series(tiny_dataset)))
    cache = ChunkCache(tmp_path / "cache", tiny_dataset, size_limit_bytes=1000)
    assert cache.volume(uid).shape == load_ct(_series(tiny_dataset)[uid]).shape
    assert _volume_files(tmp_path / "cache") == []


def test_array_is_built_once_and_keyed_by_name(tiny_dataset: Path, tmp_path: Path) -> None:
    calls = []

    def build_mask() -> np.ndarray:
        calls.append("mask")
        mask = np.zeros((4, 5, 6), dtype=bool)
        mask[1, 2, 3] = True
        return mask

    cache = open_cache(resolve_paths(data_root=tiny_dataset, cache_dir=tmp_path / "cache"))
    first = cache.array("mask-v1/a", build_mask)
    again = ChunkCache(tmp_path / "cache", tiny_dataset).array("mask-v1/a", build_mask)
    assert calls == ["mask"]
    for values in (first, again):
        assert values.dtype == bool and values.sum() == 1 and values[1, 2, 3]
        assert not values.flags.writeable
    ChunkCache(tmp_path / "cache", tiny_dataset).array("mask-v2/a", build_mask)
    assert calls == ["mask", "mask"]
    empty = cache.array("positive-slices-v1/a", lambda: np.array([], dtype=np.int64))
    assert ChunkCache(tmp_path / "cache", tiny_dataset).array("positive-slices-v1/a", list).shape == (0,)
    assert empty.dtype == np.int64
    with pytest.raises(ValueError, match="numeric dtype"):
        cache.array("objects-v1", lambda: np.array([object()]))
