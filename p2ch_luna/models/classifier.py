"""The book's 3D CNN nodule classifier (chapters 11 and 14), returning logits."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .weights import init_book_weights

CHUNK_SHAPE_IRC = (32, 48, 48)
"""The book's candidate chunk size (index, row, col) that the classifier reads."""

N_CLASSES = 2
POOL_FACTOR = 2


class InputBatchNorm3d(nn.BatchNorm3d):
    """``nn.BatchNorm3d`` whose training-mode pass is written with plain reductions.

    Same parameters, buffers, outputs and running-statistics updates (so the
    book's checkpoints load unchanged), but no cuDNN batch-norm kernels: for the
    classifier's single input channel those took 51% of the training step's GPU
    time on an H200 (``bench/bench_classifier_step.py``: 3,748 samples/s with
    them, 9,233 without the layer at all, batch 256 bf16). Evaluation mode uses
    the running statistics through the parent class.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats and self.affine):
            return super().forward(x)
        self._check_input_dim(x)
        reduce_dims = [0, *range(2, x.dim())]
        values = x.float()
        variance, mean = torch.var_mean(values, dim=reduce_dims, correction=0)
        count = values.numel() // values.shape[1]
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
            unbiased = variance * (count / max(count - 1, 1))
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale = self.weight * torch.rsqrt(variance + self.eps)
        shift = self.bias - mean * scale
        return (values * scale.view(shape) + shift.view(shape)).to(x.dtype)


class LunaBlock(nn.Module):
    """Two 3x3x3 convolutions with ReLU, then a 2x max-pool halving every axis."""

    def __init__(self, in_channels: int, conv_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, conv_channels, kernel_size=3, padding=1, bias=True)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(conv_channels, conv_channels, kernel_size=3, padding=1, bias=True)
        self.relu2 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(POOL_FACTOR, POOL_FACTOR)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        return self.maxpool(x)


class LunaModel(nn.Module):
    """Batch-norm tail, ``depth`` LunaBlocks doubling the channels, linear head.

    ``forward`` returns logits of shape (B, 2); callers apply ``softmax`` where
    they need probabilities. The state_dict keys match the book's checkpoints.
    """

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
        x = self.tail_batchnorm(x)
        for name in self.block_names:
            x = getattr(self, name)(x)
        return self.head_linear(x.flatten(1))


def _pooled_voxels(input_shape: tuple[int, ...], depth: int) -> int:
    """Voxels left per channel after ``depth`` 2x max-pools (the head's input size / channels)."""
    pooled = [size // POOL_FACTOR**depth for size in input_shape]
    if min(pooled) < 1:
        raise ValueError(f"input_shape {input_shape} is too small for {depth} pooling blocks")
    return math.prod(pooled)
