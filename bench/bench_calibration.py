"""Calibration after a short nodule run on synthetic data: the fitted temperature and the validation
ECE and NLL before and after it (what training stores in the best checkpoint's ``calibration``).

    python -m bench.bench_calibration [--series 10] [--epochs 6] [--epoch-size 800] [--seed 1] [--method platt]

A few minutes on 2 CPU cores. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from p2ch_luna.metrics.calibration import CALIBRATION_METHODS
from p2ch_luna.models import load_checkpoint
from p2ch_luna.synth.generator import generate_dataset
from p2ch_luna.training import cli as training


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_calibration", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=10, help="synthetic series to generate")
    parser.add_argument("--epochs", type=int, default=6, help="nodule training epochs")
    parser.add_argument("--epoch-size", type=int, default=800, help="balanced training samples per epoch")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generator and of training")
    parser.add_argument("--method", choices=CALIBRATION_METHODS, default="platt", help="what the run fits")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_calibration_") as folder:
        root = Path(folder)
        generate_dataset(root / "data", series=args.series, seed=args.seed, shape=(96, 96), slices=(40, 50))
        out = root / "run"
        code = training.main([
            "nodule", "--data-root", str(root / "data"), "--cache-dir", str(root / "cache"),
            "--models-dir", str(out / "models"), "--runs-dir", str(out / "runs"), "--device", "cpu",
            "--batch-size", "16", "--epoch-size", str(args.epoch_size), "--val-stride", "3", "--balanced",
            "--model-kwargs", '{"conv_channels": 4}', "--chunk-shape", "16", "24", "24",
            "--epochs", str(args.epochs), "--seed", str(args.seed), "--calibration-method", args.method,
            "--log-level", "WARNING"])
        if code:
            return code
        best = load_checkpoint(next((out / "models").glob("*.best.state")))
        calibration = best.raw["calibration"]
    print(f"validation: {calibration['validation_samples']} samples, {calibration['validation_positives']} "
          f"positive; best epoch {calibration['epoch']}")
    print(f"method {calibration['method']}, temperature {calibration['temperature']:.3f}, "
          f"bias {calibration['bias']:.3f}"
          + (f" ({calibration['reason']})" if calibration["reason"] else ""))
    print(f"ECE ({calibration['ece_bins']} bins) {calibration['ece_before']:.4f} -> {calibration['ece_after']:.4f}; "
          f"NLL {calibration['nll_before']:.4f} -> {calibration['nll_after']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
