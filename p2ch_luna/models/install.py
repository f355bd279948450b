"""Install a checkpoint from a file or URL into a models folder, only once its SHA-256 matches.

The file is streamed into a hidden temporary file in the target folder while it is hashed; it is
moved into place (``os.replace``, atomic) only when the hash matches and it loads as a checkpoint.
Otherwise the temporary file is removed and the folder is as it was.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO

from p2ch_luna.errors import DataError, UsageError
from p2ch_luna.io.digest import file_digest
from p2ch_luna.models.checkpoint import LoadedCheckpoint, load_checkpoint

log = logging.getLogger(__name__)

URL_SCHEMES = ("http", "https", "file")
CHUNK_BYTES = 1 << 20
DOWNLOAD_TIMEOUT_S = 60
SHA256_PATTERN = re.compile(r"\A[0-9a-f]{64}\Z")


def normalised_sha256(text: str) -> str:
    """``text`` as 64 lower-case hexadecimal digits (an optional ``sha256:`` prefix is dropped)."""
    digest = text.strip().lower().removeprefix("sha256:")
    if not SHA256_PATTERN.match(digest):
        raise UsageError(f"--sha256 {text!r} is not 64 hexadecimal digits")
    return digest


def source_file_name(source: str) -> str:
    """The file name a path or URL ends with."""
    if _is_url(source):
        name = Path(urllib.parse.unquote(urllib.parse.urlparse(source).path)).name
    else:
        name = Path(source).name
    if not name:
        raise UsageError(f"{source} names no file; pass --name NAME")
    return name


def install_checkpoint(source: str, sha256: str, models_dir: Path, name: str | None = None) -> LoadedCheckpoint:
    """Copy or download ``source`` to ``models_dir / name`` (default: the source's file name).

    Returns the installed checkpoint, loaded. A hash mismatch, a file that is not a checkpoint, or a
    different file already at the target is a one-line :class:`DataError`, leaving nothing behind.
    """
    expected = normalised_sha256(sha256)
    name = name or source_file_name(source)
    if "/" in name or os.sep in name or name.startswith(".") or name in ("", ".."):
        raise UsageError(f"--name {name!r} must be a plain, non-hidden file name")
    target = models_dir / name
    if target.exists():
        if target.is_file() and file_digest(target) == expected:
            log.info("%s is already installed (same sha256)", target)
            return load_checkpoint(target)
        raise DataError(f"{target} already exists with other contents; pass --name NAME to install beside it")
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=models_dir)
    except OSError as error:
        raise DataError(f"cannot write to models folder {models_dir}: {error.strerror or error}") from error
    temporary_path = Path(temporary)
    try:
        with os.fdopen(handle, "wb") as output:
            actual = _copy_hashing(source, output)
            output.flush()
            os.fsync(output.fileno())
        if actual != expected:
            raise DataError(f"{source} has sha256 {actual}, not the expected {expected}: nothing installed")
        try:
            loaded = load_checkpoint(temporary_path, label=source)
        except DataError as error:
            raise DataError(f"{error}: nothing installed") from error
        os.replace(temporary_path, target)
    except OSError as error:
        raise DataError(f"could not install {source} into {models_dir}: {error.strerror or error}") from error
    finally:
        temporary_path.unlink(missing_ok=True)
    loaded.path = target
    log.info("installed %s (%s checkpoint, %s) from %s", target, loaded.task, loaded.model_name, source)
    return loaded


def _copy_hashing(source: str, output: IO[bytes]) -> str:
    digest = hashlib.sha256()
    try:
        stream: IO[bytes]
        if _is_url(source):
            stream = urllib.request.urlopen(source, timeout=DOWNLOAD_TIMEOUT_S)  # noqa: S310 (schemes checked)
        else:
            stream = open(Path(source).expanduser(), "rb")
        with stream:
            for block in iter(lambda: stream.read(CHUNK_BYTES), b""):
                digest.update(block)
                output.write(block)
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", None) or getattr(error, "strerror", None) or error
        raise DataError(f"could not read {source}: {reason}") from error
    return digest.hexdigest()


def _is_url(source: str) -> bool:
    scheme = urllib.parse.urlparse(source).scheme.lower()
    if scheme in URL_SCHEMES:
        return True
    if len(scheme) > 1:  # a one-letter scheme is a Windows drive
        raise UsageError(f"{source}: only {', '.join(URL_SCHEMES)} URLs or file paths can be installed")
    return False
