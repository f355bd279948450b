"""``python -m p2ch_luna.export CHECKPOINT --format torchscript|onnx OUT``: a segmentation, nodule or malignancy
checkpoint (ours or the book's) as a file that runs without this package, with a dynamic batch size.

The file carries the task, architecture and the classifier's calibration (temperature and bias) that
diagnosis needs: ONNX in its ``metadata_props``, TorchScript as the extra file ``p2ch_luna.json``, under the
key ``p2ch_luna`` (:mod:`p2ch_luna.export.metadata`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from p2ch_luna.cli import make_parser, run_command
from p2ch_luna.errors import UsageError
from p2ch_luna.export.exporters import FORMATS
from p2ch_luna.export.verify import LOGIT_ATOL, LOGIT_RTOL, PROBABILITY_TOLERANCE
from p2ch_luna.models.checkpoint import TASKS


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("python -m p2ch_luna.export",
                         "Export a checkpoint (segmentation, nodule or malignancy; ours or the book's) to ONNX or "
                         "TorchScript with a dynamic batch size (and dynamic slice size for the segmenter), "
                         "its task and calibration stored in the file.", paths=False)
    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="the checkpoint file to export")
    parser.add_argument("output", type=Path, metavar="OUT", help="the file to write (replaced atomically)")
    parser.add_argument("--format", dest="export_format", required=True, choices=FORMATS,
                        help="onnx (torch.onnx dynamo exporter; runs in onnxruntime) or torchscript "
                             "(torch.jit.trace; runs in torch.jit.load / libtorch)")
    parser.add_argument("--task", choices=TASKS, default=None,
                        help="refuse a checkpoint of another task (needed for nothing else: the task is read "
                             "from the file)")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="load the written file back and compare it with PyTorch on fixed inputs at batch 1 "
                             f"and 3: probabilities within {PROBABILITY_TOLERANCE:g}, logits within rtol "
                             f"{LOGIT_RTOL:g} + atol {LOGIT_ATOL:g}; outside that, nothing is written")
    return parser


def run(args: argparse.Namespace) -> int:
    from p2ch_luna.export.files import export_checkpoint

    if args.export_format == "onnx":
        _require_onnx()
    if args.output.is_dir():
        raise UsageError(f"OUT {args.output} is a folder; give the file to write")
    agreement = export_checkpoint(args.checkpoint, args.export_format, args.output, args.task, args.verify)
    if agreement is not None:
        print(f"{args.output}: agrees with PyTorch at batch {', '.join(map(str, agreement.batches))}: "
              f"max probability difference {agreement.max_probability_difference:.2g} "
              f"(tolerance {PROBABILITY_TOLERANCE:g}), max logit difference {agreement.max_logit_difference:.2g}")
    return 0


def _require_onnx() -> None:
    from p2ch_luna.export.runtime import ONNX_EXTRA, import_onnxruntime

    import_onnxruntime()
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            raise UsageError(f"--format onnx needs {module} (pip install '.[{ONNX_EXTRA}]')") from None


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
