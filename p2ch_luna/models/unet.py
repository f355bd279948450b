"""2D U-Net of the book's segmentation model (jvanvugt/pytorch-unet, as in the book's util/unet.py).

The book's copy uses LeakyReLU and average pooling (not the paper's ReLU and max
pooling); we keep them so its trained checkpoint gives the same outputs here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from p2ch_luna.models.weights import init_book_weights

UP_MODES = ("upconv", "upsample")
POOL_FACTOR = 2


class UNetConvBlock(nn.Module):
    """conv3x3, LeakyReLU, [BN], conv3x3, LeakyReLU, [BN] in one ``block`` Sequential."""

    def __init__(self, in_size: int, out_size: int, padding: bool, batch_norm: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for conv_in in (in_size, out_size):
            layers.append(nn.Conv2d(conv_in, out_size, kernel_size=3, padding=int(padding)))
            layers.append(nn.LeakyReLU())
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_size))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class UNetUpBlock(nn.Module):
    """Upsample 2x, concatenate the (centre-cropped) skip connection, convolve."""

    def __init__(self, in_size: int, out_size: int, up_mode: str, padding: bool, batch_norm: bool) -> None:
        super().__init__()
        if up_mode == "upconv":
            self.up: nn.Module = nn.ConvTranspose2d(in_size, out_size, kernel_size=2, stride=2)
        else:
            self.up = nn.Sequential(
                nn.Upsample(mode="bilinear", scale_factor=2),
                nn.Conv2d(in_size, out_size, kernel_size=1),
            )
        self.conv_block = UNetConvBlock(in_size, out_size, padding, batch_norm)

    def forward(self, x: torch.Tensor, bridge: torch.Tensor) -> torch.Tensor:
        up = self.up(x)
        return self.conv_block(torch.cat([up, _center_crop(bridge, up.shape[-2:])], dim=1))


class UNet(nn.Module):
    """U-Net with ``depth`` levels; the first level has ``2**wf`` channels.

    With ``padding=True`` the output has the input's height and width, for any
    size: the input is zero-padded up to a multiple of ``2**(depth-1)`` and the
    output cropped back. With ``padding=False`` (the paper's valid convolutions)
    the output is smaller than the input. Returns logits (B, n_classes, H, W).
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 2,
        depth: int = 5,
        wf: int = 6,
        padding: bool = False,
        batch_norm: bool = False,
        up_mode: str = "upconv",
    ) -> None:
        super().__init__()
        if up_mode not in UP_MODES:
            raise ValueError(f"up_mode must be one of {UP_MODES}, not {up_mode!r}")
        self.padding = padding
        self.depth = depth
        channels = in_channels
        self.down_path = nn.ModuleList()
        for level in range(depth):
            self.down_path.append(UNetConvBlock(channels, 2 ** (wf + level), padding, batch_norm))
            channels = 2 ** (wf + level)
        self.up_path = nn.ModuleList()
        for level in reversed(range(depth - 1)):
            self.up_path.append(UNetUpBlock(channels, 2 ** (wf + level), up_mode, padding, batch_norm))
            channels = 2 ** (wf + level)
        self.last = nn.Conv2d(channels, n_classes, kernel_size=1)

    @property
    def pooling_grid(self) -> int:
        """Pixels per cell of the deepest level. Its output moves with its input only by whole cells: a window cut
        at another offset modulo this sees other pooling cells, and gives other values."""
        return POOL_FACTOR ** (self.depth - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if self.padding:
            multiple = self.pooling_grid
            x = F.pad(x, (0, -width % multiple, 0, -height % multiple))
        bridges = []
        for level, down in enumerate(self.down_path):
            x = down(x)
            if level != self.depth - 1:
                bridges.append(x)
                x = F.avg_pool2d(x, POOL_FACTOR)
        for up, bridge in zip(self.up_path, reversed(bridges)):
            x = up(x, bridge)
        x = self.last(x)
        if self.padding:
            x = x[..., :height, :width]
        return x


class UNetWrapper(nn.Module):
    """The book's segmentation model: input batch-norm, then a padded U-Net.

    Unlike the book, which ends with ``nn.Sigmoid``, ``forward`` returns logits;
    callers apply ``torch.sigmoid``. The state_dict keys are the book's.
    """

    def __init__(
        self,
        in_channels: int = 7,
        n_classes: int = 1,
        depth: int = 3,
        wf: int = 4,
        padding: bool = True,
        batch_norm: bool = True,
        up_mode: str = "upconv",
    ) -> None:
        super().__init__()
        self.input_batchnorm = nn.BatchNorm2d(in_channels)
        self.unet = UNet(in_channels, n_classes, depth, wf, padding, batch_norm, up_mode)
        init_book_weights(self)

    @property
    def pooling_grid(self) -> int:
        return self.unet.pooling_grid

    @property
    def in_channels(self) -> int:
        """Input channels: the segmented slice and the context slices around it."""
        return self.input_batchnorm.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(self.input_batchnorm(x))


def _center_crop(layer: torch.Tensor, target_size: torch.Size) -> torch.Tensor:
    height, width = layer.shape[-2:]
    top = (height - target_size[0]) // 2
    left = (width - target_size[1]) // 2
    return layer[..., top : top + target_size[0], left : left + target_size[1]]
