"""Size and encoding time of the viewer's slices (diagnose --output DIR: DIR/viewer/) for one CT.

Usage: python -m bench.bench_viewer CT [--slices 300] (a DICOM folder, .mhd or .nii.gz)

Encodes every slice as the viewer does (:func:`p2ch_luna.viewer.slices.encode_ct`), with the CT's lung mask
and, as the nodule mask, the dense tissue inside the lungs (HU > -400: vessels and nodules, more than a
segmenter marks), and projects the size to ``--slices`` slices of the same kind.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Sequence

from p2ch_luna.diagnose.lungs import find_lungs
from p2ch_luna.io.ct import load_ct
from p2ch_luna.viewer.slices import encode_ct

DENSE_HU = -400


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_viewer", description=__doc__.splitlines()[0])
    parser.add_argument("ct", type=Path, help="the CT to encode")
    parser.add_argument("--slices", type=int, default=300, help="project the size to a CT of this many slices")
    args = parser.parse_args(argv)
    ct = load_ct(args.ct)
    lungs = find_lungs(ct.hu, tuple(ct.geometry.spacing_irc))
    nodules = lungs.mask & (ct.hu > DENSE_HU)
    timings = {}
    for workers in (1, None):  # one thread against the default (one per CPU); the same bytes
        started = time.perf_counter()
        encoded = encode_ct(ct, lungs.mask, nodules, workers)
        timings[workers] = time.perf_counter() - started
    seconds = timings[None]
    count = ct.hu.shape[0]
    slices = sum(map(len, encoded.slices))
    masks = encoded.n_bytes - slices
    per_slice = encoded.n_bytes / count
    print(f"shape {ct.hu.shape}: slices {slices / 1e6:.1f} MB ({slices / count / 1024:.0f} KiB each), "
          f"masks {masks / 1e6:.2f} MB ({len(encoded.lung_masks)} lung, {len(encoded.nodule_masks)} nodule PNGs); "
          f"{seconds:.1f} s ({seconds / count * 1000:.0f} ms a slice); "
          f"{args.slices} slices: {per_slice * args.slices / 1e6:.0f} MB; one thread {timings[1]:.2f} s, "
          f"{os.cpu_count()} threads {seconds:.2f} s ({timings[1] / seconds:.2f}x)")


if __name__ == "__main__":
    main()
