"""Where the classifier's training step spends its GPU time: layout, precision, batch, first-convolution
and compile variants of the model step alone (random batch on the device), then profiles.

    python -m bench.bench_classifier_step [--device cuda] [--seconds 3] [--profile-batch 256]

Each variant times forward + backward + SGD step of ``LunaModel`` on a
1x32x48x48 batch already on the device (no data path): the ceiling that
``bench_gpu.py``'s end-to-end figures are measured against. "1-channel conv1"
runs the first convolution on its one input channel as ``nn.Conv3d`` would
(otherwise ``LunaConv3d`` pads it to 8 channels on CUDA); "unfolded"
runs the input batch norm and then that convolution (otherwise
``normalised_convolution``); "all cuDNN algorithms" lets cuDNN's autotuner try
every algorithm (``torch.backends.cudnn.benchmark_limit = 0``). Unmarked is the
model's default on CUDA. "Triton <=N" runs the layers of at most N output
channels on ``small_conv``'s Triton kernels and the others on cuDNN ("cuDNN
only": none); ``--triton-sweep`` times only those. ``--accuracy-batch N``
first compares one step's bfloat16 gradients with float32 ones, per
parameter. On the CPU only batch 32, float32, with and without the folded
first layer, runs. The profile lists the operators with the most device time
for batch ``--profile-batch``, bfloat16, channels-last, the model's default.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence

import torch
from torch import nn

from bench.common import route_convolutions, step_rate, synchronize
from p2ch_luna.kernels.support import relative_difference
from p2ch_luna.models import LunaModel, small_conv
from p2ch_luna.models.classifier import CHUNK_SHAPE_IRC
from p2ch_luna.precision import amp_settings, tune_backends

WARMUP_STEPS = 5
DEFAULT_BENCHMARK_LIMIT = torch.backends.cudnn.benchmark_limit


@dataclasses.dataclass(frozen=True)
class Variant:
    """One timed form of the model step; the defaults are the model's default on CUDA at batch 256, bf16."""

    batch: int = 256
    amp: bool = True
    channels_last: bool = True
    compiled: bool = False
    input_norm: bool = True
    padded: bool = True
    folded: bool = True
    all_algorithms: bool = False
    triton_channels: int | None = None
    """Layers of at most this many output channels use small_conv's Triton kernels (0: none); None: the default."""

    @property
    def label(self) -> str:
        marks = [f"batch {self.batch:5d}", "bf16" if self.amp else "fp32",
                 "channels-last" if self.channels_last else "channels-first"]
        marks += [mark for mark, on in [("compiled", self.compiled), ("no-input-batchnorm", not self.input_norm),
                                        ("1-channel conv1", not self.padded),
                                        ("unfolded", self.input_norm and not self.folded),
                                        ("all cuDNN algorithms", self.all_algorithms)] if on]
        if self.triton_channels is not None:
            marks.append(f"Triton <={self.triton_channels}" if self.triton_channels else "cuDNN only")
        return " ".join(marks)


def make_step(variant: Variant, device: torch.device):
    """A closure running one training step of a fresh seeded model on a fixed random batch; returns its size."""
    torch.manual_seed(0)
    batch = variant.batch
    model = LunaModel().to(device)
    if not variant.input_norm:
        model.tail_batchnorm = nn.Identity()
    if not variant.padded:
        model.block1.conv1.channel_multiple = 1
    model.fold_input_normalisation = variant.folded  # explicit, so the CPU can time both forms
    if variant.triton_channels is not None:
        route_convolutions(model, variant.triton_channels)
    inputs = torch.randn(batch, 1, *CHUNK_SHAPE_IRC, device=device) * 300 - 500
    if variant.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        inputs = inputs.contiguous(memory_format=torch.channels_last_3d)
    labels = torch.randint(0, 2, (batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    forward = torch.compile(model) if variant.compiled else model
    autocast = amp_settings(variant.amp, device)

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
    parser.add_argument("--triton-sweep", action="store_true",
                        help="only the variants that move layers between cuDNN and the Triton kernels")
    parser.add_argument("--accuracy-batch", type=int, default=0, metavar="N",
                        help="first compare one step's gradients, bf16 on cuDNN and bf16 by default, against "
                             "float32 on cuDNN without TF32, at batch N (0: skip)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    tune_backends(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} on {name}", flush=True)
    if args.accuracy_batch:
        print_gradient_accuracy(device, args.accuracy_batch)
    cudnn = 0  # the first layer's forms are cuDNN's
    variants = [
        Variant(batch=32, amp=False, channels_last=False, padded=False, folded=False, triton_channels=cudnn),
        Variant(batch=32, amp=False, channels_last=False, triton_channels=cudnn),
        Variant(padded=False, folded=False, triton_channels=cudnn),
        Variant(folded=False, triton_channels=cudnn),
        Variant(padded=False, triton_channels=cudnn),
        Variant(triton_channels=cudnn),
        Variant(),
        Variant(input_norm=False),
        Variant(amp=False),
        Variant(batch=1024),
        Variant(all_algorithms=True),
    ]
    if not args.skip_compile:
        variants += [Variant(compiled=True), Variant(batch=1024, compiled=True)]
    if args.triton_sweep:
        variants = [Variant(triton_channels=channels) for channels in (0, 8, 16, 32, 64)]
        variants += [Variant(amp=False, triton_channels=0), Variant(amp=False), Variant(batch=1024, triton_channels=0),
                     Variant(batch=1024)]
    if device.type == "cpu":  # bfloat16 and large batches take minutes there; compare the first layer's forms
        variants = [Variant(batch=32, amp=False, padded=False, folded=folded) for folded in (False, True)]
    for variant in variants:
        torch.backends.cudnn.benchmark_limit = 0 if variant.all_algorithms else DEFAULT_BENCHMARK_LIMIT
        try:
            value = step_rate(make_step(variant, device), args.seconds, device, WARMUP_STEPS)
            print(f"{variant.label:<76s} {value:10.0f} samples/s", flush=True)
        except Exception as error:  # keep the other variants' figures
            print(f"{variant.label:<76s} FAILED {type(error).__name__}: {error}", flush=True)
    torch.backends.cudnn.benchmark_limit = DEFAULT_BENCHMARK_LIMIT

    profiled = Variant(batch=args.profile_batch, amp=device.type == "cuda")
    print(f"\nprofile: {profiled.label}", flush=True)
    print_profile(make_step(profiled, device), device)
    return 0


def print_gradient_accuracy(device: torch.device, batch: int) -> None:
    """Per parameter, the relative error of one bfloat16 step's gradient, every convolution on cuDNN and the
    model's default, against a float32 step on cuDNN without TF32 (same weights, inputs and labels)."""
    generator = torch.Generator(device=device).manual_seed(0)
    inputs = (torch.randn(batch, 1, *CHUNK_SHAPE_IRC, device=device, generator=generator) * 300 - 500).contiguous(
        memory_format=torch.channels_last_3d)
    labels = torch.randint(0, 2, (batch,), device=device, generator=generator)
    grads = {}
    saved_tf32 = torch.backends.cudnn.allow_tf32
    for name, triton_channels, amp in [("reference", 0, False), ("cuDNN bf16", 0, True), ("default bf16", None, True)]:
        torch.manual_seed(0)
        model = LunaModel().to(device).to(memory_format=torch.channels_last_3d)
        if triton_channels is not None:
            route_convolutions(model, triton_channels)
        torch.backends.cudnn.allow_tf32 = amp
        with amp_settings(amp, device).autocast(device):
            logits = model(inputs)
        nn.functional.cross_entropy(logits.float(), labels).backward()
        grads[name] = {key: p.grad.double() for key, p in model.named_parameters()}
    torch.backends.cudnn.allow_tf32 = saved_tf32
    print(f"gradient relative error against float32, batch {batch}:")
    print(f"  {'parameter':<24s} {'cuDNN bf16':>10s} {'default bf16':>13s}")
    for key, reference in grads["reference"].items():
        errors = [relative_difference(grads[name][key], reference)
                  for name in ("cuDNN bf16", "default bf16")]
        print(f"  {key:<24s} {errors[0]:10.3f} {errors[1]:13.3f}", flush=True)


def print_profile(step, device: torch.device) -> None:
    """The operators with the most device time over 5 steps (after warm-up)."""
    for _ in range(WARMUP_STEPS):
        step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as profile:
        for _ in range(5):
            step()
        synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(profile.key_averages().table(sort_by=sort_by, row_limit=16, max_name_column_width=60), flush=True)
    print("the same by input shapes (operators only):", flush=True)
    print(profile.key_averages(group_by_input_shape=True).table(sort_by=sort_by, row_limit=14, max_name_column_width=30,
                                                                max_shapes_column_width=70), flush=True)
    for key, tile in small_conv.TILE_CHOICE.chosen.items():
        form = tile or "torch (no launch form agreed)"
        print(f"tile: {key[0]:<12s} C={key[1]:<3d} K={key[2]:<3d} {key[3]} {key[4:7]} {key[7]} voxels "
              f"{key[9:]}: {form}")


if __name__ == "__main__":
    sys.exit(main())
