"""The book's 3D CNN nodule classifier (chapters 11 and 14), returning logits."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from p2ch_luna.kernels.choice import uses_triton
from p2ch_luna.models import small_conv
from p2ch_luna.models.weights import init_book_weights

CHUNK_SHAPE_IRC = (32, 48, 48)
"""The book's candidate chunk size (index, row, col) that the classifier reads."""

N_CLASSES = 2
POOL_FACTOR = 2
CUDA_CHANNEL_MULTIPLE = 8
"""Input channels that cuDNN's tensor-core convolution kernels want a multiple of (bfloat16/float16)."""
TRITON_MAX_CHANNELS = 16
"""With ``--kernels triton``, layers of at most this many output channels use ``small_conv``'s Triton kernels on
CUDA: the
training step was fastest with blocks 1-2 on them and blocks 3-4 on cuDNN
(``python -m bench.bench_classifier_step --triton-sweep``)."""


def pad_channels(x: torch.Tensor, weight: torch.Tensor, multiple: int,
                 memory_format: torch.memory_format = torch.contiguous_format) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (N, C, ...) and ``weight`` (O, C, ...) with zero channels appended up to a multiple of ``multiple``,
    both laid out in ``memory_format``.

    A convolution of the padded pair equals that of the originals (the extra
    input channels meet zero weights), and gradients flow back to the
    originals only.
    """
    missing = -x.shape[1] % multiple
    padded = torch.empty((x.shape[0], x.shape[1] + missing, *x.shape[2:]), dtype=x.dtype, device=x.device,
                         memory_format=memory_format)
    padded[:, x.shape[1]:] = 0
    padded[:, : x.shape[1]] = x
    padded_weight = nn.functional.pad(weight, (0, 0) * (weight.dim() - 2) + (0, missing))
    return padded, padded_weight.contiguous(memory_format=memory_format)


class LunaConv3d(nn.Conv3d):
    """``nn.Conv3d`` with the classifier's two ways to run faster on CUDA, and an optional fused ReLU.

    - Small channel counts go to ``small_conv``'s Triton kernels (3x3x3, stride
      1, padding 1, the ReLU fused in ``rectified``; where Triton runs):
      ``triton`` False (the default, ``--kernels torch``) never; None
      (``--kernels triton``, see ``select_kernels``) on CUDA for layers of at most
      ``TRITON_MAX_CHANNELS`` output channels; True wherever those kernels run
      (the CPU too, under Triton's interpreter). Same results as
      cuDNN within rounding (bfloat16 gradients as close to float32 ones as
      cuDNN's; ``python -m bench.bench_classifier_step --accuracy-batch N``).
    - Otherwise, on CUDA, the input channels are padded with zeros up to
      ``channel_multiple``: cuDNN ran the classifier's 1-channel first
      convolution with a generic kernel plus layout conversions
      (``implicit_convolveNd_sgemm``, ``nchwToNhwc``); padded to 8 channels
      (zero weights for the extra ones, channels-last) it runs on the
      tensor-core kernels of the other layers, with the same result and a
      faster training step (``python -m bench.bench_classifier_step``).

    Parameters and state_dict keys are those of ``nn.Conv3d``; on the CPU (and
    with ``channel_multiple = 1``, ``triton = False``) it is a plain ``nn.Conv3d``, left in float32 under
    bfloat16 autocast where the volume is thinner than the kernel (``needs_float32_on_cpu``).
    """

    channel_multiple: int = CUDA_CHANNEL_MULTIPLE
    triton: bool | None = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convolve(x, self.weight, self.bias)

    def rectified(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(self(x))``, the ReLU fused into the convolution where the Triton kernels run."""
        return self.convolve(x, self.weight, self.bias, rectify=True)

    def uses_triton(self, x: torch.Tensor) -> bool:
        """Whether this layer convolves ``x`` with ``small_conv``'s kernels (see ``triton``)."""
        if self.triton is False or not small_conv.shape_applies(self) or not small_conv.runs_on(x, self.out_channels):
            return False
        return bool(self.triton) or (x.is_cuda and self.out_channels <= TRITON_MAX_CHANNELS)

    def needs_float32_on_cpu(self, x: torch.Tensor) -> bool:
        """Whether this layer must leave CPU bfloat16 autocast for ``x``: a volume thinner than the kernel
        along some axis (the last block of a 16-slice chunk sees 2 slices).

        Under bfloat16 autocast the CPU's (oneDNN's) weight gradient of such a convolution now and then
        comes out NaN (seen with torch 2.13; docs/benchmarks.md, ``tests/models/test_models.py``), which stopped
        ``--amp`` training runs on finite losses. Volumes that small cost nothing in float32.
        """
        if x.is_cuda or not torch.is_autocast_enabled("cpu") or x.dtype == torch.float64:
            return False
        return any(size < kernel for size, kernel in zip(x.shape[2:], self.kernel_size))

    def convolve(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 rectify: bool = False) -> torch.Tensor:
        """``relu?(conv(x, weight) + bias)`` with another ``weight`` of this layer's shape; ``bias`` is None, one
        value per output channel, or a (1, K, D, H, W) map added to every volume of the batch."""
        if self.uses_triton(x):
            return small_conv.convolution(x, weight, bias, rectify)
        if self.needs_float32_on_cpu(x):
            with torch.autocast("cpu", enabled=False):
                return self.convolve(x.float(), weight.float(), None if bias is None else bias.float(), rectify)
        vector = bias if bias is None or bias.dim() == 1 else None
        if not x.is_cuda or self.channel_multiple <= 1 or x.shape[1] % self.channel_multiple == 0:
            y = self._conv_forward(x, weight, vector)
        else:
            padded, padded_weight = pad_channels(x, weight, self.channel_multiple, torch.channels_last_3d)
            y = self._conv_forward(padded, padded_weight, vector)
        if vector is not bias:
            y = y + bias
        return y.relu_() if rectify else y


def select_kernels(model: nn.Module, kernels: str) -> nn.Module:
    """Set which implementation ``model``'s ``LunaConv3d`` layers convolve with (``--kernels``): ``torch``
    (cuDNN, and torch's own convolution on the CPU) or ``triton`` (``small_conv``'s kernels on CUDA for layers of
    at most ``TRITON_MAX_CHANNELS`` output channels); returns ``model``."""
    setting = None if uses_triton(kernels) else False
    for module in model.modules():
        if isinstance(module, LunaConv3d):
            module.triton = setting
    return model


class InputBatchNorm3d(nn.BatchNorm3d):
    """``nn.BatchNorm3d`` whose training-mode pass is written with plain reductions.

    Same parameters, buffers, outputs and running-statistics updates (so the
    book's checkpoints load unchanged), but no cuDNN batch-norm kernels: for the
    classifier's single input channel those took half the training step's GPU
    time (``python -m bench.bench_classifier_step``). Evaluation mode uses
    the running statistics through the parent class.
    """

    @property
    def uses_batch_statistics(self) -> bool:
        """Whether ``forward`` normalises with the batch's statistics (and updates the running ones)."""
        return self.training and self.track_running_stats and self.affine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_batch_statistics:
            return super().forward(x)
        mean, scale = self.batch_mean_and_scale(x)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        shift = self.bias - mean * scale
        return (_at_least_float32(x) * scale.view(shape) + shift.view(shape)).to(x.dtype)

    def batch_mean_and_scale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's per-channel mean and ``weight / sqrt(variance + eps)`` (float32 or wider), so that the
        normalised output is ``(x - mean) * scale + bias``; updates the running statistics."""
        self._check_input_dim(x)
        reduce_dims = [0, *range(2, x.dim())]
        values = _at_least_float32(x)
        variance, mean = torch.var_mean(values, dim=reduce_dims, correction=0)
        count = values.numel() // values.shape[1]
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
            unbiased = variance * (count / max(count - 1, 1))
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        return mean, self.weight * torch.rsqrt(variance + self.eps)


def normalised_convolution(norm: InputBatchNorm3d, conv: LunaConv3d, x: torch.Tensor,
                           rectify: bool = False) -> torch.Tensor:
    """``relu?(conv(norm(x)))`` for ``norm`` in training mode, computed without a gradient with respect to
    ``norm(x)``.

    Per channel c, ``norm(x) = (x - mean_c) * scale_c + beta_c``, so

        conv(norm(x)) = conv(x - mean, W * scale) + conv(inside, sum_c beta_c * W[:, c]) + bias,

    where ``inside`` is one volume (batch 1, 1 channel) of ones, which meets
    the same zero padding. When ``x`` needs no gradient (a training batch), the
    first convolution needs only its weight gradient; the plain order also
    computes that convolution's input gradient, to reach ``norm``'s
    parameters. Same value and gradients as the plain order (the running
    statistics update once, as in ``norm.forward``). It makes the GPU training
    step faster (``python -m bench.bench_classifier_step``).
    """
    mean, scale = norm.batch_mean_and_scale(x)
    channel_shape = (1, -1) + (1,) * (x.dim() - 2)
    centred = _at_least_float32(x) - mean.view(channel_shape)
    scaled_weight = conv.weight * scale.view(channel_shape)
    shift_weight = (conv.weight * norm.bias.view(channel_shape)).sum(dim=1, keepdim=True)
    inside = centred.new_ones((1, 1, *x.shape[2:]))
    return conv.convolve(centred, scaled_weight, conv.convolve(inside, shift_weight, conv.bias), rectify)


class LunaBlock(nn.Module):
    """Two 3x3x3 convolutions with ReLU, then a 2x max-pool halving every axis."""

    def __init__(self, in_channels: int, conv_channels: int) -> None:
        super().__init__()
        self.conv1 = LunaConv3d(in_channels, conv_channels, kernel_size=3, padding=1, bias=True)
        self.conv2 = LunaConv3d(conv_channels, conv_channels, kernel_size=3, padding=1, bias=True)
        self.maxpool = nn.MaxPool3d(POOL_FACTOR, POOL_FACTOR)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after_conv1(self.conv1.rectified(x))

    def after_conv1(self, x: torch.Tensor) -> torch.Tensor:
        """The block from its first convolution's rectified output on."""
        return self.maxpool(self.conv2.rectified(x))


class LunaModel(nn.Module):
    """Batch-norm tail, ``depth`` LunaBlocks doubling the channels, linear head.

    ``forward`` returns logits of shape (B, 2); callers apply ``softmax`` where
    they need probabilities. The state_dict keys match the book's checkpoints.

    In training, the input batch norm and the first convolution run as
    ``normalised_convolution`` (same result, no input gradient of that
    convolution) where ``fold_input_normalisation`` says: None (the default)
    on CUDA only, as it is slower on the CPU (``python -m bench.bench_classifier_step``); True or False
    always.
    """

    fold_input_normalisation: bool | None = None

    def __init__(
        self,
        in_channels: int = 1,
        conv_channels: int = 8,
        input_shape: Sequence[int] = CHUNK_SHAPE_IRC,
        depth: int = 4,
    ) -> None:
        super().__init__()
        self.input_shape = tuple(int(size) for size in input_shape)
        self.tail_batchnorm = InputBatchNorm3d(in_channels)
        channels = in_channels
        for block_index in range(depth):
            out_channels = conv_channels * 2**block_index
            self.add_module(f"block{block_index + 1}", LunaBlock(channels, out_channels))
            channels = out_channels
        self.block_names = [f"block{i + 1}" for i in range(depth)]
        self.head_linear = nn.Linear(channels * _pooled_voxels(self.input_shape, depth), N_CLASSES)
        init_book_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = [getattr(self, name) for name in self.block_names]
        norm = self.tail_batchnorm
        fold = self.fold_input_normalisation if self.fold_input_normalisation is not None else x.is_cuda
        if fold and isinstance(norm, InputBatchNorm3d) and norm.uses_batch_statistics and not x.requires_grad:
            first = blocks.pop(0)
            x = first.after_conv1(normalised_convolution(norm, first.conv1, x, rectify=True))
        else:
            x = norm(x)
        for block in blocks:
            x = block(x)
        return self.head_linear(x.flatten(1))


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _pooled_voxels(input_shape: tuple[int, ...], depth: int) -> int:
    """Voxels left per channel after ``depth`` 2x max-pools (the head's input size / channels)."""
    pooled = [size // POOL_FACTOR**depth for size in input_shape]
    if min(pooled) < 1:
        raise ValueError(f"input_shape {input_shape} is too small for {depth} pooling blocks")
    return math.prod(pooled)
