"""diagnose's model runtimes on the CPU: PyTorch (the baseline) against the ONNX exports in onnxruntime.

    python -m bench.bench_runtime --ct PATH --segmentation-path FILE --classification-path FILE [--repeats 2]

Loads the CT and finds its lungs once, then runs the whole pipeline (segmentation, grouping, nodule and
malignancy classification with ``--malignancy-path``; the book published no malignancy checkpoint) ``--repeats`` times per runtime, alternating. Prints each runtime's median seconds
per stage and in total, the ratio to PyTorch, and whether the findings agree: the same candidates, their
probabilities within the export tolerance. Same threads for both (``--threads``, default torch's).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from p2ch_luna.diagnose.lungs import find_lungs
from p2ch_luna.diagnose.model_set import RUNTIMES, load_models
from p2ch_luna.diagnose.pipeline import DiagnoseConfig, diagnose_ct, findings
from p2ch_luna.export.verify import PROBABILITY_TOLERANCE
from p2ch_luna.io.ct import load_ct
from p2ch_luna.paths import resolve_paths

STAGES = ("segmentation_s", "grouping_s", "classification_s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=Path, required=True)
    parser.add_argument("--segmentation-path", type=Path, required=True)
    parser.add_argument("--classification-path", type=Path, required=True)
    parser.add_argument("--malignancy-path", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    ct = load_ct(args.ct)
    lungs = find_lungs(ct.hu, tuple(float(v) for v in ct.geometry.spacing_irc))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; CT {ct.shape}", flush=True)
    with tempfile.TemporaryDirectory() as cache:
        paths = resolve_paths(cache_dir=cache)
        started = time.perf_counter()
        models = {runtime: load_models(paths, args.segmentation_path, args.classification_path, args.malignancy_path, cpu,
                                       runtime) for runtime in RUNTIMES}
        print(f"loading (and exporting to ONNX) {time.perf_counter() - started:.1f} s", flush=True)
        config = {runtime: DiagnoseConfig(runtime=runtime) for runtime in RUNTIMES}
        timings: dict[str, list[dict[str, float]]] = {runtime: [] for runtime in RUNTIMES}
        results = {}
        for _ in range(args.repeats):
            for runtime in RUNTIMES:
                clock = time.perf_counter()
                diagnosis, _, _ = diagnose_ct(ct, models[runtime], config[runtime], cpu, lungs=lungs)
                diagnosis.timings["total_s"] = time.perf_counter() - clock
                timings[runtime].append(diagnosis.timings)
                results[runtime] = diagnosis
    baseline = statistics.median(t["total_s"] for t in timings["torch"])
    for runtime in RUNTIMES:
        medians = {stage: statistics.median(t[stage] for t in timings[runtime]) for stage in (*STAGES, "total_s")}
        print(f"{runtime:>5}: " + ", ".join(f"{stage[:-2]} {value:.2f} s" for stage, value in medians.items())
              + f"  ({medians['total_s'] / baseline:.2f} x torch's total)")
    reference, exported = (results[runtime].candidates for runtime in RUNTIMES)
    same = reference[["index", "row", "col"]].equals(exported[["index", "row", "col"]])
    columns = ["nodule_probability", "malignancy_probability"]
    difference = float(np.nanmax(np.abs(reference[columns].to_numpy(float) - exported[columns].to_numpy(float)),
                                 initial=0.0)) if same else float("nan")
    found = [len(findings(results[runtime], config[runtime])) for runtime in RUNTIMES]
    print(f"candidates {len(reference)} (torch) / {len(exported)} (onnx), same centres: {same}; findings "
          f"{found[0]} / {found[1]}; max probability difference {difference:.2g} (tolerance {PROBABILITY_TOLERANCE:g})")
    return 0 if same and difference <= PROBABILITY_TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
