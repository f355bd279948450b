"""Which --flip-band keeps the findings of all four views: every view's nodule probability per candidate.

    python -m bench.bench_flip_band --ct PATH --segmentation-path FILE --classification-path FILE

Runs the diagnosis steps up to the candidates once, scores every candidate on each of its four views
and prints, per band, how many candidates need the mirror views and whether the candidates at or above
the nodule threshold (before one-per-blob) are those of all views.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from p2ch_luna.diagnose.classify import CPU_CLASSIFICATION_BATCH, classify_chunks
from p2ch_luna.diagnose.grouping import group_candidates
from p2ch_luna.diagnose.lungs import find_lungs
from p2ch_luna.diagnose.model_set import load_models
from p2ch_luna.diagnose.segment import CPU_SEGMENTATION_BATCH, segment_ct
from p2ch_luna.io.ct import load_ct
from p2ch_luna.paths import resolve_paths

BANDS = ((0.0, 1.0), (0.01, 1.0), (0.02, 1.0), (0.05, 1.0), (0.1, 1.0), (0.2, 1.0), (0.1, 0.9), (0.2, 0.8), (0.3, 0.7))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=Path, required=True)
    parser.add_argument("--segmentation-path", type=Path, required=True)
    parser.add_argument("--classification-path", type=Path, required=True)
    parser.add_argument("--nodule-threshold", type=float, default=0.5)
    args = parser.parse_args(argv)
    cpu = torch.device("cpu")
    models = load_models(resolve_paths(), args.segmentation_path, args.classification_path, None, cpu)
    ct = load_ct(args.ct)
    lungs = find_lungs(ct.hu, tuple(float(v) for v in ct.geometry.spacing_irc))
    mask = segment_ct(ct.hu, lungs.mask, models.segmentation.model, 0.5, CPU_SEGMENTATION_BATCH, cpu)
    candidates = group_candidates(ct.hu, mask, lungs.mask, ct, 1, "peaks", workers=torch.get_num_threads())
    centers = np.rint(candidates[["index", "row", "col"]].to_numpy(np.float64)).astype(np.int64)
    model, temperature = models.nodule.model, models.nodule.temperature
    single = classify_chunks(ct.hu, centers, model, CPU_CLASSIFICATION_BATCH * 4, cpu, temperature=temperature)
    every = classify_chunks(ct.hu, centers, model, CPU_CLASSIFICATION_BATCH, cpu, flips=True,
                            temperature=temperature)
    threshold = args.nodule_threshold
    print(f"{len(centers)} candidates; {int((every >= threshold).sum())} at or above {threshold:g} on all views")
    found = every >= threshold
    print(f"lowest first view among them: {single[found].min() if found.any() else float('nan'):.4f}; "
          f"highest first view of the others: {single[~found].max() if (~found).any() else float('nan'):.4f}")
    for low, high in BANDS:
        inside = (single >= low) & (single <= high)
        cascade = np.where(inside, every, single)
        same = np.array_equal(cascade >= threshold, found)
        worst = np.abs(cascade - every)[cascade >= threshold].max(initial=0.0)
        print(f"band {low:g},{high:g}: mirrors for {int(inside.sum())} ({inside.mean():.1%}); same candidates "
              f"above threshold: {same}; largest probability change among them {worst:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
