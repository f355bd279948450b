"""Exported models: ``python -m p2ch_luna.export CHECKPOINT --format torchscript|onnx OUT``, and onnxruntime's run
of an exported file for diagnosis (:mod:`p2ch_luna.export.runtime`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import argparse


def build_parser() -> argparse.ArgumentParser:
    """The command's parser (for ``--help`` walkers such as tests/test_options.py)."""
    from p2ch_luna.export.cli import build_parser as parser

    return parser()


def main(argv: Sequence[str] | None = None) -> int:
    """The ``python -m p2ch_luna.export`` command (imported on call, so importing the package stays light)."""
    from p2ch_luna.export.cli import main as run

    return run(argv)
