"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Write to a temporary file in the same folder, flush and fsync, then
``os.replace`` it over the target. If writing fails (disk full, file-size limit,
Ctrl-C) the temporary file is removed and the previous file is left untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

from p2ch_luna.errors import LunaError


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; replace ``path`` on success."""
    if "w" not in mode:
        raise ValueError("atomic_open is for writing ('w' or 'wb')")
    with atomic_path(path) as tmp_path, open(tmp_path, mode) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path`` for writers that need a file name.

    ``suffix`` keeps the extension some writers look at (e.g. ``.png``). The file
    is moved over ``path`` when the block ends without an exception.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + suffix, dir=target.parent)
    except OSError as error:
        raise LunaError(f"could not write {target}: {error.strerror or error}") from error
    _apply_umask(fd)
    os.close(fd)
    try:
        yield Path(tmp_name)
        os.replace(tmp_name, target)
    except OSError as error:
        _remove_quietly(tmp_name)
        raise LunaError(f"could not write {target}: {error.strerror or error}") from error
    except BaseException:
        _remove_quietly(tmp_name)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def _apply_umask(fd: int) -> None:
    """Give a temporary file the permissions a plain ``open`` would (mkstemp uses 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)


def _remove_quietly(name: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name)
