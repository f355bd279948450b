"""Batched on-device augmentation: sample random affine parameters, then apply pure functions.

As in TorchIO (``RandomFlip.get_params`` then ``Flip``), sampling and applying
are separate: ``sample_affine_3d``/``sample_affine_2d`` draw one affine matrix per
sample from an injected ``torch.Generator``; ``apply_affine_*`` resample with
``F.affine_grid``/``F.grid_sample`` on whatever device the batch is on. A
segmentation image and its mask go through the same matrix (bilinear for the
image, nearest for the mask).

Matrices are in ``affine_grid``'s normalised coordinates ((x, y, z) = (col, row,
index), each in [-1, 1]), mapping output positions to input positions. Offsets
are therefore fractions of the half-width: offset 0.1 on a 48-voxel axis moves
the content by up to 2.4 voxels. Unlike the book's p2ch14 ``augment3d`` (which
writes the offset into row 3 and then drops it), the offset really applies.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from p2ch_luna.data import resample

BOOK_OFFSET = 0.1
BOOK_SEGMENTATION_OFFSET = 0.03
BOOK_SCALE = 0.2
BOOK_NOISE_HU = 25.0
FLIP_PROBABILITY = 0.5
INTERPOLATION_MODES = ("bilinear", "nearest")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations to apply and how strongly.

    flip: mirror each spatial axis with probability 1/2.
    offset: shift each axis by up to +-offset (fraction of the half-width).
    scale: zoom each axis by a factor in [1 - scale, 1 + scale].
    rotate: rotate by a uniform angle about the index axis (3D) or in-plane (2D).
    noise: add Gaussian noise with this standard deviation, in the input's units (HU).
    fused: on CUDA, resample and add the noise to 3-D batches in one Triton kernel (``resample``) where it
    runs (``--kernels triton``); otherwise, and with False (the default), torch's operators do (other noise
    values, the same distribution).
    """

    flip: bool = False
    offset: float = 0.0
    scale: float = 0.0
    rotate: bool = False
    noise: float = 0.0
    fused: bool = False

    @classmethod
    def book(cls) -> AugmentConfig:
        """The book's full classifier augmentation (p2ch12 ``--augmented``)."""
        return cls(flip=True, offset=BOOK_OFFSET, scale=BOOK_SCALE, rotate=True, noise=BOOK_NOISE_HU)

    @classmethod
    def book_segmentation(cls) -> AugmentConfig:
        """The book's segmentation augmentation (p2ch13 ``--augmented``: a smaller offset)."""
        return dataclasses.replace(cls.book(), offset=BOOK_SEGMENTATION_OFFSET)

    @classmethod
    def none(cls) -> AugmentConfig:
        return cls()

    @property
    def is_spatial(self) -> bool:
        """Whether any geometric transform is on (else resampling can be skipped)."""
        return self.flip or self.offset != 0 or self.scale != 0 or self.rotate


def sample_affine_3d(
    batch_size: int,
    config: AugmentConfig,
    generator: torch.Generator,
    device: torch.device | str,
    spatial_shape: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """One random (3, 4) ``affine_grid`` matrix per sample: (B, 3, 4).

    ``spatial_shape`` (index, row, col) makes the rotation a true rotation in
    voxel space when rows and cols differ in size; without it they are assumed equal.
    """
    rows_per_col = 1.0 if spatial_shape is None else spatial_shape[1] / spatial_shape[2]
    return _sample_affine(batch_size, 3, config, generator, rows_per_col).to(device)


def sample_affine_2d(
    batch_size: int,
    config: AugmentConfig,
    generator: torch.Generator,
    device: torch.device | str,
    spatial_shape: tuple[int, int] | None = None,
) -> torch.Tensor:
    """One random (2, 3) ``affine_grid`` matrix per sample: (B, 2, 3); see :func:`sample_affine_3d`."""
    rows_per_col = 1.0 if spatial_shape is None else spatial_shape[0] / spatial_shape[1]
    return _sample_affine(batch_size, 2, config, generator, rows_per_col).to(device)


def apply_affine_3d(volumes: torch.Tensor, affine: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Resample (B, C, I, R, C) ``volumes`` through (B, 3, 4) ``affine``; borders are repeated."""
    return _apply_affine(volumes, affine, mode, spatial_dims=3)


def apply_affine_2d(images: torch.Tensor, affine: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Resample (B, C, H, W) ``images`` through (B, 2, 3) ``affine``; borders are repeated."""
    return _apply_affine(images, affine, mode, spatial_dims=2)


def add_noise(tensor: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """``tensor`` plus Gaussian noise of standard deviation ``sigma`` (a new tensor).

    The noise is drawn on the generator's device; give a generator on the batch's
    device to avoid a copy.
    """
    noise = torch.randn(tensor.shape, generator=generator, device=generator.device, dtype=tensor.dtype)
    return tensor + sigma * noise.to(tensor.device)


def augment_batch_3d(batch: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Augment a (B, C, I, R, C) batch of classifier chunks, each sample differently.

    A floating-point batch keeps its type; an integer one (int16 HU chunks) comes out float32. On CUDA the
    resampling and the noise of an integer or float32 batch run as one kernel (``resample``, ``config.fused``).
    """
    fused = (config.fused and config.is_spatial and batch.is_cuda
             and (batch.dtype == torch.float32 or not batch.is_floating_point()) and resample.runs_on(batch))
    if not (fused or batch.is_floating_point()):
        batch = batch.to(torch.float32)
    if config.is_spatial:
        affine = sample_affine_3d(batch.shape[0], config, generator, batch.device, tuple(batch.shape[2:]))
        if fused:
            seed = resample.noise_seed(generator) if config.noise else None
            return resample.affine_resample_3d(batch, affine, config.noise, seed)
        batch = apply_affine_3d(batch, affine)
    if config.noise:
        batch = add_noise(batch, config.noise, generator)
    return batch


def augment_batch_2d(
    images: torch.Tensor, masks: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment (B, C, H, W) images and their masks with the same per-sample transform.

    Images are interpolated bilinearly and get the noise; masks use nearest
    neighbour and keep their dtype, so a boolean mask stays boolean.
    """
    if config.is_spatial:
        affine = sample_affine_2d(images.shape[0], config, generator, images.device, tuple(images.shape[2:]))
        images = apply_affine_2d(images, affine)
        masks = apply_affine_2d(masks, affine, mode="nearest")
    if config.noise:
        images = add_noise(images, config.noise, generator)
    return images, masks


def _sample_affine(
    batch_size: int, dims: int, config: AugmentConfig, generator: torch.Generator, rows_per_col: float
) -> torch.Tensor:
    """Book order: flip, scale and offset per axis, composed with a rotation in the (col, row) plane.

    A fixed number of random draws per sample keeps the stream, and so the
    results for a seed, independent of which augmentations are enabled.
    """
    uniform = torch.rand(batch_size, 2 * dims + dims + 1, generator=generator, device=generator.device)
    flip_u, scale_u, offset_u = uniform[:, :dims], uniform[:, dims : 2 * dims], uniform[:, 2 * dims : 3 * dims]
    angle = uniform[:, -1] * 2 * math.pi

    diagonal = torch.ones(batch_size, dims, device=generator.device)
    if config.flip:
        diagonal = torch.where(flip_u < FLIP_PROBABILITY, -diagonal, diagonal)
    if config.scale:
        diagonal = diagonal * (1.0 + config.scale * (2 * scale_u - 1))
    linear = torch.diag_embed(diagonal)
    if config.rotate:
        rotation = torch.eye(dims, device=generator.device).repeat(batch_size, 1, 1)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # Conjugating by the voxel-to-normalised scaling keeps it a rotation in voxel space.
        rotation[:, 0, 0] = cos
        rotation[:, 0, 1] = -sin * rows_per_col
        rotation[:, 1, 0] = sin / rows_per_col
        rotation[:, 1, 1] = cos
        linear = linear @ rotation
    translation = config.offset * (2 * offset_u - 1)
    return torch.cat([linear, translation.unsqueeze(-1)], dim=-1)


def _apply_affine(tensor: torch.Tensor, affine: torch.Tensor, mode: str, spatial_dims: int) -> torch.Tensor:
    if mode not in INTERPOLATION_MODES:
        raise ValueError(f"mode must be one of {INTERPOLATION_MODES}, not {mode!r}")
    if tensor.dim() != spatial_dims + 2:
        raise ValueError(f"expected a (B, C, {spatial_dims} spatial axes) tensor, got shape {tuple(tensor.shape)}")
    work = tensor if tensor.is_floating_point() else tensor.to(torch.float32)
    grid = F.affine_grid(affine.to(device=work.device, dtype=work.dtype), list(work.shape), align_corners=False)
    out = F.grid_sample(work, grid, mode=mode, padding_mode="border", align_corners=False)
    return out if out.dtype == tensor.dtype else out.to(tensor.dtype)
