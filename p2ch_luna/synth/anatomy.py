"""The chest around the lungs, slice by slice: body, fat, muscle, mediastinum, table, spine, sternum, ribs,
trachea, the lungs' super-ellipses with dome and diaphragm, and the parenchyma's texture.
"""

from __future__ import annotations

import numpy as np

from p2ch_luna.synth.drawing import Frame, superellipse, upsampling_matrix
from p2ch_luna.synth.parameters import (
    HU_AIR,
    HU_CANAL,
    HU_CORTICAL,
    HU_DISC,
    HU_FAT,
    HU_LUNG,
    HU_MEDIASTINUM,
    HU_MUSCLE,
    HU_RIB,
    HU_STERNUM,
    HU_TABLE_FOAM,
    HU_TABLE_SHELL,
    HU_TRABECULAR,
    TEXTURE_KNOT_SLICES,
    TEXTURE_OCTAVES,
)


def draw_anatomy(rng: np.random.Generator, frame: Frame) -> tuple[np.ndarray, np.ndarray, dict]:
    """HU without vessels/nodules/noise, the lung mask and the anatomy parameters."""
    n_slices, rows, cols = frame.shape
    z_mm, y_mm, x_mm = (axis.astype(np.float32) for axis in frame.axes_mm((0, 0, 0), frame.shape))
    y2, x2 = y_mm[0], x_mm[0]  # (R, 1), (1, C)
    width, height = cols * frame.spacing[2], rows * frame.spacing[1]
    fov_radius = 0.5 * min(width, height)
    fov = (x2 ** 2 + y2 ** 2) < fov_radius ** 2

    center_x = rng.uniform(-0.02, 0.02) * width
    center_y = -rng.uniform(0.0, 0.04) * height
    body_a, body_b = rng.uniform(0.37, 0.43) * width, rng.uniform(0.26, 0.3) * height
    fat = rng.uniform(0.015, 0.045) * width
    wall = rng.uniform(0.025, 0.04) * width
    cav_a, cav_b = body_a - fat - wall, body_b - fat - wall
    bx, by = x2 - center_x, y2 - center_y

    static = np.full((rows, cols), HU_AIR, dtype=np.float32)
    table_top = center_y + body_b + rng.uniform(0.005, 0.025) * height
    shell = max(2.0, 2.5 * frame.spacing[1])
    table_depth = rng.uniform(0.04, 0.07) * height
    table_y = y2 - (table_top + 0.3 * (x2 - center_x) ** 2 / width)
    table_x = np.abs(x2 - center_x) < 0.42 * width
    static[table_x & (table_y >= 0) & (table_y < table_depth)] = HU_TABLE_SHELL
    static[table_x & (table_y >= shell) & (table_y < table_depth - shell)] = HU_TABLE_FOAM

    static[superellipse(bx, by, body_a, body_b) < 1] = HU_FAT + rng.uniform(-20, 20)
    static[superellipse(bx, by, body_a - fat, body_b - fat) < 1] = HU_MUSCLE
    rho_cavity = superellipse(bx, by, cav_a, cav_b)
    static[rho_cavity < 1] = HU_MEDIASTINUM

    vert_r = 0.11 * cav_a
    vert_y = 0.82 * cav_b
    vert_d2 = bx ** 2 + (by - vert_y) ** 2
    vertebra = vert_d2 < vert_r ** 2
    vert_inner = vert_d2 < (0.8 * vert_r) ** 2
    static[vertebra] = HU_CORTICAL
    static[vert_inner] = HU_TRABECULAR
    arch = (np.abs(bx) < 0.35 * vert_r) & (by > vert_y) & (by < vert_y + 2.6 * vert_r)
    static[arch & (by <= cav_b + wall)] = HU_CORTICAL
    canal = bx ** 2 + (by - vert_y - 1.35 * vert_r) ** 2 < (0.45 * vert_r) ** 2
    static[canal] = HU_CANAL
    sternum = superellipse(bx, by + cav_b + 0.5 * wall, 0.08 * cav_a, 0.45 * wall) < 1
    trachea = bx ** 2 + (by + 0.25 * cav_b) ** 2 < (0.07 * cav_a) ** 2

    rib_band = (rho_cavity >= 1.0) & (superellipse(bx, by, cav_a + 0.6 * wall, cav_b + 0.6 * wall) < 1)
    angle_from_back = np.arccos(np.clip(by / np.sqrt(bx ** 2 + by ** 2 + 1e-6), -1, 1))
    rib_band &= angle_from_back < 0.82 * np.pi
    rib_offset = (0.35 * cav_a * angle_from_back).astype(np.float32)
    rib_period = rng.uniform(24, 32)

    mediastinum = superellipse(bx, by + 0.15 * cav_b, 0.13 * cav_a, 0.75 * cav_b) < 1
    spine_zone = bx ** 2 + (by - vert_y) ** 2 < (1.5 * vert_r) ** 2
    lung_allowed = (rho_cavity < 0.96) & ~mediastinum & ~spine_zone & fov
    heart_rho = superellipse(bx - 0.12 * cav_a, by - 0.05 * cav_b, 0.4 * cav_a, 0.55 * cav_b)

    t_base = rng.uniform(0.03, 0.1)
    t_apex = rng.uniform(0.9, 0.97)
    dome = rng.uniform(0.15, 0.25)
    lungs = []
    for side in (-1, 1):  # -1: patient's right (-x in LPS)
        lx, ly = bx - side * 0.5 * cav_a, by + 0.05 * cav_b
        ax, ay = 0.45 * cav_a, 0.8 * cav_b
        radial = superellipse(lx, ly, ax, ay, 2.4) ** (1 / 2.4)
        base = t_base + (0.03 if side < 0 else 0.0)
        lungs.append(dict(radial=radial, base=base, center=(center_x + side * 0.5 * cav_a, center_y - 0.05 * cav_b),
                          axes=(ax, ay)))
    disc_period = rng.uniform(24, 30)
    disc_phase = rng.uniform(0, disc_period)

    # Per slice, only the pixels that can hold a lung or a rib are evaluated.
    lung_pixels = np.flatnonzero(lung_allowed & ((lungs[0]["radial"] < 1) | (lungs[1]["radial"] < 1)))
    radial = [side["radial"].ravel()[lung_pixels] for side in lungs]
    heart_pixels = heart_rho.ravel()[lung_pixels]
    rib_pixels = np.flatnonzero(rib_band)
    rib_offsets = rib_offset.ravel()[rib_pixels]
    sternum_pixels, trachea_pixels, disc_pixels = (np.flatnonzero(m) for m in (sternum, trachea, vert_inner))
    knots = texture_knots(rng, frame.shape, lung_pixels)
    knots += HU_LUNG + np.broadcast_to(np.clip(by / cav_b, -1, 1), (rows, cols)).ravel()[lung_pixels] * 35
    hu = np.empty(frame.shape, dtype=np.float32)
    lung = np.zeros(frame.shape, dtype=bool)
    for k in range(n_slices):
        t = (k + 0.5) / n_slices
        z = float(z_mm[k, 0, 0])
        plane = hu[k].reshape(-1)
        plane[...] = static.reshape(-1)
        in_lung = np.zeros(len(lung_pixels), dtype=bool)
        for side, side_radial in zip(lungs, radial):
            rel = (t - side["base"]) / (t_apex - side["base"])
            if rel <= 0 or rel >= 1:
                continue
            apex = 1.0 if rel < 0.55 else np.sqrt(1 - ((rel - 0.55) / 0.45) ** 2)
            floor = 1 - (t - side["base"]) / dome
            in_lung |= (side_radial < apex) & (side_radial > floor)
        heart_size = np.clip((0.55 - t) / 0.3, 0, 1)
        if heart_size > 0:
            in_lung &= heart_pixels > heart_size ** 2
        lung[k].reshape(-1)[lung_pixels[in_lung]] = True
        knot, weight = divmod(k / TEXTURE_KNOT_SLICES, 1.0)
        lower, upper = knots[int(knot)][in_lung], knots[int(knot) + 1][in_lung]
        plane[lung_pixels[in_lung]] = lower + np.float32(weight) * (upper - lower)
        plane[rib_pixels[np.mod((z - rib_offsets) / rib_period, 1.0) < 0.35]] = HU_RIB
        if 0.2 < t < 0.9:
            plane[sternum_pixels] = HU_STERNUM
        if t > 0.65:
            plane[trachea_pixels] = HU_AIR
        if np.mod(z - disc_phase, disc_period) < 0.18 * disc_period:
            plane[disc_pixels] = HU_DISC

    anatomy = dict(fov=fov, lungs=lungs)
    return hu, lung, anatomy


def texture_knots(rng: np.random.Generator, shape: tuple[int, int, int], pixels: np.ndarray) -> np.ndarray:
    """Smooth lung texture (HU offsets) at every TEXTURE_KNOT_SLICES-th slice, on ``pixels`` only.

    Coarse random grids upsampled by Gaussian weights, evaluated only at the
    given pixels; slices in between interpolate linearly, so no full-volume
    noise field is ever built.
    """
    n_knots = shape[0] // TEXTURE_KNOT_SLICES + 2
    rows, cols = np.unravel_index(pixels, shape[1:])
    knots = np.zeros((n_knots, len(pixels)), dtype=np.float32)
    for cell, amplitude in TEXTURE_OCTAVES:
        row_weights, col_weights = (upsampling_matrix(n, cell) for n in shape[1:])
        coarse = rng.standard_normal((n_knots, row_weights.shape[1], col_weights.shape[1])).astype(np.float32)
        along_cols = coarse @ col_weights.T  # (knots, coarse rows, C)
        pixel_row_weights = row_weights[rows].T * np.float32(amplitude)  # (coarse rows, P)
        for knot in range(n_knots):
            knots[knot] += np.einsum("ap,ap->p", along_cols[knot][:, cols], pixel_row_weights)
    return knots
