"""Triton kernels behind ``small_conv``: a 3x3x3 convolution (stride 1, zero padding 1) over channels-last
volumes, written as an implicit matrix product, and its weight gradient.

Importing this module needs Triton; ``small_conv`` imports it only when Triton is there. Every tensor is
addressed as (voxel, channel) rows, a voxel being ``((n * D + d) * H + h) * W + w``; a reduction index
``r = tap * C + c`` walks the 27 taps (``tap = (dz + 1) * 9 + (dy + 1) * 3 + (dx + 1)``) and the C input
channels, so that one row of the gathered input tile reads C contiguous values per tap.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tap_offsets(r, C: tl.constexpr):
    """The channel and the (dz, dy, dx) shift of each reduction index ``r``."""
    tap = r // C
    channel = r % C
    dz = tap // 9 - 1
    dy = (tap // 3) % 3 - 1
    dx = tap % 3 - 1
    return channel, dz, dy, dx


@triton.jit
def _voxel_coordinates(m, D, H, W):
    """The (d, h, w) of each voxel index ``m`` within its volume."""
    return (m // (W * H)) % D, (m // W) % H, m % W


@triton.jit
def _gather_input(x_ptr, m, m_ok, r, D, H, W, C: tl.constexpr, R: tl.constexpr):
    """The implicit-matrix tile ``x[voxel m shifted by tap(r), channel(r)]`` (zero outside the volume)."""
    d_index, h_index, w_index = _voxel_coordinates(m, D, H, W)
    channel, dz, dy, dx = _tap_offsets(r, C)
    z = d_index[:, None] + dz[None, :]
    y = h_index[:, None] + dy[None, :]
    x = w_index[:, None] + dx[None, :]
    inside = (z >= 0) & (z < D) & (y >= 0) & (y < H) & (x >= 0) & (x < W)
    inside = inside & m_ok[:, None] & (r < R)[None, :]
    source = (m[:, None] + (dz * (H * W) + dy * W + dx)[None, :]) * C + channel[None, :]
    return tl.load(x_ptr + source, mask=inside, other=0.0)


@triton.jit
def _valid_taps(m, m_ok, D, H, W):
    """Per voxel a 27-bit mask, bit ``tap`` set where that tap's neighbour lies inside the volume."""
    d_index, h_index, w_index = _voxel_coordinates(m, D, H, W)
    z_bits = tl.where(d_index > 0, 0x1FF, 0) | 0x3FE00 | tl.where(d_index < D - 1, 0x7FC0000, 0)
    y_bits = tl.where(h_index > 0, 0x1C0E07, 0) | 0xE07038 | tl.where(h_index < H - 1, 0x70381C0, 0)
    x_bits = tl.where(w_index > 0, 0x1249249, 0) | 0x2492492 | tl.where(w_index < W - 1, 0x4924924, 0)
    return tl.where(m_ok, z_bits & y_bits & x_bits, 0)


@triton.jit
def _gather_input_by_bits(x_ptr, m, valid_taps, r, H, W, C: tl.constexpr, R: tl.constexpr):
    """``_gather_input`` with the voxel's neighbours looked up in its ``_valid_taps`` bits: fewer integer
    operations an element."""
    channel, dz, dy, dx = _tap_offsets(r, C)
    tap = tl.minimum(r // C, 27)  # bit 27 is never set; r >= R is masked off below too
    inside = ((valid_taps[:, None] >> tap[None, :]) & 1) != 0
    inside = inside & (r < R)[None, :]
    source = m[:, None] * C + ((dz * (H * W) + dy * W + dx) * C + channel)[None, :]
    return tl.load(x_ptr + source, mask=inside, other=0.0)


@triton.jit
def conv3x3x3_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, M, D, H, W, BIAS_PERIOD,
                     C: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                     BIAS: tl.constexpr, RELU: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BITMASK: tl.constexpr):
    """``y[m, k] = relu?(sum_r x[m + shift(r), channel(r)] * w[r, k] + bias)`` for BLOCK_M voxels a program.

    ``w`` is (27 * C, K_PAD), zero beyond K. BIAS: 0 none; 1 one value per channel; 2 a (BIAS_PERIOD, K)
    map indexed by ``m % BIAS_PERIOD`` (the same for every volume of the batch). BITMASK picks the gather.
    """
    R: tl.constexpr = 27 * C
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    valid_taps = _valid_taps(m, m_ok, D, H, W)
    k = tl.arange(0, K_PAD)
    accumulator = tl.zeros((BLOCK_M, K_PAD), dtype=tl.float32)
    for r_start in range(0, R, BLOCK_R):
        r = r_start + tl.arange(0, BLOCK_R)
        if BITMASK:
            tile = _gather_input_by_bits(x_ptr, m, valid_taps, r, H, W, C, R)
        else:
            tile = _gather_input(x_ptr, m, m_ok, r, D, H, W, C, R)
        weights = tl.load(w_ptr + r[:, None] * K_PAD + k[None, :], mask=(r < R)[:, None], other=0.0)
        accumulator = tl.dot(tile, weights, accumulator, input_precision=PRECISION)
    k_ok = k < K
    if BIAS == 1:
        accumulator += tl.load(bias_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    if BIAS == 2:
        position = m % BIAS_PERIOD
        accumulator += tl.load(bias_ptr + position[:, None] * K + k[None, :],
                               mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
    if RELU:
        accumulator = tl.maximum(accumulator, 0.0)
    tl.store(y_ptr + m[:, None] * K + k[None, :], accumulator.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & k_ok[None, :])


@triton.jit
def conv3x3x3_weight_grad_kernel(x_ptr, g_ptr, w_grad_ptr, bias_grad_ptr, M, D, H, W,
                                 C: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                                 BIAS_GRAD: tl.constexpr, PRECISION: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCKS_PER_SPLIT: tl.constexpr,
                                 BITMASK: tl.constexpr):
    """Partial sums over one split of BLOCKS_PER_SPLIT x BLOCK_M voxels: ``w_grad[split, r, k] = sum_m
    x[m + shift(r), channel(r)] * g[m, k]`` for BLOCK_R reduction rows a program, and, in the programs of
    the first rows, ``bias_grad[split, k] = sum_m g[m, k]``."""
    R: tl.constexpr = 27 * C
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(1)
    k = tl.arange(0, K_PAD)
    k_ok = k < K
    accumulator = tl.zeros((BLOCK_R, K_PAD), dtype=tl.float32)
    bias_accumulator = tl.zeros((K_PAD,), dtype=tl.float32)
    first_rows = tl.program_id(0) == 0
    for block in range(BLOCKS_PER_SPLIT):  # the last split's tail is masked off
        m = (split * BLOCKS_PER_SPLIT + block) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = m < M
        if BITMASK:
            tile = _gather_input_by_bits(x_ptr, m, _valid_taps(m, m_ok, D, H, W), r, H, W, C, R)
        else:
            tile = _gather_input(x_ptr, m, m_ok, r, D, H, W, C, R)
        grad = tl.load(g_ptr + m[:, None] * K + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        accumulator = tl.dot(tl.trans(tile), grad, accumulator, input_precision=PRECISION)
        if BIAS_GRAD:
            if first_rows:
                bias_accumulator += tl.sum(grad.to(tl.float32), axis=0)
    tl.store(w_grad_ptr + (split * R + r[:, None]) * K_PAD + k[None, :], accumulator, mask=(r < R)[:, None])
    if BIAS_GRAD:
        if first_rows:
            tl.store(bias_grad_ptr + split * K_PAD + k, bias_accumulator)
