"""Helpers shared by every ``python -m p2ch_luna.<command>`` entry point.

Each entry point builds its parser with :func:`make_parser` (which adds the path
and logging options) and runs its body through :func:`run_command`, which
configures logging once and turns :class:`~p2ch_luna.errors.LunaError`, a dead
DataLoader worker and Ctrl-C into one-line messages with a non-zero exit code
(``--debug``: full tracebacks).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import sys
import threading
from typing import Callable, Iterator, Sequence

from p2ch_luna.errors import LunaError
from p2ch_luna.paths import add_path_arguments

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 130
WORKER_ERROR = re.compile(r"\ACaught (\w+) (in DataLoader worker process \d+)\.\n")
"""How a DataLoader re-raises a worker's exception: this line, then the worker's whole traceback."""
WORKER_DIED = "DataLoader worker (pid"
"""How torch's DataLoader begins the RuntimeError it raises when a worker process dies (killed, crashed)."""


def one_line_message(error: BaseException) -> str:
    """``error``'s message; for one re-raised from a DataLoader worker, the worker's own message
    (the last line of the traceback it carries) and which worker it was."""
    text = str(error)
    match = WORKER_ERROR.match(text)
    if match is None:
        return text
    last = text.rstrip().splitlines()[-1]
    marker = f"{match.group(1)}: "
    original = last.split(marker, 1)[1] if marker in last else last
    return f"{original} ({match.group(2)})"


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line (plus the usage) and exit 2."""


class HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default unless it is empty or the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text.lower()
            or default in (None, False, argparse.SUPPRESS)
            or action.option_strings == []
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def make_parser(prog: str, description: str, paths: bool = True) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description=description,
        formatter_class=HelpFormatter,
    )
    if paths:
        add_path_arguments(parser)
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging verbosity",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show full tracebacks on errors (default: one-line messages)",
    )
    return parser


def configure_logging(level: str) -> None:
    """Configure the root logger once, from the entry point (never at import)."""
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def run_command(
    body: Callable[[argparse.Namespace], int | None],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
) -> int:
    """Parse ``argv``, run ``body(args)`` and map failures to exit codes.

    Returns the exit code (0 on success) instead of calling ``sys.exit`` so tests
    can call ``main([...])`` directly; ``__main__`` blocks pass it to ``sys.exit``.
    """
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        with contextlib.nullcontext() if args.debug else _thread_errors_logged():
            result = body(args)
    except LunaError as error:
        if args.debug:
            raise
        print(f"{parser.prog}: error: {one_line_message(error)}", file=sys.stderr)
        return error.exit_code
    except RuntimeError as error:
        if args.debug or not str(error).startswith(WORKER_DIED):
            raise
        print(f"{parser.prog}: error: {str(error).strip().rstrip('.')}: out of memory? Try fewer --num-workers "
              "or a smaller --batch-size", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return int(result or 0)


@contextlib.contextmanager
def _thread_errors_logged() -> Iterator[None]:
    """While the command runs, an exception that ends a background thread is one warning line, not a
    traceback (e.g. multiprocessing's resource-sharing thread when a loader worker is killed)."""
    previous = threading.excepthook

    def log_error(failure: threading.ExceptHookArgs) -> None:
        if failure.exc_type is SystemExit:
            return
        name = failure.thread.name if failure.thread is not None else "?"
        log.warning("background thread %s stopped: %s: %s (--debug shows the traceback)", name,
                    failure.exc_type.__name__, failure.exc_value)

    threading.excepthook = log_error
    try:
        yield
    finally:
        threading.excepthook = previous


# ---------------------------------------------------------------------------
# Option types and options shared by several commands

DEVICE_HELP = "auto (CUDA when present, else the CPU), cpu, cuda or cuda:N"


def add_device_argument(group: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--device``, spelled and explained the same in every command that runs a model."""
    group.add_argument("--device", default="auto", help=DEVICE_HELP)


def probability(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = float(text)
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number >= 0")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not positive")
    return value


class _SeriesUidList(argparse.Action):
    """Appends each value's comma-separated pieces to one ordered list without repeats; an empty piece is a
    usage error naming the option."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[str] | None, option_string: str | None = None) -> None:
        texts = [values] if isinstance(values, str) else list(values or [])
        uids = list(getattr(namespace, self.dest, None) or [])
        for text in texts:
            pieces = [piece.strip() for piece in text.split(",")]
            if not all(pieces):
                raise argparse.ArgumentError(self, f"empty series UID in {text!r} (give UID or UID,UID,...)")
            uids.extend(piece for piece in pieces if piece not in uids)
        setattr(namespace, self.dest, uids)


def add_series_uid_argument(group: argparse.ArgumentParser | argparse._ArgumentGroup, help: str) -> None:
    """``--series-uid UID[,UID...]``, repeatable: ``args.series_uid`` is the UIDs in order without repeats, or
    None when absent. ``--series-uids UID [UID ...]`` is a hidden alias (evaluate's former spelling)."""
    group.add_argument("--series-uid", dest="series_uid", action=_SeriesUidList, default=None,
                       metavar="UID[,UID...]", help=f"{help} (repeatable; commas separate several)")
    group.add_argument("--series-uids", dest="series_uid", action=_SeriesUidList, nargs="+", default=None,
                       help=argparse.SUPPRESS)
