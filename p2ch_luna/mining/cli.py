"""``python -m p2ch_luna.mining``: mine (or find already mined) hard candidates of the training series."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from p2ch_luna.cli import add_device_argument, make_parser, positive_int, run_command
from p2ch_luna.data.luna import VALIDATION_STRIDE
from p2ch_luna.distributed import distributed_info_from_env, resolve_device
from p2ch_luna.mining.run import mine, training_series
from p2ch_luna.paths import paths_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "python -m p2ch_luna.mining",
        "Run lungs -> segmentation -> grouping on the training series and store every candidate, labelled by the "
        "LUNA16 radius rule, beside the cache (reused while the checkpoint, grouping, series and annotations stay "
        "the same). Nodule training uses it with --hard-negatives-from.")
    parser.add_argument("--segmentation-path", type=Path, required=True, metavar="FILE",
                        help="segmentation checkpoint whose candidates are mined (ours or the book's seg_*.state)")
    parser.add_argument("--val-stride", type=positive_int, default=VALIDATION_STRIDE,
                        help="the training run's --val-stride: every N-th series (by UID) is validation and is "
                             "not mined")
    add_device_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    return run_command(_body, parser, argv)


def _body(args: argparse.Namespace) -> int:
    paths = paths_from_args(args)
    device = resolve_device(args.device, distributed_info_from_env())
    mined = mine(paths, args.segmentation_path, training_series(paths.require_data_root(), args.val_stride), device)
    table = mined.table
    print(f"mined {len(table)} candidates ({int(table['is_nodule'].sum())} on a nodule) in {mined.series_count} "
          f"series: {mined.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
