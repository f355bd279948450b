"""Where the classifier's training step spends its GPU time: layout, precision, batch and compile
variants of the model step alone (random batch on the device), then a profile of one variant.

    python bench/bench_classifier_step.py [--device cuda] [--seconds 3] [--profile-batch 256]

Each variant times forward + backward + SGD step of ``LunaModel`` on a
1x32x48x48 batch already on the device (no data path): the ceiling that
``bench_gpu.py``'s end-to-end figures are measured against. The profile lists
the operators with the most device time for batch ``--profile-batch``, bfloat16,
channels-last.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_training import step_rate, synchronize  # noqa: E402
from p2ch_luna.engine import amp_settings, tune_backends  # noqa: E402
from p2ch_luna.models import LunaModel  # noqa: E402
from p2ch_luna.models.classifier import CHUNK_SHAPE_IRC  # noqa: E402

WARMUP_STEPS = 5


def make_step(batch: int, amp: bool, channels_last: bool, compiled: bool, input_norm: bool,
              device: torch.device):
    """A closure running one training step of a fresh seeded model on a fixed random batch; returns its size."""
    torch.manual_seed(0)
    model = LunaModel().to(device)
    if not input_norm:
        model.tail_batchnorm = nn.Identity()
    inputs = torch.randn(batch, 1, *CHUNK_SHAPE_IRC, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        inputs = inputs.contiguous(memory_format=torch.channels_last_3d)
    labels = torch.randint(0, 2, (batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    forward = torch.compile(model) if compiled else model
    autocast = amp_settings(amp, device)

    def step() -> int:
        optimizer.zero_grad(set_to_none=True)
        with autocast.autocast(device):
            logits = forward(inputs)
        nn.functional.cross_entropy(logits.float(), labels).backward()
        optimizer.step()
        return batch

    return step


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed stretch per variant")
    parser.add_argument("--profile-batch", type=int, default=256)
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    tune_backends(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} on {name}", flush=True)
    variants = [  # batch, amp, channels_last, compiled, input_norm
        (32, False, False, False, True),
        (256, False, False, False, True),
        (256, False, True, False, True),
        (256, True, False, False, True),
        (256, True, True, False, True),
        (256, True, True, False, False),
        (1024, True, True, False, True),
    ]
    if not args.skip_compile:
        variants += [(256, True, True, True, True), (1024, True, True, True, True)]
    for batch, amp, channels_last, compiled, input_norm in variants:
        label = (f"batch {batch:5d} {'bf16' if amp else 'fp32'} {'channels-last ' if channels_last else 'channels-first'}"
                 f"{' compiled' if compiled else ''}{'' if input_norm else ' no-input-batchnorm'}")
        try:
            value = step_rate(make_step(batch, amp, channels_last, compiled, input_norm, device), args.seconds, device,
                              WARMUP_STEPS)
            print(f"{label:<62s} {value:10.0f} samples/s", flush=True)
        except Exception as error:  # keep the other variants' figures
            print(f"{label:<62s} FAILED {type(error).__name__}: {error}", flush=True)

    step = make_step(args.profile_batch, True, True, False, True, device)
    for _ in range(WARMUP_STEPS):
        step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(5):
            step()
        synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(profile.key_averages().table(sort_by=sort_by, row_limit=18, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
