"""SHA-256 of a file's bytes, read in blocks (cache keys, installed checkpoints)."""

from __future__ import annotations

import hashlib
from pathlib import Path

DIGEST_BLOCK = 1 << 20
"""Bytes read at a time."""


def file_digest(path: Path) -> str:
    """Hex SHA-256 of the bytes of ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(DIGEST_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()
