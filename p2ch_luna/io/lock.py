"""A lock on an output folder, so that two runs never write into the same one at once.

The lock is a file beside the folder (``.<name>.lock``, the folder itself may not exist yet and is filled by
moving finished files in), created with ``O_CREAT | O_EXCL`` and holding the owner's process id. A lock whose
process is gone (killed, machine restarted) is taken over with a warning; the lock is removed when its holder
leaves the ``with`` block, also on errors and Ctrl-C.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

from p2ch_luna.errors import LunaError

log = logging.getLogger(__name__)


def lock_path(folder: Path) -> Path:
    """Where the lock on ``folder`` lives: ``.<name>.lock`` beside it."""
    folder = Path(folder).absolute()
    return folder.parent / f".{folder.name}.lock"


def _holder(path: Path) -> int | None:
    """The process id written in the lock file ``path``; None where it holds none (yet)."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _create(path: Path) -> bool:
    """Create the lock file holding this process's id; False where it exists."""
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w") as file:
        file.write(f"{os.getpid()}\n")
    return True


@contextlib.contextmanager
def folder_lock(folder: Path, flag: str = "--output") -> Iterator[Path]:
    """Hold the lock on ``folder`` (named ``flag`` in messages) for the ``with`` block; yields the lock file.

    Raises :class:`LunaError` (one line) where another live process holds it."""
    path = lock_path(folder)
    created_parents = [parent for parent in (path.parent, *path.parent.parents) if not parent.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LunaError(f"{flag} {folder}: cannot create {path.parent} ({error.strerror or error})") from None
    try:
        acquired = _create(path)
    except OSError as error:
        raise LunaError(f"{flag} {folder}: cannot create the lock {path} ({error.strerror or error})") from None
    if not acquired:
        pid = _holder(path)
        if pid is None or _alive(pid):
            holder = f"process {pid}" if pid is not None else "another process"
            raise LunaError(f"{flag} {folder} is in use by {holder} (lock {path}); wait for it to finish or "
                            "choose another folder")
        log.warning("%s %s: taking over the lock %s of process %d, which is no longer running", flag, folder,
                    path, pid)
        path.unlink(missing_ok=True)
        if not _create(path):
            raise LunaError(f"{flag} {folder} is in use by another process (lock {path}); wait for it to finish "
                            "or choose another folder")
    try:
        yield path
    finally:
        if _holder(path) == os.getpid():
            path.unlink(missing_ok=True)
        for parent in created_parents:  # deepest first: only those this lock created, where left empty
            with contextlib.suppress(OSError):
                parent.rmdir()
