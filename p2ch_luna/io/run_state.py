"""The JSON state file of a resumable multi-stage command (``python -m p2ch_luna.cv``, ``training all``): the
settings it was started with and what is done, written atomically; a rerun continues only with the same
settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from p2ch_luna.errors import UsageError
from p2ch_luna.io.atomic import atomic_write_text


def read_run_state(path: Path, settings: Mapping[str, Any], *, kind: str, entries: str, folder_flag: str,
                   version: int, free_keys: Sequence[str] = ()) -> dict[str, Any]:
    """The state at ``path`` when it was written with ``settings`` (``free_keys`` aside, which take the new
    values), or a fresh one with an empty ``entries`` mapping. A state of other settings, or a file that is
    not one, is a :class:`UsageError` naming the file, the settings that differ and ``folder_flag``."""
    wanted = json.loads(json.dumps(dict(settings)))
    if not path.is_file():
        return {"version": version, "settings": wanted, entries: {}}
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"{path} is not a {kind} state ({error}); remove it to start over") from None
    recorded = {key: value for key, value in (state.get("settings") or {}).items() if key not in free_keys}
    current = {key: value for key, value in wanted.items() if key not in free_keys}
    if recorded != current:
        changed = sorted(key for key in current if recorded.get(key) != current[key])
        raise UsageError(f"{path} was written with other settings ({', '.join(changed)}): use another "
                         f"{folder_flag} or remove it to start over")
    state["settings"] = wanted
    state.setdefault(entries, {})
    return state


def write_run_state(path: Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` atomically (a crash leaves the former state)."""
    atomic_write_text(path, json.dumps(state, indent=2) + "\n")
