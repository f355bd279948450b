"""Peak memory and time of diagnosing one CT: the heap's free memory handed back (ours) or kept (the baseline).

    python -m bench.bench_memory [--slices 300 | --ct CT] [--segmentation-path F --classification-path F]
                                 [--amp] [--rounds 2]

Each run is a fresh process (peak RSS is per process) that loads the CT and
runs ``diagnose.diagnose_ct`` once on the CPU:
- "kept": ``HeapTrimmer.step`` is a no-op, as before the heap was trimmed;
- "every-batch": the segmentation trims the heap after every batch (no slack);
- "released": the package as it is (``diagnose.SEGMENTATION_HEAP_SLACK``).
The rounds alternate the variants, so the machine's noise falls on all of
them. Without checkpoints, seeded untrained models with the book's
architectures are used.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from bench.common import load_or_build
from p2ch_luna.diagnose import segment
from p2ch_luna.diagnose.heap import HeapTrimmer
from p2ch_luna.diagnose.model_set import DiagnosisModels
from p2ch_luna.diagnose.pipeline import DiagnoseConfig, diagnose_ct
from p2ch_luna.diagnose.segment import CPU_SEGMENTATION_BATCH
from p2ch_luna.io.ct import load_ct
from p2ch_luna.synth import generator as synth

VARIANTS = ("kept", "every-batch", "released")

REPO = Path(__file__).resolve().parents[1]
"""The repository root: the child runs ``python -m bench.bench_memory`` from there."""


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> int:
    """One diagnosis in this process; prints a JSON line of its figures."""
    if args.child == "kept":
        HeapTrimmer.step = lambda self: False
    elif args.child == "every-batch":
        segment.SEGMENTATION_HEAP_SLACK = -1
    torch.manual_seed(args.seed)
    models = DiagnosisModels(segmentation=load_or_build(args.segmentation_path, "segmentation"),
                                      nodule=load_or_build(args.classification_path, "nodule"))
    device = torch.device("cpu")
    models.place(device)
    ct = load_ct(args.ct)
    loaded_mb = peak_rss_mb()
    config = DiagnoseConfig(batch_size=CPU_SEGMENTATION_BATCH, amp=args.amp)
    started = time.perf_counter()
    result, _, nodule_mask = diagnose_ct(ct, models, config, device)
    print(json.dumps({"seconds": time.perf_counter() - started, "peak_mb": peak_rss_mb(), "loaded_mb": loaded_mb,
                      "candidates": len(result.candidates), "mask_voxels": int(nodule_mask.sum()),
                      "timings": result.timings}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300, help="slices of the synthetic 512x512 CT")
    parser.add_argument("--ct", type=Path, help="diagnose this CT (DICOM folder, .mhd, NIfTI) instead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--segmentation-path", type=Path)
    parser.add_argument("--classification-path", type=Path)
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast, as diagnose --amp")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each variant, alternating")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    with tempfile.TemporaryDirectory() as folder:
        if args.ct is None:
            info = synth.generate_dataset(folder, series=1, seed=args.seed, subsets=1, shape=(512, 512),
                                          slices=(args.slices, args.slices), progress=False)[0]
            args.ct = Path(info.path)
        shape = load_ct(args.ct).shape
        print(f"CT {shape}, {torch.get_num_threads()} torch thread(s), amp {args.amp}")
        figures: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
        for _ in range(args.rounds):
            for variant in VARIANTS:
                figures[variant].append(_run_child(args, variant))
    for variant in VARIANTS:
        runs = figures[variant]
        stages = {key: np.mean([run["timings"][key] for run in runs]) for key in runs[0]["timings"]}
        print(f"{variant:11s} peak {_listed(runs, 'peak_mb', '.0f')} MB (after loading {runs[0]['loaded_mb']:.0f}), "
              f"{_listed(runs, 'seconds', '.1f')} s, {runs[0]['candidates']} candidates, "
              f"{runs[0]['mask_voxels']} mask voxels; mean stage s: "
              + ", ".join(f"{key} {value:.1f}" for key, value in stages.items()))
    medians = {variant: {key: np.median([run[key] for run in figures[variant]]) for key in ("peak_mb", "seconds")}
               for variant in VARIANTS}
    for variant in VARIANTS[1:]:
        print(f"{variant} / kept: peak {medians[variant]['peak_mb'] / medians['kept']['peak_mb']:.2f}x, "
              f"time {medians[variant]['seconds'] / medians['kept']['seconds']:.2f}x (medians)")
    return 0


def _run_child(args: argparse.Namespace, variant: str) -> dict:
    command = [sys.executable, "-m", "bench.bench_memory", "--child", variant, "--ct", str(args.ct), "--seed", str(args.seed)]
    for flag, value in (("--segmentation-path", args.segmentation_path),
                        ("--classification-path", args.classification_path)):
        if value is not None:
            command += [flag, str(value)]
    if args.amp:
        command.append("--amp")
    output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO).stdout
    return json.loads(output.strip().splitlines()[-1])


def _listed(runs: list[dict], key: str, spec: str) -> str:
    return "/".join(format(run[key], spec) for run in runs)


if __name__ == "__main__":
    sys.exit(main())
