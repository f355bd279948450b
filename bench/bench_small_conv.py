"""Each of the classifier's convolutions, cuDNN against ``small_conv``'s Triton kernels.

    python -m bench.bench_small_conv [--batch 256] [--repeats 20] [--device cuda] [--fp32]

For every ``LunaModel`` layer at batch ``--batch``, bfloat16 autocast (float32
with ``--fp32``), channels-last: the median time of the forward (convolution,
bias and ReLU) and of forward + backward (the input gradient, except for the
first layer, whose input needs none in training; weight and bias gradients),
cuDNN's way (``LunaConv3d.triton = False``) and the Triton kernels' way, with
the ratio and how far the Triton outputs and gradients lie from cuDNN's
(relative norm of the difference). The last line sums the layers: the
convolutions' share of a training step, both ways. On the CPU the kernels run
in Triton's interpreter (``TRITON_INTERPRET=1``), for a correctness look at a
small ``--batch`` and ``--chunk-shape`` only.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

from bench.common import median_ms
from p2ch_luna.kernels.support import relative_difference
from p2ch_luna.models import LunaModel, small_conv
from p2ch_luna.models.classifier import CHUNK_SHAPE_IRC, POOL_FACTOR, LunaConv3d


def classifier_layers(chunk_shape: Sequence[int] = CHUNK_SHAPE_IRC) -> list[tuple[str, int, int, tuple[int, ...]]]:
    """(name, input channels, output channels, volume shape) of each convolution of a ``LunaModel`` reading
    ``chunk_shape`` volumes."""
    model = LunaModel(input_shape=chunk_shape)
    layers = []
    shape = tuple(chunk_shape)
    for name in model.block_names:
        block = getattr(model, name)
        for conv_name in ("conv1", "conv2"):
            conv = getattr(block, conv_name)
            layers.append((f"{name}.{conv_name}", conv.in_channels, conv.out_channels, shape))
        shape = tuple(size // POOL_FACTOR for size in shape)
    return layers


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--chunk-shape", type=int, nargs=3, default=list(CHUNK_SHAPE_IRC), metavar=("I", "R", "C"),
                        help="the classifier's input volume (smaller for a look on the CPU)")
    parser.add_argument("--fp32", action="store_true", help="float32 (TF32 products) instead of bfloat16 autocast")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    if small_conv.kernels() is None or not small_conv.runs_on(torch.empty(1, 1, 1, 1, 1, device=device), 8):
        print("small_conv's kernels do not run here (needs Triton, and CUDA or TRITON_INTERPRET=1)")
        return 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    dtype = torch.float32 if args.fp32 else torch.bfloat16
    print(f"torch {torch.__version__} on {name}; batch {args.batch}, {dtype}, channels-last", flush=True)
    print(f"{'layer':<14s} {'C->K':>7s} {'volume':>10s} | {'fwd cuDNN':>9s} {'Triton':>7s} {'ratio':>6s} | "
          f"{'fwd+bwd cuDNN':>13s} {'Triton':>7s} {'ratio':>6s} | max rel. diff", flush=True)
    totals = {False: 0.0, True: 0.0}
    generator = torch.Generator(device=device).manual_seed(0)
    for layer, in_channels, out_channels, shape in classifier_layers(args.chunk_shape):
        conv = LunaConv3d(in_channels, out_channels, kernel_size=3, padding=1).to(device)
        x = torch.randn(args.batch, in_channels, *shape, device=device, generator=generator).contiguous(
            memory_format=torch.channels_last_3d)
        x.requires_grad_(in_channels > 1)
        upstream = torch.randn(args.batch, out_channels, *shape, device=device, generator=generator).contiguous(
            memory_format=torch.channels_last_3d)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.fp32)
        forward_ms, both_ms, results = {}, {}, {}
        for use_triton in (False, True):
            conv.triton = use_triton

            def forward() -> torch.Tensor:
                with torch.no_grad(), autocast:
                    return conv.rectified(x)

            def forward_backward() -> list[torch.Tensor]:
                conv.zero_grad(set_to_none=True)
                x.grad = None
                with autocast:
                    y = conv.rectified(x)
                y.backward(upstream.to(y.dtype))
                return [y.detach(), conv.weight.grad, conv.bias.grad] + ([x.grad] if x.requires_grad else [])

            results[use_triton] = forward_backward()
            forward_ms[use_triton] = median_ms(forward, args.repeats, device)
            both_ms[use_triton] = median_ms(forward_backward, args.repeats, device)
            totals[use_triton] += both_ms[use_triton]
        difference = max(relative_difference(a, b) for a, b in zip(results[True], results[False]))
        print(f"{layer:<14s} {in_channels:>3d}->{out_channels:<3d} {'x'.join(map(str, shape)):>10s} | "
              f"{forward_ms[False]:9.3f} {forward_ms[True]:7.3f} {forward_ms[False] / forward_ms[True]:5.2f}x | "
              f"{both_ms[False]:13.3f} {both_ms[True]:7.3f} {both_ms[False] / both_ms[True]:5.2f}x | "
              f"{difference:.1e}", flush=True)
        del conv, x, upstream, results
    print(f"{'all layers':<34s} | {'':>25s} | {totals[False]:13.3f} {totals[True]:7.3f} "
          f"{totals[False] / totals[True]:5.2f}x", flush=True)
    print("tiles chosen:")
    for key, tile in small_conv.TILE_CHOICE.chosen.items():
        form = tile or "torch (no launch form agreed)"
        print(f"  {key[0]:<12s} C={key[1]:<3d} K={key[2]:<3d} {str(key[3]):<15s} {key[4:7]} {key[7]} {key[9:]}: "
              f"{form}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
