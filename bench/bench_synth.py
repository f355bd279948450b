"""Seconds to synthesise one 512x512x130 series, against the cost of just writing it.

Baseline, measured in the same run: writing the same int16 voxels as an
uncompressed MetaImage with SimpleITK (what any generator must pay at least).

    python -m bench.bench_synth [--repeats 3] [--shape 512 512] [--slices 130]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from p2ch_luna.synth.series import make_series
from p2ch_luna.synth.writer import write_series


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shape", type=int, nargs=2, default=[512, 512], metavar=("ROWS", "COLS"))
    parser.add_argument("--slices", type=int, default=130)
    args = parser.parse_args(argv)

    generate_s, write_s, nodules = [], [], 0
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            start = time.perf_counter()
            series = make_series(np.random.default_rng(repeat), tuple(args.shape), args.slices)
            generate_s.append(time.perf_counter() - start)
            nodules += len(series.nodules)
            start = time.perf_counter()
            write_series(series, Path(folder) / f"series{repeat}.mhd")
            write_s.append(time.perf_counter() - start)
    generate, write = statistics.median(generate_s), statistics.median(write_s)
    megabytes = args.slices * args.shape[0] * args.shape[1] * 2 / 1e6
    print(f"series {args.shape[0]}x{args.shape[1]}x{args.slices} ({megabytes:.0f} MB int16), "
          f"{args.repeats} repeats, {nodules} nodules in total")
    print(f"generate (make_series)      : {generate:6.2f} s/series (median; all {', '.join(f'{t:.2f}' for t in generate_s)})")
    print(f"baseline write (SimpleITK)  : {write:6.2f} s/series")
    print(f"generate + write            : {generate + write:6.2f} s/series")
    print(f"ratio generate / write      : {generate / write:6.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
