"""Tests for p2ch_luna.cli (exit codes, one-line errors) and p2ch_luna.io.atomic (atomic writes)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from p2ch_luna.cli import EXIT_INTERRUPTED, make_parser, run_command
from p2ch_luna.errors import DataError, LunaError, UsageError
from p2ch_luna.io.atomic import atomic_open, atomic_path, atomic_write_bytes, atomic_write_text
from tests.locations import REPO


def raising(error: BaseException):
    def body(args: argparse.Namespace) -> int:
        raise error
    return body


def run(body, argv: list[str]) -> int:
    return run_command(body, make_parser("p2ch-test", "a test command"), argv)


def test_success_returns_body_result() -> None:
    assert run(lambda args: None, []) == 0
    assert run(lambda args: 3, []) == 3


@pytest.mark.parametrize("error, code", [(LunaError("broken"), 1), (DataError("bad file x.mhd"), 1),
                                         (UsageError("use --a or --b"), 2)])
def test_luna_errors_become_one_line_and_exit_code(capsys: pytest.CaptureFixture, error: LunaError,
                                                   code: int) -> None:
    assert run(raising(error), []) == code
    stderr = capsys.readouterr().err
    assert stderr == f"p2ch-test: error: {error}\n"
    assert "Traceback" not in stderr


def test_an_error_from_a_loader_worker_is_shown_as_its_own_one_line_message(capsys: pytest.CaptureFixture) -> None:
    torch_utils = pytest.importorskip("torch._utils")
    try:
        raise DataError("CT a.mhd: data file a.raw holds 10 bytes, expected 20 (truncated)")
    except DataError:  # what a DataLoader worker sends back, re-raised as the main process does
        wrapped = torch_utils.ExceptionWrapper(where="in DataLoader worker process 3")
    with pytest.raises(DataError) as raised:
        wrapped.reraise()
    assert len(str(raised.value).splitlines()) > 3  # torch's message carries the worker's traceback
    assert run(raising(raised.value), []) == 1
    assert capsys.readouterr().err == ("p2ch-test: error: CT a.mhd: data file a.raw holds 10 bytes, expected 20 "
                                       "(truncated) (in DataLoader worker process 3)\n")


def test_a_dead_loader_worker_is_one_line_with_a_hint(capsys: pytest.CaptureFixture) -> None:
    died = RuntimeError("DataLoader worker (pid 123) is killed by signal: Killed. ")
    assert run(raising(died), []) == 1
    assert capsys.readouterr().err == ("p2ch-test: error: DataLoader worker (pid 123) is killed by signal: Killed: "
                                       "out of memory? Try fewer --num-workers or a smaller --batch-size\n")
    with pytest.raises(RuntimeError, match="something else"):
        run(raising(RuntimeError("something else")), [])


def test_a_failing_background_thread_is_one_warning_line(capsys: pytest.CaptureFixture) -> None:
    def body(args: argparse.Namespace) -> int:
        thread = threading.Thread(target=lambda: 1 / 0, name="helper")
        thread.start()
        thread.join()
        return 0

    before = threading.excepthook
    assert run(body, []) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "WARNING" in err and "background thread helper stopped: ZeroDivisionError" in err
    assert threading.excepthook is before  # restored afterwards


def test_debug_re_raises(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(DataError, match="bad file"):
        run(raising(DataError("bad file")), ["--debug"])
    with pytest.raises(KeyboardInterrupt):
        run(raising(KeyboardInterrupt()), ["--debug"])


def test_keyboard_interrupt_exits_130(capsys: pytest.CaptureFixture) -> None:
    assert run(raising(KeyboardInterrupt()), []) == EXIT_INTERRUPTED == 130
    stderr = capsys.readouterr().err
    assert stderr == "p2ch-test: interrupted\n"


def test_other_exceptions_are_bugs_and_propagate() -> None:
    with pytest.raises(ZeroDivisionError):
        run(raising(ZeroDivisionError()), [])


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as caught:
        run(lambda args: 0, ["--no-such-flag"])
    assert caught.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err


def test_parser_has_path_and_logging_options(tmp_path: Path) -> None:
    args = make_parser("p", "d").parse_args(["--data-root", str(tmp_path), "--log-level", "DEBUG"])
    assert args.data_root == str(tmp_path) and args.log_level == "DEBUG" and not args.debug
    assert not hasattr(make_parser("p", "d", paths=False).parse_args([]), "data_root")


def test_script_prints_no_traceback(tmp_path: Path) -> None:
    script = tmp_path / "command.py"
    script.write_text(textwrap.dedent("""
        import sys
        from p2ch_luna.cli import make_parser, run_command
        from p2ch_luna.errors import DataError

        def body(args):
            raise DataError("CT /x.mhd is broken")

        sys.exit(run_command(body, make_parser("cmd", "d"), sys.argv[1:]))
    """))
    repo = REPO
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=repo,
                            env={"PYTHONPATH": str(repo)}, timeout=60)
    assert result.returncode == 1
    assert result.stderr == "cmd: error: CT /x.mhd is broken\n"


# ---------------------------------------------------------------------------
# Atomic writes


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.endswith(".tmp") or ".tmp" in path.name)


def test_atomic_write_replaces_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    atomic_write_text(target, "three")
    assert target.read_text() == "three"
    assert leftovers(target.parent) == []


def test_failed_write_keeps_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("good")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(target, "w") as handle:
            handle.write("half of a new fi")
            raise RuntimeError("boom")
    assert target.read_text() == "good"
    assert leftovers(tmp_path) == []


def test_interrupted_atomic_path_keeps_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "plot.png"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target, suffix=".png") as temporary:
            assert temporary.suffix == ".png" and temporary.parent == tmp_path
            temporary.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["plot.png"]
    with atomic_path(target, suffix=".png") as temporary:
        temporary.write_bytes(b"new")
    assert target.read_bytes() == b"new"


def test_atomic_open_refuses_read_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        with atomic_open(tmp_path / "x", "r"):
            pass


@pytest.mark.skipif(sys.platform == "win32", reason="needs resource.setrlimit")
def test_write_over_file_size_limit_raises_luna_error(tmp_path: Path) -> None:
    target = tmp_path / "model.state"
    target.write_bytes(b"previous good file")
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from p2ch_luna.io.atomic import atomic_write_bytes
        from p2ch_luna.errors import LunaError

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            atomic_write_bytes({str(target)!r}, b"x" * 100_000)
        except LunaError as error:
            print("LunaError:", error)
            sys.exit(3)
        sys.exit(0)
    """)
    repo = REPO
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=repo,
                            env={"PYTHONPATH": str(repo)}, timeout=60)
    assert result.returncode == 3, result.stderr
    assert f"could not write {target}" in result.stdout
    assert target.read_bytes() == b"previous good file"
    assert leftovers(tmp_path) == []
