"""Helpers of the reliability tests: the commands run as subprocesses and what a clean failure looks like.

The faults (SIGKILL, Ctrl-C, file-size limits, concurrent writers) need a real
process each; every child gets ``OMP_NUM_THREADS=1`` so a few of them run side
by side on two cores without oversubscribing.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import pytest

from tests.locations import REPO

TEMP_FILE = re.compile(r"^\..+\.tmp(\.\w+)?$")
"""What :mod:`p2ch_luna.io.atomic` names its temporary files: ``.<name>.<random>.tmp[<suffix>]``."""
COMMAND_TIMEOUT_S = 120
CHUNK_SHAPE = ("16", "16", "16")
"""The smallest chunk the classifier takes (four 2x poolings): keeps training on the CPU quick."""



def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    env.pop("LOCAL_RANK", None)
    return env


def _with_default_sigint(preexec_fn: Callable[[], None] | None) -> Callable[[], None]:
    """``preexec_fn`` that first restores SIGINT's default disposition in the child.

    A test runner started in the background (``cmd &`` in a non-interactive
    shell) inherits SIGINT ignored, and so would the child; then Python
    installs no KeyboardInterrupt handler and the Ctrl-C tests would test nothing.
    """
    def prepare() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if preexec_fn is not None:
            preexec_fn()
    return prepare


class Child:
    """A command running in the background; its output goes to files so a full pipe never blocks it."""

    def __init__(self, args: Sequence[str], preexec_fn: Callable[[], None] | None = None) -> None:
        self.out = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")
        self.err = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")
        self.process = subprocess.Popen(list(args), env=child_env(), cwd=REPO, stdout=self.out, stderr=self.err,
                                        preexec_fn=_with_default_sigint(preexec_fn))

    def stderr(self) -> str:
        self.err.flush()
        self.err.seek(0)
        return self.err.read()

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def finish(self, timeout: float = COMMAND_TIMEOUT_S) -> tuple[int, str, str]:
        """Wait for the exit; (exit code, stdout, stderr)."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"{self.process.args} did not finish in {timeout} s; stderr:\n{self.stderr()[-3000:]}")
        self.out.seek(0)
        return self.process.returncode, self.out.read(), self.stderr()

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = COMMAND_TIMEOUT_S,
                 poll_s: float = 0.02) -> None:
        """Poll ``condition`` until it holds; fail (with the child's stderr) if the child exits first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(f"the command exited ({self.process.returncode}) before {what}; "
                            f"stderr:\n{self.stderr()[-3000:]}")
            if time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(poll_s)


def start(module: str, *args: str, preexec_fn: Callable[[], None] | None = None) -> Child:
    """``python -m <module> <args>`` in the background."""
    return Child([sys.executable, "-m", module, *args], preexec_fn=preexec_fn)


def run(module: str, *args: str, preexec_fn: Callable[[], None] | None = None,
        timeout: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` to completion."""
    return subprocess.run([sys.executable, "-m", module, *args], env=child_env(), cwd=REPO, capture_output=True,
                          encoding="utf-8", errors="replace", preexec_fn=preexec_fn, timeout=timeout)


def file_size_limit(limit_bytes: int) -> Callable[[], None]:
    """A ``preexec_fn`` giving the child RLIMIT_FSIZE ``limit_bytes`` with SIGXFSZ ignored (writes get EFBIG)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return apply


def assert_one_line_error(code: int, err: str, *needles: str, expected_code: int | None = None) -> str:
    """A failed command's stderr ends in one ``<prog>: error: ...`` line naming ``needles``; no traceback."""
    assert code != 0, f"the command succeeded; stderr:\n{err[-2000:]}"
    if expected_code is not None:
        assert code == expected_code, f"exit code {code}, expected {expected_code}; stderr:\n{err[-2000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines, "no error message"
    message = lines[-1]
    assert ": error: " in message, f"last stderr line is not a one-line error: {message!r}\n{err[-2000:]}"
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def checkpoint_files(models_dir: Path) -> list[Path]:
    return sorted(models_dir.rglob("*.state"))


def assert_no_partial_files(folder: Path, allowed_suffixes: Sequence[str]) -> None:
    """Every file under ``folder`` is either a finished output or an atomic writer's temporary file."""
    for path in folder.rglob("*"):
        if path.is_file():
            assert path.name.endswith(tuple(allowed_suffixes)) or TEMP_FILE.match(path.name), path


def training_args(data_root: Path, work: Path, *extra: str) -> list[str]:
    """``nodule`` training on the tiny dataset with tiny chunks and epochs, outputs under ``work``."""
    return ["nodule", "--data-root", str(data_root), "--cache-dir", str(work / "cache"),
            "--models-dir", str(work / "models"), "--runs-dir", str(work / "runs"), "--device", "cpu",
            "--chunk-shape", *CHUNK_SHAPE, "--batch-size", "4", "--val-size", "8", *extra]




def diagnose_model_args(models: dict[str, Path]) -> list[str]:
    return ["--segmentation-path", str(models["segmentation"]), "--classification-path", str(models["nodule"]),
            "--device", "cpu"]

