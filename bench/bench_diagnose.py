"""Time diagnosis of one synthetic 512x512x~130 CT (or ``--ct``): ours against a book-style path.

    python -m bench.bench_diagnose [--slices 130 | --ct CT] [--segmentation-path F --classification-path F]
                                   [--threads N] [--device cuda] [--amp] [--series N [--prefetch K ...]]

Book-style path (p2ch14/diagnose.py): a DataLoader yields one 7-channel
float32 512x512 slice stack at a time, batch 4, every slice is segmented,
sigmoid > 0.5, erosion, labelling, HU-weighted centres, then a DataLoader of
32x48x48 chunks (batch 4) through the classifier. Ours: lung mask, slices
holding lung only, cropped to the lungs, batched slices gathered from one
tensor, inference mode, candidates inside the lungs only. Both run in this
process on the same CT and models; the ratio is what to compare. Without
checkpoints, seeded untrained models with the book's architectures are used
(the timing then depends on how many candidates they happen to produce).

With ``--series N`` it instead times ``diagnose_series`` over N such CTs,
one at a time against ``--prefetch K`` worker processes loading the next CTs
and finding their lungs meanwhile (seconds per CT, ratio to one at a time).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from bench.book import BOOK_DIAGNOSE_BATCH_SIZE, BOOK_DIAGNOSE_WORKERS, book_copies, book_diagnose_stages
from bench.common import load_or_build
from p2ch_luna.diagnose.model_set import DiagnosisModels
from p2ch_luna.diagnose.pipeline import DiagnoseConfig, diagnose_ct, diagnose_series
from p2ch_luna.diagnose.segment import CPU_SEGMENTATION_BATCH, CUDA_SEGMENTATION_BATCH
from p2ch_luna.io.ct import load_ct
from p2ch_luna.synth import generator as synth


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=130)
    parser.add_argument("--ct", type=Path, help="time this CT (DICOM folder, .mhd, NIfTI) instead of a synthetic one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--segmentation-path", type=Path)
    parser.add_argument("--classification-path", type=Path)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--skip-book", action="store_true", help="time only our path")
    parser.add_argument("--amp", action="store_true",
                        help="also time our path in mixed precision (bfloat16 on the CPU and recent GPUs)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (both paths run there)")
    parser.add_argument("--series", type=int, default=0,
                        help="time diagnose_series over this many CTs instead, without and with --prefetch")
    parser.add_argument("--prefetch", type=int, nargs="+", default=[1], help="worker counts to compare with 0")
    parser.add_argument("--book-workers", type=int, default=BOOK_DIAGNOSE_WORKERS,
                        help="DataLoader workers of the book-style path (default: nodule_analysis's --num-workers, "
                             f"{BOOK_DIAGNOSE_WORKERS})")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    startup = {"imports": import_seconds()}
    started = time.perf_counter()
    models = DiagnosisModels(segmentation=load_or_build(args.segmentation_path, "segmentation"),
                                      nodule=load_or_build(args.classification_path, "nodule"))
    startup["model load"] = time.perf_counter() - started
    device = torch.device(args.device)
    book_models = book_copies(models, device)
    models.place(device)
    batch = CUDA_SEGMENTATION_BATCH if device.type == "cuda" else CPU_SEGMENTATION_BATCH
    config = DiagnoseConfig(batch_size=batch)
    if args.series:
        return time_series(args, models, config, device)
    if args.ct is not None:
        ct = load_ct(args.ct)
    else:
        with tempfile.TemporaryDirectory() as folder:
            infos = synth.generate_dataset(folder, series=1, seed=args.seed, subsets=1, shape=(512, 512),
                                           slices=(args.slices, args.slices), progress=False)
            ct = load_ct(infos[0].path)
    print(f"CT {ct.shape} spacing_irc {tuple(round(float(v), 3) for v in ct.geometry.spacing_irc)}, "
          f"{torch.get_num_threads()} torch thread(s)")
    startup["first batch"] = first_batch_seconds(models, config, device)
    print("start-up:   " + ", ".join(f"{k} {v:.2f} s" for k, v in startup.items()) + " (not in the totals below)")
    started, cpu_started = time.perf_counter(), cpu_seconds()
    result, lungs, _ = diagnose_ct(ct, models, config, device)
    ours_s, ours_cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    lung_slices = int(lungs.any(axis=(1, 2)).sum())
    findings = int((result.candidates["nodule_probability"] >= 0.5).sum())
    print(f"ours:       {ours_s:7.1f} s  ({len(result.candidates)} candidates, {findings} at p >= 0.5, "
          f"{lung_slices}/{ct.shape[0]} slices hold lung; "
          + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items()) + ")")
    if args.amp:
        started = time.perf_counter()
        mixed, _, _ = diagnose_ct(ct, models, dataclasses.replace(config, amp=True), device)
        mixed_s = time.perf_counter() - started
        print(f"ours, amp:  {mixed_s:7.1f} s  ({len(mixed.candidates)} candidates; "
              + ", ".join(f"{k} {v:.1f}" for k, v in mixed.timings.items()) + f"), {ours_s / mixed_s:.2f}x ours")
        print("amp vs float32: " + precision_agreement(result.candidates, mixed.candidates))
    if args.skip_book:
        return 0
    started, cpu_started = time.perf_counter(), cpu_seconds()
    book = book_diagnose_stages(ct.hu, *book_models, device, workers=args.book_workers)
    book_s, book_cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    print(f"book-style: {book_s:7.1f} s  ({len(book.centers_irc)} candidates, "
          f"{int((book.probabilities > 0.5).sum())} at p > 0.5; every slice, full 512x512, batch "
          f"{BOOK_DIAGNOSE_BATCH_SIZE}, {args.book_workers} loader workers)")
    print(stage_table(result.timings, book.timings, ours_s, book_s))
    print(f"speed-up:   {book_s / ours_s:7.2f}x wall, {book_cpu / ours_cpu:.2f}x CPU time "
          f"(ours {ours_cpu:.1f} s, book {book_cpu:.1f} s, loader workers included: the fairer figure on a loaded "
          "machine)")
    return 0


def precision_agreement(full: pd.DataFrame, mixed: pd.DataFrame, threshold: float = 0.5) -> str:
    """Candidates at the same voxel centre in both runs, their largest nodule-probability difference, and the
    findings (p >= ``threshold``) of each run; the findings that differ, with their probabilities."""
    keys = ["index", "row", "col"]
    left = full.assign(**{key: np.rint(full[key]).astype(int) for key in keys})
    right = mixed.assign(**{key: np.rint(mixed[key]).astype(int) for key in keys})
    both = left.merge(right, on=keys, suffixes=("_full", "_mixed"))
    difference = (both["nodule_probability_full"] - both["nodule_probability_mixed"]).abs()
    found_full = left[left["nodule_probability"] >= threshold][keys].apply(tuple, axis=1)
    found_mixed = right[right["nodule_probability"] >= threshold][keys].apply(tuple, axis=1)
    only = sorted(set(found_full) ^ set(found_mixed))
    return (f"{len(both)} of {len(full)}/{len(mixed)} candidates at the same centre, max |dp| "
            f"{difference.max() if len(both) else float('nan'):.4f} (99th percentile "
            f"{difference.quantile(0.99) if len(both) else float('nan'):.4f}); findings {len(found_full)} / "
            f"{len(found_mixed)}, {len(only)} in one run only: {only[:10]}")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (the book path's loader workers)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def import_seconds() -> float:
    """Seconds a fresh interpreter takes to import the diagnosis path (what ``diagnose`` pays before any work)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import p2ch_luna.diagnose.pipeline, p2ch_luna.diagnose.model_set"],
                   check=True)
    return time.perf_counter() - started


def first_batch_seconds(models: DiagnosisModels, config: DiagnoseConfig, device: torch.device) -> float:
    """Extra seconds of the first segmentation and classifier batch over the second (allocation, kernel choice)."""
    slices = torch.zeros((config.batch_size, models.segmentation.model.in_channels, 512, 512), device=device)
    shape = tuple(getattr(models.nodule.model, "input_shape", (32, 48, 48)))
    chunks = torch.zeros((config.batch_size, 1, *shape), device=device)
    seconds = []
    with torch.inference_mode():
        for _ in range(2):
            started = time.perf_counter()
            models.segmentation.model(slices)
            models.nodule.model(chunks)
            seconds.append(time.perf_counter() - started)
    return max(0.0, seconds[0] - seconds[1])


def stage_table(ours: dict[str, float], book: dict[str, float], ours_total: float, book_total: float) -> str:
    """Ours against the book per stage (seconds, book / ours), stages either path lacks shown as -."""
    rows = ["| stage | ours s | book s | book / ours |", "|---|---|---|---|"]
    for stage in [*ours, *(key for key in book if key not in ours), "total"]:
        mine = ours_total if stage == "total" else ours.get(stage)
        theirs = book_total if stage == "total" else book.get(stage)
        ratio = f"{theirs / mine:.2f}x" if mine and theirs is not None else "-"
        rows.append(f"| {stage} | {'-' if mine is None else f'{mine:.1f}'} | "
                    f"{'-' if theirs is None else f'{theirs:.1f}'} | {ratio} |")
    return "\n".join(rows)

def time_series(args: argparse.Namespace, models: DiagnosisModels, config: DiagnoseConfig,
                device: torch.device) -> int:
    """Seconds per CT of ``diagnose_series`` over ``args.series`` CTs for each prefetch worker count."""
    with tempfile.TemporaryDirectory() as folder:
        infos = synth.generate_dataset(folder, series=args.series, seed=args.seed, subsets=1, shape=(512, 512),
                                       slices=(args.slices, args.slices), progress=False)
        selection = [(info.series_uid, Path(info.path)) for info in infos]
        print(f"{args.series} CTs of 512x512x{args.slices}, {torch.get_num_threads()} torch thread(s)")
        diagnose_series(selection[:1], models, config, device, figures=False, save_mask=False)  # warm-up
        baseline = None
        for prefetch in [0, *args.prefetch]:
            started = time.perf_counter()
            results = diagnose_series(selection, models, config, device, figures=False, save_mask=False,
                                               prefetch=prefetch)
            per_ct = (time.perf_counter() - started) / len(selection)
            baseline = baseline or per_ct
            stages = {key: np.mean([r.timings[key] for r in results]) for key in results[0].timings}
            print(f"prefetch {prefetch}: {per_ct:6.2f} s/CT  {baseline / per_ct:5.2f}x  (mean stage s: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
