"""3x3x3 convolutions of few channels (the classifier's) as Triton kernels, with autograd.

cuDNN's 3D convolution kernels fill the tensor cores poorly at the classifier's
1-16 channels (a few percent of the chip's rate on the first two layers). The kernels in ``small_conv_kernels`` gather
each output voxel's 27 x C inputs straight from the channels-last volume and
multiply them on the tensor cores, with the bias and the ReLU in the same
pass; the input gradient is the same kernel with the flipped, transposed
weights, and the weight gradient a second kernel that reduces over the voxels
in splits. The layers of up to 16 channels run markedly faster so
(``python -m bench.bench_small_conv``, ``python -m bench.bench_classifier_step --triton-sweep``;
figures in docs/benchmarks.md).

Each problem size gets the fastest of a few launch forms (``Tile``), timed on
its first call; a form must reproduce torch's own result for that problem
(cuDNN's, on a GPU), since one form was seen miscompiled at full size
(``fastest_agreeing_tile``), and where no form does, torch computes that
problem. Before the first use on a GPU the kernels check themselves against
torch on a small convolution (``works_on``); where Triton is missing, too old,
cannot build or computes wrong, cuDNN convolves instead.

``convolution(x, weight, bias, rectify)`` is ``relu?(conv3d(x, weight, padding=1) + bias)``;
``bias`` may be a per-channel vector or a (1, K, D, H, W) map added to every
volume of the batch. It runs on CUDA tensors where Triton is installed, and on
CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, for the tests).
Under autocast it computes in the autocast type, like cuDNN; in float32 it uses
TF32 where ``torch.backends.cudnn.allow_tf32`` lets cuDNN's convolutions do so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from types import ModuleType
from typing import Callable

import torch
from torch import nn

from p2ch_luna.kernels.support import (
    Result,
    compiler_disabled,
    compiling,
    interpreting,
    relative_difference,
    triton_usable,
)

logger = logging.getLogger(__name__)

TAPS = 27
MIN_CAPABILITY = (8, 0)
"""bfloat16 tensor-core products, which the kernels compile to, need an Ampere or later GPU."""
SELF_TEST_TOLERANCE = 1e-4
MIN_DOT_SIZE = 16
"""Triton's smallest reduction dimension of a matrix product (and the output width it pads to anyway)."""
NARROW_DOT_SIZE = 8
"""The narrowest output width tried: Hopper's tensor-core products come 8 columns wide."""
MAX_ELEMENTS = 2**31 - 1
"""The kernels index with 32-bit integers."""
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SPLITS_PER_MULTIPROCESSOR = 16
"""Weight-gradient programs per multiprocessor: enough to fill the chip, few enough partial sums."""
TILE_TOLERANCE = 2e-2
"""Largest relative difference from torch's result that a launch form may show on a problem (both round their
bfloat16 outputs, about 4e-3 apart at most; a miscompiled form was 1.4 off)."""
TUNED_VOXELS = 1 << 20
"""Problems of fewer voxels take the first tile untimed (timing them costs more than any tile saves)."""


@dataclasses.dataclass(frozen=True)
class Tile:
    """A kernel launch's form: voxels and reduction rows a program, warps, pipelining stages; whether the
    gather reads the neighbours' validity from a per-voxel bit mask (fewer integer operations); whether the
    output channels are padded only to a power of two (``narrow``) or to at least 16."""

    block_m: int
    block_r: int
    num_warps: int = 4
    num_stages: int = 3
    bitmask: bool = False
    narrow: bool = False

    def padded_channels(self, channels: int) -> int:
        """The matrix-product width for ``channels`` output channels."""
        return padded_size(channels, NARROW_DOT_SIZE if self.narrow else MIN_DOT_SIZE)


FORWARD_TILES = (Tile(128, 32), Tile(128, 64), Tile(128, 32, bitmask=True, narrow=True),
                 Tile(128, 64, bitmask=True), Tile(128, 64, bitmask=True, narrow=True),
                 Tile(256, 64, num_warps=8, bitmask=True, narrow=True),
                 Tile(256, 32, num_warps=8, bitmask=True, narrow=True))
"""The candidates, the plainest first (the one used untimed: small problems, the interpreter)."""
# (128, 32) with the bit-mask gather and 8 output columns computed wrong 8-channel weight gradients at full
# size on a GPU (see fastest_agreeing_tile), so it is no candidate.
WEIGHT_GRAD_TILES = (Tile(128, 32), Tile(64, 64), Tile(64, 64, bitmask=True, narrow=True),
                     Tile(32, 256, num_warps=8, bitmask=True, narrow=True),
                     Tile(64, 128, num_warps=8, bitmask=True, narrow=True),
                     Tile(256, 32, num_warps=8, bitmask=True, narrow=True))


@functools.cache
def kernels() -> ModuleType | None:
    """The Triton kernels module, or None where Triton is not installed or older than ``MIN_TRITON``."""
    if not triton_usable():
        return None
    from p2ch_luna.kernels import small_conv as small_conv_kernels
    return small_conv_kernels


def shape_applies(conv: nn.Conv3d) -> bool:
    """Whether ``conv`` is the convolution these kernels compute: 3x3x3, stride 1, zero padding 1, no groups."""
    return (tuple(conv.kernel_size) == (3, 3, 3) and tuple(conv.stride) == (1, 1, 1)
            and tuple(conv.padding) == (1, 1, 1) and tuple(conv.dilation) == (1, 1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros")


def runs_on(x: torch.Tensor, out_channels: int) -> bool:
    """Whether ``convolution`` can take ``x`` into ``out_channels``: Triton is installed, ``x`` is on CUDA (or
    on the CPU under the interpreter), every tensor it touches fits 32-bit indexing, and no ``torch.compile``
    is tracing (compiled models convolve through torch, which the compiler can fuse)."""
    if compiling() or kernels() is None or x.dim() != 5:
        return False
    if not (x.is_cuda or (x.device.type == "cpu" and interpreting())) or compute_dtype(x) not in COMPUTE_DTYPES:
        return False
    voxels = x.numel() // max(x.shape[1], 1)
    if voxels * max(x.shape[1], padded_size(out_channels), 27) > MAX_ELEMENTS:
        return False
    return not x.is_cuda or (torch.cuda.get_device_capability(x.device) >= MIN_CAPABILITY and works_on(x.device))


@functools.cache
@compiler_disabled
def works_on(device: torch.device) -> bool:
    """Whether the kernels compile on ``device`` and compute a small convolution and its gradients as torch
    does (float32 products, against float64 on the CPU): checked once per process and device, so that a
    machine where Triton cannot build (no C compiler, an unsupported GPU) or computes wrong keeps cuDNN,
    with a warning, instead of failing or training on wrong numbers."""
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False), \
                torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            errors = _self_test_errors(device)
    except Exception as error:  # any failure to build or run: cuDNN stays in charge
        logger.warning("small_conv: the Triton kernels do not run on %s (%s: %s); cuDNN convolves instead",
                       device, type(error).__name__, error)
        return False
    if not max(errors) < SELF_TEST_TOLERANCE:
        logger.warning("small_conv: the Triton kernels compute wrong on %s (relative errors %s); cuDNN convolves "
                       "instead", device, ", ".join(f"{e:.2g}" for e in errors))
        return False
    return True


def _self_test_errors(device: torch.device) -> list[float]:
    """Relative errors of a small float32 convolution on ``device`` (value, input, weight and bias gradients)
    against float64 on the CPU."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 4, 5, 6, generator=generator, dtype=torch.float64)
    weight = torch.randn(8, 8, 3, 3, 3, generator=generator, dtype=torch.float64) * 0.2
    bias = torch.randn(8, generator=generator, dtype=torch.float64)
    upstream = torch.randn(2, 8, 4, 5, 6, generator=generator, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    expected = nn.functional.conv3d(x, weight, bias, padding=1).relu()
    expected_grads = torch.autograd.grad(expected, leaves, upstream)
    on_device = [t.detach().to(device, torch.float32).requires_grad_() for t in leaves]
    y = convolution(on_device[0].contiguous(memory_format=torch.channels_last_3d), on_device[1], on_device[2], True)
    grads = torch.autograd.grad(y, on_device, upstream.to(device, torch.float32))
    return [relative_difference(got.cpu(), want) for got, want in zip([y, *grads], [expected, *expected_grads])]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The type a convolution of ``x`` computes in: the autocast type under autocast, else ``x``'s."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def padded_size(size: int, minimum: int = MIN_DOT_SIZE) -> int:
    """``size`` rounded up to a power of two of at least ``minimum``."""
    return max(minimum, 1 << (size - 1).bit_length())


def weight_matrix(weight: torch.Tensor, columns: int) -> torch.Tensor:
    """(K, C, 3, 3, 3) weights as the kernels' (27 * C, columns >= K) matrix: row ``tap * C + c``, column k,
    zero beyond K."""
    out_channels, in_channels = weight.shape[:2]
    matrix = weight.permute(2, 3, 4, 1, 0).reshape(TAPS * in_channels, out_channels)
    return nn.functional.pad(matrix, (0, columns - out_channels)).contiguous()


def input_gradient_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weights whose convolution of the output gradient is the input gradient: channels swapped, taps
    mirrored (a zero-padded 3x3x3 convolution's transpose)."""
    return weight.transpose(0, 1).flip(2, 3, 4)


def weight_from_matrix(matrix: torch.Tensor, out_channels: int, in_channels: int) -> torch.Tensor:
    """The inverse of ``weight_matrix`` (dropping any padded columns)."""
    return matrix[:, :out_channels].reshape(3, 3, 3, in_channels, out_channels).permute(4, 3, 0, 1, 2)


def dot_precision(dtype: torch.dtype) -> str:
    """Triton's input precision for the products: TF32 for float32 where cuDNN may use it."""
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"


def usable_tiles(tiles: tuple[Tile, ...], reduction: int) -> list[Tile]:
    """The tiles whose reduction block is not more than twice the reduction (27 channels and C=1: 32 rows)."""
    return [tile for tile in tiles if tile.block_r < 2 * reduction] or [min(tiles, key=lambda t: t.block_r)]


def fastest_agreeing_tile(tiles: list[Tile], run: Callable[[Tile], Result], expected: Result,
                          seconds: Callable[[Tile], float] | None = None) -> Tile | None:
    """Among the tiles whose ``run(tile)`` agrees with ``expected`` (torch's result for the same problem)
    within ``TILE_TOLERANCE``, the one with the least ``seconds(tile)``, or without ``seconds`` the first;
    None where none agrees. Tiles that disagree, or fail to build or run (a launch form may need more shared
    memory than a smaller GPU has), are logged and left out.

    One candidate, (128, 32) with the bit-mask gather and 8 output columns, was seen computing a wrong
    8-channel weight gradient at full size while every other candidate, and that one on small volumes
    and in the interpreter, agreed (docs/benchmarks.md): a compiler fault no
    test on small data can rule out for other shapes or GPUs, hence the check on the real problem, against
    torch rather than another form, which the same fault could hit.
    """
    agreeing = []
    for tile in tiles:
        try:
            difference = relative_difference(run(tile), expected)
        except Exception as error:  # e.g. more shared memory than this GPU has: the form is no candidate here
            logger.warning("small_conv: %s does not run here (%s: %s); not used", tile, type(error).__name__, error)
            continue
        if difference > TILE_TOLERANCE:  # NaN (non-finite data) compares False: nothing to tell the tiles apart
            logger.warning("small_conv: %s disagrees with torch (relative difference %.2g); not used", tile,
                           difference)
            continue
        if seconds is None:
            return tile
        agreeing.append(tile)
    return min(agreeing, key=seconds, default=None)


class TileChoice:
    """Which tile each kernel uses for a given problem, or None where torch computes it: on the first call of
    a problem on a checked device (CUDA), the fastest of the candidates that reproduce torch's result
    (``fastest_agreeing_tile``; for small problems the first that does, untimed); elsewhere (the
    interpreter, whose tests compare every result with float64) the first. An explicit cache, one per
    process."""

    def __init__(self, checked_device_types: tuple[str, ...] = ("cuda",)) -> None:
        self.chosen: dict[tuple, Tile | None] = {}
        self.checked_device_types = checked_device_types

    def choose(self, key: tuple, tiles: list[Tile], launch: Callable[[Tile], Result], device: torch.device,
               voxels: int, expected: Callable[[], Result]) -> Tile | None:
        """The tile for ``key``, or None; ``launch(tile)`` runs the kernel (repeatably) and returns its result,
        ``expected()`` computes that result with torch."""
        if key in self.chosen:
            return self.chosen[key]
        if device.type not in self.checked_device_types:
            best = tiles[0]
        else:
            timed = device.type == "cuda" and len(tiles) > 1 and voxels >= TUNED_VOXELS
            best = fastest_agreeing_tile(tiles, launch, expected(),
                                         (lambda tile: _cuda_milliseconds(launch, tile)) if timed else None)
            if best is None:
                logger.warning("small_conv: no launch form reproduces torch's result for %s; torch computes it",
                               key)
        self.chosen[key] = best
        return best


def _cuda_milliseconds(launch: Callable[[Tile], Result], tile: Tile, repeats: int = 3) -> float:
    """Device time of ``repeats`` launches with ``tile`` (already compiled)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        launch(tile)
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


TILE_CHOICE = TileChoice()


def _device_guard(x: torch.Tensor) -> contextlib.AbstractContextManager:
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def forward_pass(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rectify: bool) -> torch.Tensor:
    """``relu?(conv(x, weight) + bias)`` for ``x`` and ``weight`` of one dtype; the output is channels-last."""
    x = x.contiguous(memory_format=torch.channels_last_3d)
    batch, in_channels, depth, height, width = x.shape
    out_channels = weight.shape[0]
    voxels = batch * depth * height * width
    matrices: dict[int, torch.Tensor] = {}
    y = torch.empty((batch, out_channels, depth, height, width), dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last_3d)
    bias_mode, bias_values, period = 0, weight, 1
    if bias is not None and bias.dim() == 1:
        bias_mode, bias_values = 1, bias.contiguous()
    elif bias is not None:  # (1, K, D, H, W) map
        bias_mode, period = 2, depth * height * width
        bias_values = bias.permute(0, 2, 3, 4, 1).reshape(period, out_channels).contiguous()
    module = kernels()

    def launch(tile: Tile) -> torch.Tensor:
        columns = tile.padded_channels(out_channels)
        if columns not in matrices:
            matrices[columns] = weight_matrix(weight, columns)
        module.conv3x3x3_kernel[(_ceil_div(voxels, tile.block_m),)](
            x, matrices[columns], bias_values, y, voxels, depth, height, width, period,
            C=in_channels, K=out_channels, K_PAD=columns, BIAS=bias_mode, RELU=rectify,
            PRECISION=dot_precision(x.dtype), BLOCK_M=tile.block_m, BLOCK_R=tile.block_r, BITMASK=tile.bitmask,
            num_warps=tile.num_warps, num_stages=tile.num_stages)
        return y

    key = ("forward", in_channels, out_channels, x.dtype, depth, height, width, size_class(voxels), x.device,
           bias_mode, rectify)  # each compiled specialisation is checked on its own
    with _device_guard(x):
        tile = TILE_CHOICE.choose(key, usable_tiles(FORWARD_TILES, TAPS * in_channels), launch, x.device,
                                  voxels, lambda: torch_forward_pass(x, weight, bias, rectify))
        if tile is None:
            return torch_forward_pass(x, weight, bias, rectify)
        launch(tile)
    return y


def torch_forward_pass(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       rectify: bool) -> torch.Tensor:
    """``forward_pass`` through torch's ``conv3d`` (cuDNN on a GPU), in ``x``'s dtype as under autocast: the
    launch forms' reference, and the stand-in where none reproduces it."""
    vector = bias is not None and bias.dim() == 1
    y = nn.functional.conv3d(x, weight, bias.to(x.dtype) if vector else None, padding=1)
    if bias is not None and not vector:
        y = y + bias.to(x.dtype)
    if rectify:
        y = y.relu_()
    return y.contiguous(memory_format=torch.channels_last_3d)


def weight_gradient(x: torch.Tensor, grad: torch.Tensor, with_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The float32 weight gradient (K, C, 3, 3, 3) and, if asked, the per-channel bias gradient, of a
    convolution of ``x`` whose output gradient (after the ReLU) is ``grad`` (of ``x``'s dtype)."""
    x = x.contiguous(memory_format=torch.channels_last_3d)
    grad = grad.contiguous(memory_format=torch.channels_last_3d)
    batch, in_channels, depth, height, width = x.shape
    out_channels = grad.shape[1]
    voxels = batch * depth * height * width
    reduction = TAPS * in_channels
    module = kernels()
    programs = SPLITS_PER_MULTIPROCESSOR * (
        torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1)
    holder: dict[str, torch.Tensor] = {}

    def launch(tile: Tile) -> tuple[torch.Tensor, ...]:
        row_blocks = _ceil_div(reduction, tile.block_r)
        voxel_blocks = _ceil_div(voxels, tile.block_m)
        blocks_per_split = split_size(voxel_blocks, max(1, programs // row_blocks))
        splits = _ceil_div(voxel_blocks, blocks_per_split)
        columns = tile.padded_channels(out_channels)
        holder["weight"] = torch.empty((splits, reduction, columns), dtype=torch.float32, device=x.device)
        holder["bias"] = torch.empty((splits, columns), dtype=torch.float32, device=x.device)
        module.conv3x3x3_weight_grad_kernel[(row_blocks, splits)](
            x, grad, holder["weight"], holder["bias"], voxels, depth, height, width,
            C=in_channels, K=out_channels, K_PAD=columns, BIAS_GRAD=with_bias, PRECISION=dot_precision(x.dtype),
            BLOCK_M=tile.block_m, BLOCK_R=tile.block_r, BLOCKS_PER_SPLIT=blocks_per_split, BITMASK=tile.bitmask,
            num_warps=tile.num_warps, num_stages=tile.num_stages)
        matrix = holder["weight"].sum(0)[:, :out_channels]
        return (matrix, holder["bias"].sum(0)[:out_channels]) if with_bias else (matrix,)

    def expected() -> tuple[torch.Tensor, ...]:
        weight_grad, bias_grad = torch_weight_gradient(x, grad, with_bias)
        matrix = weight_matrix(weight_grad, out_channels)
        return (matrix, bias_grad) if with_bias else (matrix,)

    key = ("weight_grad", in_channels, out_channels, x.dtype, depth, height, width, size_class(voxels), x.device,
           with_bias)
    with _device_guard(x):
        tile = TILE_CHOICE.choose(key, usable_tiles(WEIGHT_GRAD_TILES, reduction), launch, x.device, voxels,
                                  expected)
        if tile is None:
            return torch_weight_gradient(x, grad, with_bias)
        matrix, *bias_grad = launch(tile)
    return weight_from_matrix(matrix, out_channels, in_channels), bias_grad[0] if with_bias else None


def torch_weight_gradient(x: torch.Tensor, grad: torch.Tensor,
                          with_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``weight_gradient`` through torch (cuDNN on a GPU): the launch forms' reference and stand-in."""
    shape = (grad.shape[1], x.shape[1], 3, 3, 3)
    weight_grad = torch.nn.grad.conv3d_weight(x, shape, grad, padding=1).float()
    return weight_grad, grad.sum((0, 2, 3, 4), dtype=torch.float32) if with_bias else None


def size_class(voxels: int) -> str:
    """The power-of-two range of a problem's voxels: the tiles are chosen anew for each."""
    return f"<2^{voxels.bit_length()}"


def split_size(blocks: int, splits: int) -> int:
    """Blocks of voxels a weight-gradient program sums: a power of two (so that batches of other sizes
    reuse the compiled kernel) giving at most about ``splits`` programs a reduction block."""
    return 1 << (_ceil_div(blocks, splits) - 1).bit_length()


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


class _Convolution(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rectify: bool,
                dtype: torch.dtype) -> torch.Tensor:
        inputs = x.to(dtype).contiguous(memory_format=torch.channels_last_3d)  # once, for both passes
        weights = weight.to(dtype)
        y = forward_pass(inputs, weights, bias, rectify)
        ctx.rectify = rectify
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.bias_is_map = bias is not None and bias.dim() > 1
        ctx.save_for_backward(inputs if ctx.needs_input_grad[1] else None,
                              weights if ctx.needs_input_grad[0] else None, y if rectify else None)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        inputs, weights, y = ctx.saved_tensors
        x_dtype, weight_dtype, bias_dtype = ctx.dtypes
        grad = grad_y
        if ctx.rectify:  # written channels-last whatever grad_y's layout, so the kernels read it without a copy
            grad = torch.mul(grad_y, y > 0, out=torch.empty_like(y))
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = forward_pass(grad.to(weights.dtype), input_gradient_weight(weights), None, False).to(x_dtype)
        if ctx.needs_input_grad[1]:  # the kernel sums the per-channel bias gradient on the way
            vector_bias = ctx.needs_input_grad[2] and not ctx.bias_is_map
            grad_weight, grad_bias = weight_gradient(inputs, grad.to(inputs.dtype), vector_bias)
            grad_weight = grad_weight.to(weight_dtype)
        if ctx.needs_input_grad[2]:
            if ctx.bias_is_map:
                grad_bias = grad.float().sum(0, keepdim=True)
            elif grad_bias is None:  # frozen weights, trainable bias
                grad_bias = grad.float().sum((0, 2, 3, 4))
            grad_bias = grad_bias.to(bias_dtype)
        return grad_x, grad_weight, grad_bias, None, None


@compiler_disabled
def convolution(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                rectify: bool = False) -> torch.Tensor:
    """``relu?(conv3d(x, weight, padding=1) + bias)`` through the Triton kernels (see the module's docstring);
    the output is channels-last, in the autocast type under autocast, else in ``x``'s type."""
    if weight.shape[2:] != (3, 3, 3) or x.shape[1] != weight.shape[1]:
        raise ValueError(f"expected (K, {x.shape[1]}, 3, 3, 3) weights, got {tuple(weight.shape)}")
    dtype = compute_dtype(x)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _Convolution.apply(x, weight, bias, rectify, dtype)
    return forward_pass(x.to(dtype), weight.to(dtype), bias, rectify)
