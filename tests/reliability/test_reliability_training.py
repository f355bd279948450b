"""Training faults end to end: SIGKILL then --resume, Ctrl-C, a diverging loss, a full disk."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Callable

import pytest

from p2ch_luna.models.checkpoint import load_checkpoint
from tests.reliability.reliability_helpers import (
    Child,
    assert_no_partial_files,
    assert_one_line_error,
    checkpoint_files,
    file_size_limit,
    run,
    start,
    training_args,
)

pytestmark = pytest.mark.reliability

TRAINING = "p2ch_luna.training"
EPOCH_SIZE = 32
"""Eight batches of four: an epoch lasts long enough to be interrupted in the middle."""
RUN_OUTPUTS = (".state", ".config.json")
IN_SECOND_EPOCH_S = 0.2
KILL_WINDOW_S = 30.0
"""How long the loader workers are killed, again and again, before the run must have stopped."""


def last_state(models_dir: Path) -> Path | None:
    found = sorted(models_dir.glob("*.last.state")) if models_dir.is_dir() else []
    return found[0] if found else None


def assert_checkpoints_whole(models_dir: Path) -> dict[Path, int]:
    """Every *.state file loads; nothing but finished outputs and atomic temporary files is left; epochs."""
    assert_no_partial_files(models_dir, RUN_OUTPUTS)
    files = checkpoint_files(models_dir)
    assert files, f"no checkpoint under {models_dir}"
    return {path: load_checkpoint(path, expected_task="nodule").epoch for path in files}


def start_long_run_and_wait_for_second_epoch(luna_root: Path, work: Path, *extra: str,
                                             preexec_fn: Callable[[], None] | None = None) -> Child:
    child = start(TRAINING, *training_args(luna_root, work, "--epochs", "1000", "--epoch-size", str(EPOCH_SIZE),
                                           *extra), preexec_fn=preexec_fn)
    child.wait_for(lambda: last_state(work / "models") is not None, "the first epoch's checkpoint")
    time.sleep(IN_SECOND_EPOCH_S)
    return child


def test_sigkill_mid_epoch_then_resume_continues_from_last_checkpoint(luna_root: Path, tmp_path: Path) -> None:
    child = start_long_run_and_wait_for_second_epoch(luna_root, tmp_path)
    child.send_signal(signal.SIGKILL)
    assert child.finish()[0] == -signal.SIGKILL

    models_dir = tmp_path / "models"
    epochs = assert_checkpoints_whole(models_dir)
    resume = last_state(models_dir)
    done = epochs[resume]
    assert done >= 1
    assert len(epochs) == 2, "a .last.state without its run's .best.state"

    target = done + 1
    result = run(TRAINING, *training_args(luna_root, tmp_path, "--epochs", str(target),
                                          "--epoch-size", str(EPOCH_SIZE), "--resume", str(resume)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"from epoch {done + 1} " in result.stderr
    assert not re.search(rf"\bE{done} trn\b", result.stderr), "a finished epoch was trained again"
    epochs = assert_checkpoints_whole(models_dir)
    assert epochs[resume] == target
    assert len(epochs) == 2, "resume must write into the same run's checkpoints"
    loaded = load_checkpoint(resume, expected_task="nodule")
    assert loaded.samples_seen == target * EPOCH_SIZE


@pytest.mark.parametrize("loader", ["in-process", "batch ring"])
def test_ctrl_c_during_training_exits_130_and_keeps_the_checkpoint(luna_root: Path, tmp_path: Path,
                                                                   loader: str) -> None:
    if loader == "in-process":
        child = start_long_run_and_wait_for_second_epoch(luna_root, tmp_path)
        child.send_signal(signal.SIGINT)
    else:  # a terminal's Ctrl-C reaches the loader worker too: signal the whole process group
        child = start_long_run_and_wait_for_second_epoch(luna_root, tmp_path, "--num-workers", "1", "--batch-ring",
                                                         preexec_fn=os.setsid)
        os.killpg(child.process.pid, signal.SIGINT)
    code, _, err = child.finish()
    assert code == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "interrupted" in err.strip().splitlines()[-1]
    epochs = assert_checkpoints_whole(tmp_path / "models")
    assert min(epochs.values()) >= 1
    if loader == "batch ring":
        assert _group_ends(child.process.pid), "a loader worker outlived the interrupted training"


@pytest.mark.parametrize("loader", [["--num-workers", "1"], ["--num-workers", "1", "--batch-ring"]],
                         ids=["worker", "batch ring"])
def test_a_killed_loader_worker_stops_training_with_one_line(luna_root: Path, tmp_path: Path,
                                                               loader: list[str]) -> None:
    """As the kernel's out-of-memory killer would: SIGKILL the loader workers in the middle of a run.

    Epochs of 32 samples are short: a worker found at one moment may be one whose loader is already done
    (its death then goes unnoticed, rightly), so the loader workers are killed again until the run stops."""
    child = start_long_run_and_wait_for_second_epoch(luna_root, tmp_path, *loader)
    killed = 0
    deadline = time.monotonic() + KILL_WINDOW_S
    while child.process.poll() is None and time.monotonic() < deadline:
        for pid in _forked_children(child.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(0.2)
    assert killed, "no loader worker found"
    code, _, err = child.finish()
    assert_one_line_error(code, err, "DataLoader worker", "--num-workers", expected_code=1)
    assert min(assert_checkpoints_whole(tmp_path / "models").values()) >= 1


def _forked_children(pid: int) -> list[int]:
    """Process ids of ``pid``'s forked children, the loader workers: same command line, unlike a helper
    such as multiprocessing's resource tracker (Linux ``/proc``); none once ``pid`` has gone."""
    try:
        tasks = Path(f"/proc/{pid}/task")
        children = {int(child) for task in tasks.iterdir() for child in (task / "children").read_text().split()}
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    forked = []
    for child in sorted(children):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            if Path(f"/proc/{child}/cmdline").read_bytes() == command:
                forked.append(child)
    return forked


def _group_ends(group: int, timeout_s: float = 20.0) -> bool:
    """Whether every process of the process group exits within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_diverging_loss_stops_naming_the_batch_and_writes_no_checkpoint(luna_root: Path, tmp_path: Path) -> None:
    result = run(TRAINING, *training_args(luna_root, tmp_path, "--epochs", "2", "--epoch-size", str(EPOCH_SIZE),
                                          "--lr", "1e30"))
    message = assert_one_line_error(result.returncode, result.stderr, "not finite", "epoch 1", expected_code=1)
    assert re.search(r"batch \d+", message), message
    assert checkpoint_files(tmp_path / "models") == [], "a checkpoint of diverged weights was written"


def test_file_size_limit_while_saving_keeps_the_previous_checkpoint(trained_run: Path, luna_root: Path,
                                                                     tmp_path: Path) -> None:
    work = Path(shutil.copytree(trained_run, tmp_path / "work"))
    resume = last_state(work / "models")
    before = {path: path.read_bytes() for path in checkpoint_files(work / "models")}
    result = run(TRAINING, *training_args(luna_root, work, "--epochs", "2", "--epoch-size", "8",
                                          "--resume", str(resume)),
                 preexec_fn=file_size_limit(len(before[resume]) // 2))
    # The first write of the epoch fails: the .best.state when the epoch is a new best (it is written
    # before the .last.state), else the .last.state; either way the message names the run's checkpoint.
    run_stem = resume.name.removesuffix(".last.state")
    message = assert_one_line_error(result.returncode, result.stderr, run_stem, "File too large", expected_code=1)
    assert re.search(re.escape(run_stem) + r"\.(best|last)\.state", message), message
    assert {path: path.read_bytes() for path in checkpoint_files(work / "models")} == before
    epochs = assert_checkpoints_whole(work / "models")
    assert epochs[resume] == 1
    assert not [path for path in (work / "models").iterdir() if path.name.endswith(".tmp")]
