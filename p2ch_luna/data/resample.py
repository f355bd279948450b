"""The classifier's on-device augmentation in one pass: affine resampling and noise fused in a Triton kernel.

With torch's operators, augmenting a batch of int16 chunks takes six passes
over memory: the conversion to float32, ``F.affine_grid`` (a float32 grid three
times the batch's size), ``F.grid_sample`` reading that grid back, the noise
drawn into a tensor of its own, and the sum. ``affine_resample_3d`` reads the
integer chunks once and writes the float32 result once: each output voxel maps
its own position through its sample's matrix, interpolates its 8 neighbours and
adds Philox noise keyed by the voxel's index.

It computes what ``augment.apply_affine_3d`` computes (``affine_grid`` then
trilinear ``grid_sample``, ``align_corners=False``, borders repeated), within
float32 rounding; the noise has the same distribution as ``augment.add_noise``'s
but other values. It runs on CUDA tensors where Triton is installed, and on
CPU tensors under Triton's interpreter (for the tests). Before the first use on
a GPU the kernel checks itself against torch (``works_on``); where Triton is
missing, too old, cannot build or computes wrong, torch's operators augment.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch
import torch.nn.functional as F

from p2ch_luna.kernels.support import compiler_disabled, compiling, interpreting, relative_difference, triton_usable

logger = logging.getLogger(__name__)

BLOCK = 1024
"""Output voxels a program."""
MAX_ELEMENTS = 2**31 - 1
"""The kernel indexes voxels with 32-bit integers."""
SELF_TEST_TOLERANCE = 1e-5
"""Largest relative difference from float64 ``grid_sample`` the self-test accepts (float32 rounding is ~1e-7)."""
SELF_TEST_SIGMA = 100.0
NOISE_TOLERANCE = 0.15
"""Largest relative deviation of the self-test noise's mean and spread (768 draws: about 0.03 by chance)."""
SEED_LIMIT = 2**62
"""Noise seeds are drawn from [0, SEED_LIMIT)."""


@functools.cache
def kernels() -> ModuleType | None:
    """The Triton kernel module, or None where Triton is not installed or older than supported."""
    if not triton_usable():
        return None
    from p2ch_luna.kernels import resample as resample_kernels
    return resample_kernels


def runs_on(volumes: torch.Tensor) -> bool:
    """Whether ``affine_resample_3d`` can take ``volumes``: a non-empty (B, C, D, H, W) batch of fewer than 2**31
    elements on CUDA (or on the CPU under Triton's interpreter), Triton installed, no ``torch.compile`` tracing,
    and, on a GPU, the kernel checked against torch there."""
    if compiling() or kernels() is None or volumes.dim() != 5 or not 0 < volumes.numel() <= MAX_ELEMENTS:
        return False
    if volumes.is_cuda:
        return works_on(volumes.device)
    return volumes.device.type == "cpu" and interpreting()


def noise_seed(generator: torch.Generator) -> torch.Tensor:
    """A one-element int64 seed drawn from ``generator`` on its device (no wait for the device)."""
    return torch.randint(0, SEED_LIMIT, (1,), generator=generator, device=generator.device, dtype=torch.int64)


def affine_resample_3d(volumes: torch.Tensor, affine: torch.Tensor, noise_sigma: float = 0.0,
                       seed: torch.Tensor | None = None) -> torch.Tensor:
    """float32 (B, C, D, H, W): ``volumes`` (any real type, e.g. int16 HU) resampled through ``affine``
    ((B, 3, 4), ``augment.sample_affine_3d``'s normalised matrices), plus ``noise_sigma`` times standard
    normal noise keyed by ``seed`` (:func:`noise_seed`; needed only with noise)."""
    if volumes.dim() != 5 or affine.shape != (volumes.shape[0], 3, 4):
        raise ValueError(f"expected (B, C, D, H, W) volumes and (B, 3, 4) matrices, got shapes "
                         f"{tuple(volumes.shape)} and {tuple(affine.shape)}")
    noise = noise_sigma != 0
    if noise and seed is None:
        raise ValueError("noise needs a seed (resample.noise_seed)")
    source = volumes.contiguous()
    theta = affine.to(device=source.device, dtype=torch.float32).contiguous()
    out = torch.empty(source.shape, dtype=torch.float32, device=source.device)
    if out.numel() == 0:
        return out
    _, channels, depth, height, width = source.shape
    seed_tensor = seed.to(source.device) if noise else theta  # not read without noise
    grid = (-(-out.numel() // BLOCK),)
    kernels().affine_resample_3d_kernel[grid](source, theta, seed_tensor, out, out.numel(), channels, depth,
                                              height, width, float(noise_sigma), NOISE=noise, BLOCK=BLOCK)
    return out


@functools.cache
@compiler_disabled
def works_on(device: torch.device) -> bool:
    """Whether the kernel compiles on ``device``, resamples a small batch as float64 ``grid_sample`` does and
    draws noise of the asked spread: checked once per process and device, so that a machine where Triton
    cannot build or computes wrong augments with torch's operators, with a warning, instead of failing or
    training on wrong chunks."""
    try:
        resample_error, noise_error = _self_test_errors(device)
    except Exception as failure:  # any failure to build or run: torch's operators stay in charge
        logger.warning("resample: the Triton kernel does not run on %s (%s: %s); torch's operators augment "
                       "instead", device, type(failure).__name__, failure)
        return False
    if not (resample_error < SELF_TEST_TOLERANCE and noise_error < NOISE_TOLERANCE):
        logger.warning("resample: the Triton kernel computes wrong on %s (relative error %.2g, noise off by %.2g); "
                       "torch's operators augment instead", device, resample_error, noise_error)
        return False
    return True


def _self_test_errors(device: torch.device) -> tuple[float, float]:
    """On a small int16 batch of one channel (as the classifier's) with mirroring, zoom, rotation and shifts
    past the borders: the kernel's relative error against float64 ``grid_sample`` on the CPU, and how far
    its noise's mean and standard deviation lie from 0 and the asked sigma, relative to sigma."""
    generator = torch.Generator().manual_seed(0)
    volumes = torch.randint(-1000, 1000, (4, 1, 4, 6, 8), generator=generator, dtype=torch.int16)
    affine = torch.eye(3, 4).repeat(4, 1, 1) * torch.tensor([-1.0, 1.2, 0.8, 1.0]).view(4, 1, 1)
    affine += 0.4 * torch.randn(4, 3, 4, generator=generator)
    on_device = volumes.to(device), affine.to(device)
    resampled = affine_resample_3d(*on_device).cpu()
    seed = torch.tensor([12345], dtype=torch.int64, device=device)
    noise = affine_resample_3d(*on_device, SELF_TEST_SIGMA, seed).cpu() - resampled
    noise_error = max(abs(float(noise.std()) / SELF_TEST_SIGMA - 1), abs(float(noise.mean())) / SELF_TEST_SIGMA)
    return relative_difference(resampled, reference_resample_3d(volumes, affine)), noise_error


def reference_resample_3d(volumes: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """What ``affine_resample_3d`` computes without noise, by torch's operators in float64."""
    source = volumes.to(torch.float64)
    grid = F.affine_grid(affine.to(torch.float64), list(source.shape), align_corners=False)
    return F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)
