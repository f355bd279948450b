"""Triton kernel behind ``resample``: a batch of volumes resampled through one affine matrix per sample,
trilinear with borders repeated (``F.affine_grid`` then ``F.grid_sample`` with ``align_corners=False``,
``padding_mode="border"``), with Gaussian noise added, in one pass.

Importing this module needs Triton; ``resample`` imports it only when Triton is there. Every (sample,
channel) volume is contiguous, and output element ``e`` is ``((plane * D + d) * H + h) * W + w``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _source_index(normalised, size):
    """``grid_sample``'s input position along an axis of ``size`` voxels (``align_corners=False``), clipped to
    the volume as border padding does."""
    position = ((normalised + 1.0) * size - 1.0) * 0.5
    return tl.minimum(tl.maximum(position, 0.0), size - 1.0)


@triton.jit
def _corners(position, size):
    """The lower and upper neighbours of ``position`` (the upper one held inside the volume; its weight is
    zero where it would lie outside) and the upper one's weight."""
    lower = tl.floor(position)
    weight = position - lower
    lower_index = lower.to(tl.int32)
    return lower_index, tl.minimum(lower_index + 1, size - 1), weight


@triton.jit
def affine_resample_3d_kernel(x_ptr, theta_ptr, seed_ptr, y_ptr, total, C, D, H, W, sigma,
                              NOISE: tl.constexpr, BLOCK: tl.constexpr):
    """``y[e] = trilinear(x[plane], theta[sample] @ (x, y, z, 1) of e) + sigma * N(0, 1)`` for BLOCK elements a
    program. ``theta`` is (B, 3, 4) float32 in ``affine_grid``'s normalised (col, row, index) coordinates;
    ``seed`` a one-element int64 tensor (read only with NOISE), the noise being Philox's for (seed, e)."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = e < total
    w = e % W
    h = (e // W) % H
    d = (e // (W * H)) % D
    plane = e // (W * H * D)
    sample = plane // C
    x_normalised = (2 * w + 1).to(tl.float32) / W - 1.0
    y_normalised = (2 * h + 1).to(tl.float32) / H - 1.0
    z_normalised = (2 * d + 1).to(tl.float32) / D - 1.0
    row = theta_ptr + sample * 12
    grid_x = (tl.load(row + 0, mask=inside, other=0.0) * x_normalised
              + tl.load(row + 1, mask=inside, other=0.0) * y_normalised
              + tl.load(row + 2, mask=inside, other=0.0) * z_normalised + tl.load(row + 3, mask=inside, other=0.0))
    grid_y = (tl.load(row + 4, mask=inside, other=0.0) * x_normalised
              + tl.load(row + 5, mask=inside, other=0.0) * y_normalised
              + tl.load(row + 6, mask=inside, other=0.0) * z_normalised + tl.load(row + 7, mask=inside, other=0.0))
    grid_z = (tl.load(row + 8, mask=inside, other=0.0) * x_normalised
              + tl.load(row + 9, mask=inside, other=0.0) * y_normalised
              + tl.load(row + 10, mask=inside, other=0.0) * z_normalised + tl.load(row + 11, mask=inside, other=0.0))
    x0, x1, fx = _corners(_source_index(grid_x, W), W)
    y0, y1, fy = _corners(_source_index(grid_y, H), H)
    z0, z1, fz = _corners(_source_index(grid_z, D), D)
    volume = x_ptr + plane.to(tl.int64) * (D * H * W)
    row00 = volume + (z0 * H + y0) * W
    row01 = volume + (z0 * H + y1) * W
    row10 = volume + (z1 * H + y0) * W
    row11 = volume + (z1 * H + y1) * W
    v000 = tl.load(row00 + x0, mask=inside, other=0).to(tl.float32)
    v001 = tl.load(row00 + x1, mask=inside, other=0).to(tl.float32)
    v010 = tl.load(row01 + x0, mask=inside, other=0).to(tl.float32)
    v011 = tl.load(row01 + x1, mask=inside, other=0).to(tl.float32)
    v100 = tl.load(row10 + x0, mask=inside, other=0).to(tl.float32)
    v101 = tl.load(row10 + x1, mask=inside, other=0).to(tl.float32)
    v110 = tl.load(row11 + x0, mask=inside, other=0).to(tl.float32)
    v111 = tl.load(row11 + x1, mask=inside, other=0).to(tl.float32)
    near = (v000 * (1.0 - fx) + v001 * fx) * (1.0 - fy) + (v010 * (1.0 - fx) + v011 * fx) * fy
    far = (v100 * (1.0 - fx) + v101 * fx) * (1.0 - fy) + (v110 * (1.0 - fx) + v111 * fx) * fy
    value = near * (1.0 - fz) + far * fz
    if NOISE:
        value += sigma * tl.randn(tl.load(seed_ptr), e)
    tl.store(y_ptr + e, value.to(y_ptr.dtype.element_ty), mask=inside)
