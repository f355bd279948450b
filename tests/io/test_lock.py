"""The output folder's lock: a second diagnose into the same --output is refused; stale locks are taken over."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from p2ch_luna.diagnose import cli as diagnose_cli
from p2ch_luna.errors import LunaError
from p2ch_luna.io.lock import folder_lock, lock_path


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_second_diagnose_into_a_locked_output_is_refused_with_one_line(
        tiny_dataset: Path, untrained_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    with folder_lock(out) as lock:
        assert lock.read_text().strip() == str(os.getpid())
        code = diagnose_cli.main(["--validation", "--data-root", str(tiny_dataset),
                                  "--models-dir", str(untrained_models), "--output", str(out), "--device", "cpu"])
        error = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(error) == 1, error
        assert f"--output {out} is in use by process {os.getpid()}" in error[0]
        assert lock.exists()  # still ours
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_stale_lock_is_taken_over_with_a_warning_and_removed_at_exit(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    stale = lock_path(out)
    dead = _dead_pid()
    stale.write_text(f"{dead}\n")
    with caplog.at_level(logging.WARNING), folder_lock(out) as lock:
        assert lock == stale and lock.read_text().strip() == str(os.getpid())
    assert f"of process {dead}, which is no longer running" in caplog.text
    assert not stale.exists()


def test_the_lock_goes_on_errors_and_its_created_parent_folders_too(tmp_path: Path) -> None:
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(RuntimeError, match="failed"), folder_lock(out) as lock:
        assert lock.exists()
        raise RuntimeError("failed")
    assert sorted(tmp_path.iterdir()) == []


def test_a_live_holder_in_another_process_refuses_the_lock(tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock_path(out).write_text(f"{holder.pid}\n")
        with pytest.raises(LunaError, match=f"is in use by process {holder.pid}"), folder_lock(out):
            pass
        assert lock_path(out).read_text().strip() == str(holder.pid)  # left to its holder
    finally:
        holder.kill()
        holder.wait()
