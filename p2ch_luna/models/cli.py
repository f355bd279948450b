"""``python -m p2ch_luna.models``: list the checkpoints in a folder, install one by its SHA-256.

    python -m p2ch_luna.models list [DIR]
    python -m p2ch_luna.models install FILE_OR_URL --sha256 HASH [--models-dir DIR] [--name NAME]

Checkpoints are recognised by their contents (:mod:`p2ch_luna.models.catalog`), whatever they are
called; ``diagnose --models-dir DIR`` takes the newest of each task that ``list`` shows.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Sequence

from p2ch_luna.cli import HelpFormatter, make_parser, run_command
from p2ch_luna.models.catalog import CheckpointSummary, find_checkpoints, newest_checkpoints
from p2ch_luna.models.install import install_checkpoint
from p2ch_luna.paths import resolve_paths

COLUMNS = ("file", "task", "architecture", "epoch", "samples", "training data", "split", "best score", "saved")
MISSING = "-"


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("python -m p2ch_luna.models", "List the model checkpoints in a folder (recognised by "
                         "their contents, whatever their names) or install one after checking its SHA-256.",
                         paths=False)
    commands = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = commands.add_parser(
        "list", formatter_class=HelpFormatter, help="one row per checkpoint in a folder",
        description="One row per checkpoint under DIR (recursively): file, task, architecture, epoch, training "
                    "samples seen, training data (data root and series count, where recorded), split "
                    "(validation stride), best validation score and when it was saved. A '*' marks the "
                    "one `diagnose --models-dir DIR` takes for each task. Other files are skipped.")
    listing.add_argument("folder", nargs="?", type=Path, metavar="DIR",
                         help="folder to list (default: the models folder: $P2CH_MODELS_DIR, else "
                              "data-unversioned/models)")
    install = commands.add_parser(
        "install", formatter_class=HelpFormatter, help="copy or download a checkpoint, checking its SHA-256",
        description="Copy a file (a path or a file:// URL) or download one (http:// or https://) into the "
                    "models folder. It is written to a hidden temporary file there while its SHA-256 is "
                    "computed, and moved into place only if the hash matches and it loads as a checkpoint; "
                    "otherwise nothing is left behind and the command fails with one line.")
    install.add_argument("source", metavar="FILE_OR_URL", help="a file path, or a file://, http:// or https:// URL")
    install.add_argument("--sha256", required=True, metavar="HASH",
                         help="the file's expected SHA-256, 64 hexadecimal digits (`sha256sum FILE` prints it)")
    install.add_argument("--models-dir", type=Path, metavar="DIR",
                         help="where to install (env P2CH_MODELS_DIR; default data-unversioned/models)")
    install.add_argument("--name", metavar="NAME",
                         help="the installed file's name (default: the source's file name)")
    for sub in (listing, install):  # also accepted after the action; SUPPRESS keeps a value given before it
        sub.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], default=argparse.SUPPRESS,
                         help="logging verbosity (default: INFO)")
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show full tracebacks on errors (default: one-line messages)")
    return parser


def format_table(summaries: Sequence[CheckpointSummary], folder: Path, chosen: set[Path]) -> str:
    """The rows ``list`` prints, columns padded to their widest cell."""
    rows = [COLUMNS] + [_row(summary, folder, summary.path in chosen) for summary in summaries]
    widths = [max(len(row[column]) for row in rows) for column in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _row(summary: CheckpointSummary, folder: Path, is_chosen: bool) -> tuple[str, ...]:
    data = summary.data_root or MISSING
    if summary.series_count is not None:
        data = f"{data} ({summary.series_count} series)"
    score = MISSING
    if summary.best_score is not None:
        score = f"{summary.score_name or 'score'} {summary.best_score:.4f}"
        if summary.best_epoch is not None:
            score += f" (epoch {summary.best_epoch})"
    saved = summary.saved_at or datetime.datetime.fromtimestamp(summary.modified_at).astimezone()
    return (
        ("* " if is_chosen else "  ") + str(summary.path.relative_to(folder)),
        summary.task,
        summary.model_name + (" (book)" if summary.is_book else ""),
        _text(summary.epoch),
        _text(summary.samples_seen),
        data,
        MISSING if summary.val_stride is None else f"every {summary.val_stride}th series held out",
        score,
        saved.isoformat(timespec="seconds") + ("" if summary.saved_at else " (file time)"),
    )


def _text(value: object) -> str:
    return MISSING if value is None else str(value)


def _run(args: argparse.Namespace) -> int:
    if args.action == "list":
        folder = (args.folder or resolve_paths().models_dir).expanduser()
        summaries = find_checkpoints(folder)
        if not summaries:
            print(f"no checkpoints under {folder}")
            return 0
        chosen = {summary.path for summary in newest_checkpoints(folder).values()}
        print(format_table(summaries, folder, chosen))
        return 0
    models_dir = resolve_paths(models_dir=args.models_dir).models_dir
    loaded = install_checkpoint(args.source, args.sha256, models_dir, args.name)
    print(f"installed {loaded.path}: {loaded.task} checkpoint ({loaded.model_name}), sha256 checked")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
