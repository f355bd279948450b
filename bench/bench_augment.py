"""The classifier's on-device augmentation alone: torch's operators against ``resample``'s fused kernel.

    python -m bench.bench_augment [--device cuda] [--batch 256] [--repeats 20] [--chunk-shape 32 48 48]

Times ``augment.augment_batch_3d`` on a batch of int16 HU chunks already on the device, with the book's
augmentation (mirroring, offset, zoom, rotation, noise), as the training step runs it: first with torch's
operators (``AugmentConfig.fused=False``: float conversion, ``affine_grid``, ``grid_sample``, noise, sum),
then through the fused Triton kernel, with the median milliseconds per batch, the ratio and, without noise,
the largest difference between the two results in HU. Compare the milliseconds with the model step's
(``bench_classifier_step.py``): at batch 256 on an H200 the step took about 17.6 ms. The fused kernel runs
on CUDA only (on the CPU, Triton's interpreter is for correctness, not speed), so on the CPU only torch's
operators are timed.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Sequence

import torch

from bench.common import median_ms
from p2ch_luna.data import resample
from p2ch_luna.data.augment import AugmentConfig, augment_batch_3d
from p2ch_luna.models.classifier import CHUNK_SHAPE_IRC

TORCH = "torch's operators"
FUSED = "fused kernel"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--chunk-shape", type=int, nargs=3, default=list(CHUNK_SHAPE_IRC), metavar=("I", "R", "C"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    chunks = torch.randint(-1000, 600, (args.batch, 1, *args.chunk_shape), generator=generator,
                           dtype=torch.int16).to(device)
    book = AugmentConfig.book()
    configs = {TORCH: dataclasses.replace(book, fused=False), FUSED: dataclasses.replace(book, fused=True)}
    if not (device.type == "cuda" and resample.runs_on(chunks)):
        print(f"fused kernel: does not run on {device} here; timing torch's operators only")
        del configs[FUSED]
    print(f"augment_batch_3d, int16 batch {args.batch}x1x{'x'.join(map(str, args.chunk_shape))}, book augmentation,"
          f" {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    times = {}
    for name, config in configs.items():
        device_generator = torch.Generator(device=device).manual_seed(1)
        times[name] = median_ms(lambda: augment_batch_3d(chunks, config, device_generator), args.repeats, device)
        print(f"  {name:<18s} {times[name]:8.3f} ms/batch  {args.batch / times[name] * 1000:10.0f} samples/s",
              flush=True)
    if len(times) == 2:
        results = [augment_batch_3d(chunks, dataclasses.replace(config, noise=0.0),
                                    torch.Generator(device=device).manual_seed(1)) for config in configs.values()]
        print(f"  {FUSED} vs {TORCH}: {times[TORCH] / times[FUSED]:.2f}x, "
              f"largest difference without noise {float((results[0] - results[1]).abs().max()):.2g} HU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
