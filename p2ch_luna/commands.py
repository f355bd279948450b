"""``p2ch-luna <command>`` (or ``python -m p2ch_luna <command>``): one entry point for every command.

Each command is the same ``main`` as its ``python -m p2ch_luna.<module>`` twin and console script, imported
only when run (so ``p2ch-luna --version`` does not import torch).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from p2ch_luna import RESEARCH_NOTICE, __version__

COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("p2ch_luna.synth", "write a synthetic chest-CT dataset in the LUNA16 layout"),
    "implant": ("p2ch_luna.implant", "implant nodules into a real CT: a known answer on real anatomy"),
    "prepcache": ("p2ch_luna.prepcache", "fill the CT cache"),
    "train": ("p2ch_luna.training", "train the nodule or malignancy classifier or the segmenter"),
    "mine": ("p2ch_luna.mining", "mine our segmenter's candidates of the training series (hard negatives)"),
    "diagnose": ("p2ch_luna.diagnose", "find nodules in CTs, estimate malignancy, score against truth"),
    "view": ("p2ch_luna.view", "open a diagnosis' viewer page in a browser, or serve it on localhost"),
    "evaluate": ("p2ch_luna.evaluate", "score a LUNA16 submission (FROC, CPM)"),
    "export": ("p2ch_luna.export", "export a checkpoint to ONNX or TorchScript (dynamic batch, calibration kept)"),
    "cv": ("p2ch_luna.cv", "LUNA16 ten-fold cross-validation: train, diagnose each fold, one merged CPM"),
    "models": ("p2ch_luna.models.cli", "list checkpoints by what they hold; install one by its sha256"),
    "serve": ("p2ch_luna.serve", "an HTTP service: POST a CT to /diagnose, get the report JSON"),
    "demo": ("p2ch_luna.demo", "the whole pipeline on synthetic data, in a few minutes"),
}
"""Command name -> (module whose ``main`` runs it, one line for ``--help``)."""


def build_parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<10} {summary}" for name, (_, summary) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="p2ch-luna", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"The lung-nodule pipeline of Deep Learning with PyTorch, part II. {RESEARCH_NOTICE}",
        epilog=f"commands:\n{listing}\n\n`p2ch-luna COMMAND --help` explains each one's options.")
    parser.add_argument("--version", action="version", version=f"p2ch_luna {__version__}")
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND", help="what to run (see below)")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="the command's own options")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.main(args.arguments) or 0)


if __name__ == "__main__":
    sys.exit(main())
