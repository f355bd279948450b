"""User-facing errors: one clear line, a non-zero exit, no traceback unless --debug."""

from __future__ import annotations


class LunaError(Exception):
    """An error caused by the user's input or environment (bad file, bad argument).

    The message is shown to the user as a single line, so it must name the file,
    row or argument at fault and, where possible, say how to fix it.
    """

    exit_code = 1


class UsageError(LunaError):
    """A wrong command-line usage (conflicting or missing arguments): exit code 2."""

    exit_code = 2


class DataError(LunaError):
    """Input data (CT file, CSV, checkpoint) that cannot be read or is invalid."""


def simpleitk_message(error: BaseException) -> str:
    """The useful line of a SimpleITK exception: its messages start with a C++ location and end with the cause."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
