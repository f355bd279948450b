"""Depth of the dense tissue inside the lungs: scipy's feature transform against the k-d tree.

    python -m bench.bench_distance [--slices 130] [--seed 0] [--repeats 5] [--workers 1 2]

Diagnosis groups candidates at the peaks of the depth (mm) of dense (>= ``DENSE_HU``) segmented
tissue, in the box of both lungs. This bench builds that mask from one synthetic 512x512 CT as a
model that marks every dense voxel in the lungs would (vessels and nodules: a few percent of the
box), then times ``distance.depth_from_feature_transform`` (scipy's Euclidean feature transform over
the whole box, the code before) and ``distance.depth_from_boundary`` (a k-d tree over the outside
voxels that touch the mask) on each number of ``--workers`` threads. It prints the median seconds,
the ratio to the feature transform, and the largest difference between the two depths.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from p2ch_luna.diagnose import distance, lungs
from p2ch_luna.diagnose.grouping import DENSE_HU
from p2ch_luna.io.ct import load_ct
from p2ch_luna.synth import generator as synth


def median_seconds(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def dense_lung_tissue(slices: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The dense voxels inside the lung mask of one synthetic CT, in their padded box, and the spacing."""
    with tempfile.TemporaryDirectory() as folder:
        synth.generate_dataset(folder, series=1, seed=seed, subsets=1, shape=(512, 512), slices=(slices, slices),
                               progress=False)
        ct = load_ct(next(Path(folder).glob("subset*/*.mhd")))
    spacing = np.asarray(ct.geometry.spacing_irc, dtype=np.float64)
    dense = lungs.find_lungs(ct.hu, tuple(spacing)).mask & (ct.hu >= DENSE_HU)
    box = lungs.mask_bounding_box(dense, (1, 1, 1))
    if box is None:
        raise SystemExit("no dense tissue inside the lungs of the synthetic CT")
    return dense[box], spacing


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=130, help="slices of the synthetic CT")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic CT")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each way; the median is printed")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="thread counts for the k-d tree")
    args = parser.parse_args(argv)
    mask, spacing = dense_lung_tissue(args.slices, args.seed)
    print(f"dense tissue in the lungs' box {'x'.join(map(str, mask.shape))} ({mask.size / 1e6:.1f} M voxels), "
          f"spacing {', '.join(f'{v:.3f}' for v in spacing)} mm: {np.count_nonzero(mask):,} voxels "
          f"({np.count_nonzero(mask) / mask.size:.1%})")
    expected = distance.depth_from_feature_transform(mask, spacing)
    baseline = median_seconds(lambda: distance.depth_from_feature_transform(mask, spacing), args.repeats)
    print(f"  scipy feature transform (before)   {baseline:7.3f} s")
    for workers in args.workers:
        seconds = median_seconds(lambda: distance.depth_from_boundary(mask, spacing, workers), args.repeats)
        difference = np.abs(distance.depth_from_boundary(mask, spacing, workers) - expected).max()
        print(f"  k-d tree, {workers:2d} worker(s)              {seconds:7.3f} s  {baseline / seconds:5.2f}x  "
              f"largest difference {difference:.1e} mm")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
