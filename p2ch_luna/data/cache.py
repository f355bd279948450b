"""Disk cache of clipped CT volumes and derived arrays, cut into chunks on the fly.

The book memoises every candidate's chunk as a pickled float32 array in a
``diskcache.FanoutCache``: the first epoch reads a whole CT per chunk, and the
cache ends up several times larger than the CTs. Here each series is stored
once, as an ``int16`` ``.npy`` file of HU clipped to ``[HU_MIN, HU_MAX]``, and
chunks are cut from a read-only memory map (``ct.extract_chunk`` semantics).

Layout under the cache folder::

    index/               diskcache.Cache: one record per entry (shape, dtype,
                         size, CRC-32, geometry, source file stats) and its
                         last-use time
    volumes/<key>.npy    one clipped int16 volume per series
    arrays/<key>.npy     derived arrays from :meth:`ChunkCache.array` (masks ...)

Safety:

- keys hash everything that changes a value (format version, HU clip, data
  folder, series UID or array name), so a format change never serves stale data;
- files are written to a unique temporary name, fsynced and ``os.replace``d,
  then registered; two processes building the same entry both write correct
  files and the last one wins;
- the first time a process opens an entry it checks size, header and CRC-32 of
  the whole file; a mismatch (truncated, flipped or half-written file) is
  logged and the entry rebuilt, never returned; a changed source ``.mhd``/``.raw``
  (size or mtime) also triggers a rebuild;
- entries beyond the size bound are evicted least recently used first.

A :class:`ChunkCache` opens its index lazily and pickles without open handles,
so one object can be handed to every DataLoader worker.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import diskcache
import numpy as np
from numpy.typing import ArrayLike

from p2ch_luna.errors import DataError
from p2ch_luna.geometry import Geometry
from p2ch_luna.io.atomic import atomic_open
from p2ch_luna.io.ct import HU_MAX, HU_MIN, extract_chunk, find_series_path, load_ct
from p2ch_luna.io.metaimage import read_metaimage_header
from p2ch_luna.paths import Paths

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bump when the stored bytes or their meaning change: every key includes it."""
DEFAULT_SIZE_LIMIT = 300 * 10**9
"""Default bound on the cache's size in bytes (the book's FanoutCache used 3e11)."""
INDEX_SIZE_LIMIT = 256 * 2**20
"""Bound on the diskcache index itself (records are a few hundred bytes each)."""
TOUCH_INTERVAL_S = 60.0
"""How often (at most) a process refreshes an entry's last-use time while reading it."""
ORPHAN_GRACE_S = 600.0
"""Unregistered files younger than this may be another process's write in flight."""
_CHECKSUM_BLOCK = 16 * 2**20
_VOLUME_KIND = "volumes"
_ARRAY_KIND = "arrays"
_ENTRY_PREFIX = "entry/"
_USED_PREFIX = "used/"
_SIZE_LIMIT_SETTING = "settings/size_limit"


@dataclass
class _Volume:
    hu: np.ndarray
    geometry: Geometry
    digest: str

    def __post_init__(self) -> None:
        # Axis-aligned CTs (LUNA16's are) get a scalar world-to-voxel path that does
        # the same float operations as Geometry.xyz_to_irc, ~10x faster per call.
        direction = self.geometry.direction
        signs = np.diag(direction)
        axis_aligned = np.array_equal(direction, np.diag(signs)) and np.all(np.abs(signs) == 1)
        self.axis_aligned = bool(axis_aligned)
        self.origin = tuple(float(v) for v in self.geometry.origin_xyz)
        self.signs = tuple(float(v) for v in signs)
        self.spacing = tuple(float(v) for v in self.geometry.spacing_xyz)

    def center_irc(self, center_xyz: ArrayLike, series_uid: str) -> np.ndarray:
        """Nearest voxel of a world point; DataError when it lies outside the CT."""
        shape = self.geometry.shape_irc
        try:
            if not self.axis_aligned:
                raise ValueError
            col, row, index = (round((float(value) - origin) * sign / spacing) for value, origin, sign, spacing
                               in zip(center_xyz, self.origin, self.signs, self.spacing, strict=True))
        except (ValueError, TypeError, OverflowError):
            index, row, col = (int(v) for v in self.geometry.xyz_to_irc(center_xyz))
        if not (0 <= index < shape[0] and 0 <= row < shape[1] and 0 <= col < shape[2]):
            xyz = ", ".join(f"{v:.1f}" for v in np.asarray(center_xyz, dtype=float))
            raise DataError(f"centre ({xyz}) mm lies outside CT {series_uid} "
                            f"(voxel {(index, row, col)}, shape {shape})")
        return np.array((index, row, col), dtype=np.int64)


class ChunkCache:
    """Clipped int16 CT volumes and derived arrays of one data folder, cached on disk.

    ``size_limit_bytes`` bounds the cache folder; ``None`` uses the bound last
    set explicitly for this folder, else :data:`DEFAULT_SIZE_LIMIT`.
    """

    def __init__(self, directory: str | os.PathLike, data_root: str | os.PathLike,
                 size_limit_bytes: int | None = None) -> None:
        if size_limit_bytes is not None and size_limit_bytes <= 0:
            raise ValueError("size_limit_bytes must be positive")
        self.directory = Path(directory).expanduser().resolve()
        self.data_root = Path(data_root).expanduser().resolve()
        self._explicit_limit = size_limit_bytes
        self._reset()

    def _reset(self) -> None:
        self._index_handle: diskcache.Cache | None = None
        self._limit: int | None = None
        self._volumes: dict[str, _Volume] = {}
        self._geometries: dict[str, Geometry] = {}
        self._arrays: dict[str, tuple[str, np.ndarray]] = {}
        self._touched: dict[str, float] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": self.directory, "data_root": self.data_root,
                "size_limit_bytes": self._explicit_limit}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.directory = state["directory"]
        self.data_root = state["data_root"]
        self._explicit_limit = state["size_limit_bytes"]
        self._reset()

    def close(self) -> None:
        """Close the index and forget open maps (they reopen on next use)."""
        if self._index_handle is not None:
            self._index_handle.close()
        self._reset()

    @property
    def size_limit_bytes(self) -> int:
        if self._limit is None:
            index = self._index()
            if self._explicit_limit is not None:
                index.set(_SIZE_LIMIT_SETTING, int(self._explicit_limit))
                self._limit = int(self._explicit_limit)
            else:
                self._limit = int(index.get(_SIZE_LIMIT_SETTING, DEFAULT_SIZE_LIMIT))
        return self._limit

    # -- public API ---------------------------------------------------------

    def volume(self, series_uid: str) -> np.ndarray:
        """Read-only int16 ``(I, R, C)`` HU of a series, clipped to ``[HU_MIN, HU_MAX]``."""
        return self._volume(series_uid).hu

    def geometry(self, series_uid: str) -> Geometry:
        """Geometry of a series, from the index (the volume is built if missing)."""
        cached = self._volumes.get(series_uid)
        if cached is not None:
            return cached.geometry
        geometry = self._geometries.get(series_uid)
        if geometry is None:
            record = self._valid_record(self._volume_key(series_uid), series_uid)
            if record is None:
                return self._volume(series_uid).geometry
            geometry = _geometry_from_record(record)
            self._geometries[series_uid] = geometry
        return geometry

    def chunk(self, series_uid: str, center_xyz: ArrayLike, width_irc: Sequence[int],
              out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The clipped int16 ``width_irc`` chunk around a world point and its voxel centre.

        Same values and border rule as ``load_ct(...).chunk(center_xyz, width_irc)``;
        written into ``out`` (int16, shape ``width_irc``) when given.
        """
        volume = self._volumes.get(series_uid) or self._volume(series_uid)
        self._maybe_touch(volume.digest)
        center_irc = volume.center_irc(center_xyz, series_uid)
        return extract_chunk(volume.hu, center_irc, width_irc, clip=False, out=out), center_irc

    def array(self, name: str, build: Callable[[], ArrayLike]) -> np.ndarray:
        """A derived array cached under ``name`` (read-only); ``build()`` makes it on a miss.

        ``name`` must change whenever the value would: include the series UID and
        a version of the builder, e.g. ``"nodule-mask-v1/<uid>"``.
        """
        cached = self._arrays.get(name)
        if cached is not None:
            self._maybe_touch(cached[0])
            return cached[1]
        digest, parts = self._key(_ARRAY_KIND, name)
        record = self._valid_record((digest, parts), name)
        values = self._open(record) if record is not None else None
        if values is None:
            values = np.asarray(build())
            if values.dtype.hasobject:
                raise ValueError(f"cached array {name!r} must have a numeric dtype, got {values.dtype}")
            values = self._store(_ARRAY_KIND, digest, parts, values, {})
        self._arrays[name] = digest, values
        self._maybe_touch(digest)
        return values

    def ensure_volume(self, series_uid: str, verify: bool = False) -> bool:
        """Make sure a series' volume is cached; True when it had to be (re)built.

        Without ``verify`` an entry whose record, source and file size match is
        kept; with it the file's checksum is checked as well.
        """
        key = self._volume_key(series_uid)
        record = self._valid_record(key, series_uid)
        if record is not None and self._open(record, verify=verify) is not None:
            return False
        self._build_volume(series_uid, key)
        return True

    def size_bytes(self) -> int:
        """Bytes the cache holds: registered files plus the index."""
        records = self._records()
        return sum(record["nbytes"] for record in records.values()) + self._index().volume()

    # -- keys and records ---------------------------------------------------

    def _key(self, kind: str, name: str) -> tuple[str, tuple]:
        parts = (kind, FORMAT_VERSION, HU_MIN, HU_MAX, str(self.data_root), name)
        return hashlib.blake2b(repr(parts).encode(), digest_size=16).hexdigest(), parts

    def _volume_key(self, series_uid: str) -> tuple[str, tuple]:
        return self._key(_VOLUME_KIND, series_uid)

    def _index(self) -> diskcache.Cache:
        if self._index_handle is None:
            self._index_handle = diskcache.Cache(
                str(self.directory / "index"), size_limit=INDEX_SIZE_LIMIT,
                eviction_policy="least-recently-stored",
            )
        return self._index_handle

    def _valid_record(self, key: tuple[str, tuple], what: str) -> dict[str, Any] | None:
        """The entry's record when it matches the key and its source is unchanged."""
        digest, parts = key
        record = self._index().get(_ENTRY_PREFIX + digest)
        if record is None or record.get("key") != parts:
            return None
        for path, size, mtime_ns in record.get("sources", ()):
            try:
                stat = os.stat(path)
            except OSError:
                continue  # source gone: serve the cache (the key holds the data folder)
            if (stat.st_size, stat.st_mtime_ns) != (size, mtime_ns):
                log.info("source %s of cached %s changed; rebuilding", path, what)
                return None
        return record

    def _records(self) -> dict[str, dict[str, Any]]:
        index = self._index()
        records = {}
        for key in list(index.iterkeys()):
            if isinstance(key, str) and key.startswith(_ENTRY_PREFIX):
                record = index.get(key)
                if record is not None:
                    records[key[len(_ENTRY_PREFIX):]] = record
        return records

    def _maybe_touch(self, digest: str) -> None:
        now = time.monotonic()
        if now - self._touched.get(digest, -np.inf) >= TOUCH_INTERVAL_S:
            self._touched[digest] = now
            self._index().set(_USED_PREFIX + digest, time.time())

    # -- volumes ------------------------------------------------------------

    def _volume(self, series_uid: str) -> _Volume:
        cached = self._volumes.get(series_uid)
        if cached is not None:
            return cached
        key = self._volume_key(series_uid)
        record = self._valid_record(key, series_uid)
        hu = self._open(record) if record is not None else None
        if hu is None:
            record, hu = self._build_volume(series_uid, key)
        volume = _Volume(hu, _geometry_from_record(record), key[0])
        self._volumes[series_uid] = volume
        self._maybe_touch(key[0])
        return volume

    def _build_volume(self, series_uid: str, key: tuple[str, tuple]) -> tuple[dict[str, Any], np.ndarray]:
        path = find_series_path(self.data_root, series_uid)
        ct = load_ct(path, series_uid)
        hu = np.clip(ct.hu, HU_MIN, HU_MAX)
        geometry = ct.geometry
        extra = {
            "origin_xyz": geometry.origin_xyz.tolist(),
            "spacing_xyz": geometry.spacing_xyz.tolist(),
            "direction": geometry.direction.tolist(),
            "sources": _source_stats(path),
        }
        digest, parts = key
        stored = self._store(_VOLUME_KIND, digest, parts, hu, extra)
        log.debug("cached volume of %s (%d bytes)", series_uid, hu.nbytes)
        record = {"key": parts, "shape": hu.shape, **extra}
        return record, stored

    # -- files --------------------------------------------------------------

    def _store(self, kind: str, digest: str, parts: tuple, values: np.ndarray,
               extra: dict[str, Any]) -> np.ndarray:
        """Write ``values`` atomically, register it and return a read-only view of it."""
        values = np.ascontiguousarray(values)
        header = _npy_header(values)
        nbytes = len(header) + values.nbytes
        if nbytes > self.size_limit_bytes:
            log.warning("%s entry of %d bytes exceeds the cache bound of %d bytes; not cached",
                        kind, nbytes, self.size_limit_bytes)
            values = values.copy()
            values.setflags(write=False)
            return values
        flat = values.reshape(-1).view(np.uint8)
        relative = f"{kind}/{digest}.npy"
        path = self.directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "wb") as handle:
            handle.write(header)
            handle.write(flat)
        record = {
            "key": parts, "format": FORMAT_VERSION, "file": relative, "nbytes": nbytes,
            "shape": tuple(values.shape), "dtype": values.dtype.str,
            "checksum": zlib.crc32(flat, zlib.crc32(header)), **extra,
        }
        index = self._index()
        index.set(_ENTRY_PREFIX + digest, record)
        index.set(_USED_PREFIX + digest, time.time())
        self._touched[digest] = time.monotonic()
        self._enforce_bound(keep=digest)
        opened = self._open(record, verify=False)
        if opened is None:  # evicted or replaced meanwhile by another process
            values = values.copy()
            values.setflags(write=False)
            return values
        return opened

    def _open(self, record: dict[str, Any], verify: bool = True) -> np.ndarray | None:
        """A read-only map of the entry's file, or None when it is missing or corrupt."""
        path = self.directory / record["file"]
        try:
            with open(path, "rb") as handle:
                problem = _check_file(handle, record, verify)
                if problem is not None:
                    log.warning("cache entry %s is invalid (%s); rebuilding", path, problem)
                    return None
                offset = handle.tell()
                shape, dtype = tuple(record["shape"]), np.dtype(record["dtype"])
                if int(np.prod(shape)) == 0:
                    values = np.empty(shape, dtype=dtype)
                    values.setflags(write=False)
                    return values
                mapped = np.memmap(handle, dtype=dtype, mode="r", offset=offset, shape=shape)
        except FileNotFoundError:
            log.info("cache file %s is missing; rebuilding", path)
            return None
        except (OSError, ValueError) as error:
            log.warning("cache entry %s could not be read (%s); rebuilding", path, error)
            return None
        return np.asarray(mapped)

    def _enforce_bound(self, keep: str) -> None:
        """Evict least recently used entries until the cache fits its bound; drop orphans."""
        index = self._index()
        records = self._records()
        total = sum(record["nbytes"] for record in records.values()) + index.volume()
        limit = self.size_limit_bytes
        if total > limit:
            last_used = {digest: index.get(_USED_PREFIX + digest, 0.0) for digest in records}
            for digest in sorted(records, key=last_used.__getitem__):
                if total <= limit:
                    break
                if digest == keep:
                    continue
                record = records.pop(digest)
                index.delete(_ENTRY_PREFIX + digest)
                index.delete(_USED_PREFIX + digest)
                _unlink_quietly(self.directory / record["file"])
                total -= record["nbytes"]
                log.info("evicted %s from the cache (bound %d bytes)", record["file"], limit)
        self._remove_orphans({record["file"] for record in records.values()})

    def _remove_orphans(self, registered: set[str]) -> None:
        """Remove unregistered files old enough not to be another process's write in flight."""
        now = time.time()
        for kind in (_VOLUME_KIND, _ARRAY_KIND):
            folder = self.directory / kind
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                if f"{kind}/{path.name}" in registered:
                    continue
                try:
                    if now - path.stat().st_mtime > ORPHAN_GRACE_S:
                        path.unlink()
                except OSError:
                    continue


def open_cache(paths: Paths, size_limit_bytes: int | None = None) -> ChunkCache:
    """The chunk cache of ``paths.data_root`` in ``paths.cache_dir``."""
    return ChunkCache(paths.cache_dir, paths.data_root, size_limit_bytes)


def _npy_header(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, np.lib.format.header_data_from_array_1_0(values))
    return buffer.getvalue()


def _check_file(handle: io.BufferedReader, record: dict[str, Any], verify: bool) -> str | None:
    """Why the open file does not match its record (None when it does); leaves it after the header."""
    size = os.fstat(handle.fileno()).st_size
    if size != record["nbytes"]:
        return f"{size} bytes, expected {record['nbytes']}"
    if verify:
        checksum = 0
        block = bytearray(_CHECKSUM_BLOCK)
        view = memoryview(block)
        while count := handle.readinto(block):
            checksum = zlib.crc32(view[:count], checksum)
        if checksum != record["checksum"]:
            return "checksum mismatch"
        handle.seek(0)
    if np.lib.format.read_magic(handle) != (1, 0):
        return "unexpected .npy version"
    shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(handle)
    if fortran_order or tuple(shape) != tuple(record["shape"]) or dtype.str != record["dtype"]:
        return f"header {shape} {dtype.str} does not match {tuple(record['shape'])} {record['dtype']}"
    return None


def _geometry_from_record(record: dict[str, Any]) -> Geometry:
    return Geometry(np.array(record["origin_xyz"]), np.array(record["spacing_xyz"]),
                    np.array(record["direction"]), tuple(record["shape"]))


def _source_stats(path: Path) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of a CT's header and, for MetaImage, its data file."""
    paths = [path]
    if path.suffix.lower() == ".mhd":
        data_file = read_metaimage_header(path).get("ElementDataFile", "LOCAL")
        if data_file.upper() not in ("LOCAL", "LIST") and "%" not in data_file:
            paths.append(path.parent / data_file)
    stats = []
    for source in paths:
        stat = source.stat()
        stats.append((str(source), stat.st_size, stat.st_mtime_ns))
    return stats


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
