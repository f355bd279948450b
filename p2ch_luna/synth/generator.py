"""Synthetic chest CTs in the exact LUNA16 layout, for tests and CPU demos.

``python -m p2ch_luna.synth OUT_DIR --series N --seed S`` writes
``OUT_DIR/subset<k>/<series_uid>.mhd/.raw`` (MetaImage, int16 HU, uncompressed,
via SimpleITK) plus ``annotations.csv``, ``candidates.csv`` and
``annotations_with_malignancy.csv`` with the LUNA16 / book column names.
Series ``i`` goes to ``subset<i % K>``; its content depends only on
``(seed, i, shape, slices)``, so the output is identical byte for byte.

Generative model of one series (all sizes in mm, anatomy scaled to the field
of view so that small test images still hold a whole chest):

* Geometry: in-plane spacing U(0.55, 0.9), slice spacing from the usual
  clinical set (0.7-2.5), LUNA-like origin. Every 4th series of a dataset is
  stored with flipped axes (direction diag(1,1,-1) or diag(-1,-1,1)); the
  patient stays put in world space, only the array order changes.
* Scanner: a circular reconstruction field of view, -3024 or -2000 HU outside.
* Body: elliptic cross-section of fat (~-100 HU) around a muscle wall
  (~45 HU) and a soft-tissue mediastinum; a patient table (dense shell, foam
  core) below it; spine (cortical ring, trabecular body, discs, canal),
  sternum and sloping ribs (bone 200-600 HU); a trachea in the upper chest.
* Lungs: two super-ellipses inside the chest wall, cut by mediastinum, heart
  and spine, shrinking to a dome at the apex and sitting on a domed diaphragm.
  Parenchyma ~-860 HU with smooth texture (interpolated between
  knot slices) and a posterior
  (gravity-dependent) density gradient.
* Vessels: per lung, 8 trees grow from the hilum; each segment tapers and
  splits into two children at 15-40 degrees (radius x0.65-0.95) until it leaves
  the lung or is thinner than a voxel. Roots reach 3-4.5 mm radius, so vessels
  and their junctions look like small nodules at a fixed HU threshold. Tubes
  are line-segment distance fields drawn only inside local bounding boxes,
  40-90 HU, clipped to the lungs.
* Nodules: 0-4 per series; diameter lognormal (median 7 mm) clipped to 3-30 mm
  and to what fits the lung; solid (0..60 HU) or, for >= 6 mm, ground glass
  (-520..-320 HU, 20 %); isolated, touching the pleura, or attached to a
  vessel. A latent malignancy has probability sigmoid((d - 10) / 1.8);
  malignant nodules get lobulated margins (Chebyshev harmonics of the
  direction, amplitude 12-28 %) and usually spicules (tapering segments),
  benign ones are smooth (rarely a spicule). 3-5 simulated radiologists score
  1-5 around 4.1 (malignant) or 2.4 (benign) with noise; ``mal_bool`` is the
  LIDC rule "at least two scores >= 4", which adds realistic label noise.
* Imaging: Gaussian noise (shifted windows of a small pool of noise slices)
  and partial-volume blur (one Gaussian filter over noise plus anatomy, so the
  noise is spatially correlated like real CT noise), rounded to int16.
* Candidates: 1-3 class-1 rows per nodule, jittered by about a millimetre;
  250-450 class-0 rows per series: points on vessels, vessel junctions, where
  vessels enter the lung from the hilum, the pleura/chest wall and random lung
  points (none within 3 mm of a nodule).

All world coordinates are ``origin + direction @ (spacing * [col, row, index])``,
exactly what SimpleITK's ``TransformContinuousIndexToPhysicalPoint`` gives.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from p2ch_luna.io.atomic import atomic_write_text
from p2ch_luna.cli import make_parser, run_command
from p2ch_luna.io.ct import write_metaimage
from p2ch_luna.errors import UsageError
from p2ch_luna.geometry import Geometry
from p2ch_luna.paths import paths_from_args

log = logging.getLogger(__name__)

UID_PREFIX = "1.3.6.1.4.1.14519.5.2.1.6279.6001."
UID_DIGITS = 30
DEFAULT_SHAPE = (512, 512)
DEFAULT_SLICES = (100, 160)
DEFAULT_SUBSETS = 10
GENERATOR_VERSION = 2
"""Bumped whenever the same seed and arguments give different data (the demo regenerates then)."""
FLIP_EVERY = 4
FLIPPED_DIRECTIONS = ((1, 1, -1), (-1, -1, 1))  # axis signs (x, y, z)
MIN_SHAPE = 32
MIN_SLICES = 16

IN_PLANE_SPACING_MM = (0.55, 0.9)
SLICE_SPACINGS_MM = (0.7, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5)
SLICE_SPACING_WEIGHTS = (0.1, 0.05, 0.15, 0.25, 0.1, 0.15, 0.2)
OUTSIDE_FOV_HU = (-3024, -2000)

HU_AIR = -1000.0
HU_LUNG = -860.0
HU_FAT = -100.0
HU_MUSCLE = 45.0
HU_MEDIASTINUM = 35.0
HU_CORTICAL = 600.0
HU_TRABECULAR = 220.0
HU_DISC = 90.0
HU_CANAL = 15.0
HU_RIB = 500.0
HU_STERNUM = 350.0
HU_TABLE_SHELL = 200.0
HU_TABLE_FOAM = -650.0
HU_VESSEL = (40.0, 90.0)
HU_SOLID = (0.0, 60.0)
HU_GROUND_GLASS = (-520.0, -320.0)
HU_INT16_RANGE = (-3024, 3071)

NOISE_SD_BEFORE_BLUR = (25.0, 55.0)
BLUR_SIGMA_IRC = (0.4, 0.55, 0.55)  # voxels: partial volume / scanner PSF
EDGE_MM = 0.6
TEXTURE_KNOT_SLICES = 5
TEXTURE_OCTAVES = ((20, 28.0),)  # (coarse cell in pixels, HU amplitude)
NOISE_POOL_SLICES = 8
NOISE_POOL_PAD = 64  # width of the soft edge of drawn tubes and nodules

NODULE_COUNT_WEIGHTS = (0.2, 0.35, 0.25, 0.12, 0.08)  # 0..4 nodules
NODULE_MEDIAN_MM = 7.0
NODULE_LOG_SD = 0.5
NODULE_DIAMETER_MM = (3.0, 30.0)
GROUND_GLASS_FRACTION = 0.2
GROUND_GLASS_MIN_MM = 6.0
NODULE_GAP_MM = 3.0
NODULE_LOCATIONS = ("isolated", "pleural", "juxtavascular")
NODULE_LOCATION_WEIGHTS = (0.5, 0.25, 0.25)
MALIGNANCY_MIDPOINT_MM = 10.0
MALIGNANCY_SCALE_MM = 1.8
READER_COUNTS = (4, 3, 5)
READER_COUNT_WEIGHTS = (0.64, 0.34, 0.02)
SCORE_MEAN = {True: 4.1, False: 2.4}
SCORE_SD = 0.85
MALIGNANT_SCORE = 4
MALIGNANT_VOTES = 2
PLACEMENT_TRIES = 60

NEGATIVES_PER_SERIES = (250, 450)
NEGATIVE_KINDS = ("vessel", "junction", "entry", "wall", "lung")
NEGATIVE_WEIGHTS = (0.35, 0.15, 0.10, 0.15, 0.25)
"""Hard negatives: along vessels, at their junctions, where they enter the lung from the
mediastinum (round, nodule-like stumps next to the hilum), on the chest wall; plus lung points."""
NEGATIVE_NODULE_CLEARANCE_MM = 3.0

ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
CANDIDATE_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "class")
MALIGNANCY_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm", "mal_bool",
                      "mal_details", "bboxLowX", "bboxLowY", "bboxLowZ", "bboxHighX", "bboxHighY",
                      "bboxHighZ", "len_mal_details")


@dataclass(frozen=True)
class SyntheticNodule:
    """One drawn nodule; coordinates refer to the stored (possibly flipped) image."""

    center_xyz: tuple[float, float, float]
    center_irc: tuple[float, float, float]
    diameter_mm: float
    texture: str  # "solid" or "ground_glass"
    location: str  # one of NODULE_LOCATIONS
    lobulation: float
    spicules: int
    malignancy_scores: tuple[int, ...]
    is_malignant: bool  # the LIDC-style label derived from the scores
    bbox_low_xyz: tuple[float, float, float]
    bbox_high_xyz: tuple[float, float, float]


@dataclass(frozen=True)
class SyntheticCandidate:
    center_xyz: tuple[float, float, float]
    is_nodule: bool
    kind: str  # "nodule" or one of NEGATIVE_KINDS


@dataclass(frozen=True, eq=False)
class SyntheticSeries:
    """One generated CT in memory: HU ``(I, R, C)`` int16 as stored on disk."""

    hu: np.ndarray
    geometry: Geometry
    nodules: tuple[SyntheticNodule, ...]
    candidates: tuple[SyntheticCandidate, ...]
    lung_mask: np.ndarray  # lungs without vessels or nodules, same orientation as hu


@dataclass(frozen=True)
class SeriesInfo:
    """What was written for one series (everything except the voxels)."""

    series_uid: str
    subset: int
    path: Path
    geometry: Geometry
    nodules: tuple[SyntheticNodule, ...]
    candidates: tuple[SyntheticCandidate, ...]


@dataclass
class _Frame:
    """Canonical (identity-direction) voxel grid and its centred mm coordinates."""

    shape: tuple[int, int, int]
    spacing: np.ndarray  # (z, y, x) mm
    offset: np.ndarray  # mm of voxel (0, 0, 0)

    def to_mm(self, irc: np.ndarray) -> np.ndarray:
        return np.asarray(irc, dtype=np.float64) * self.spacing + self.offset

    def to_irc(self, mm: np.ndarray) -> np.ndarray:
        return (np.asarray(mm, dtype=np.float64) - self.offset) / self.spacing

    def axes_mm(self, lo: Sequence[int], hi: Sequence[int]) -> list[np.ndarray]:
        """Broadcastable mm coordinates of the box ``lo:hi`` along (z, y, x)."""
        axes = []
        for axis in range(3):
            values = (np.arange(lo[axis], hi[axis]) * self.spacing[axis] + self.offset[axis]).astype(np.float32)
            shape = [1, 1, 1]
            shape[axis] = -1
            axes.append(values.reshape(shape))
        return axes

    def box(self, lo_mm: np.ndarray, hi_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lo = np.floor(self.to_irc(lo_mm)).astype(int)
        hi = np.ceil(self.to_irc(hi_mm)).astype(int) + 1
        return np.clip(lo, 0, self.shape), np.clip(hi, 0, self.shape)


@dataclass
class _Vessels:
    starts: np.ndarray  # (n, 3) mm, segments inside the lungs
    ends: np.ndarray
    radii: np.ndarray
    junctions: np.ndarray  # (m, 3) mm


def make_series(rng: np.random.Generator, shape: tuple[int, int] = DEFAULT_SHAPE, n_slices: int = 130,
                flip: tuple[int, int, int] | None = None, n_nodules: int | None = None) -> SyntheticSeries:
    """Generate one synthetic chest CT in memory.

    ``flip`` gives the axis signs (x, y, z) of the stored direction matrix
    (default identity); ``n_nodules`` overrides the random count (0-4). A
    nodule that does not fit the lungs is dropped, so fewer may come back.
    """
    rows, cols = (int(v) for v in shape)
    if min(rows, cols) < MIN_SHAPE or n_slices < MIN_SLICES:
        raise UsageError(f"series shape {n_slices}x{rows}x{cols} is too small "
                         f"(need >= {MIN_SLICES} slices of >= {MIN_SHAPE}x{MIN_SHAPE})")
    signs = np.array(flip if flip is not None else (1, 1, 1), dtype=int)
    if signs.shape != (3,) or not np.all(np.abs(signs) == 1):
        raise UsageError(f"flip must be three signs (+1/-1), got {flip}")
    in_plane = float(np.round(rng.uniform(*IN_PLANE_SPACING_MM), 6))
    slice_mm = float(rng.choice(SLICE_SPACINGS_MM, p=SLICE_SPACING_WEIGHTS))
    spacing = np.array([slice_mm, in_plane, in_plane])
    extent = spacing * np.array([n_slices, rows, cols])
    frame = _Frame((n_slices, rows, cols), spacing, np.array([0.5 * slice_mm, *(0.5 * in_plane - extent[1:] / 2)]))

    hu, lung, anatomy = _draw_anatomy(rng, frame)
    vessel_occupancy = np.zeros(frame.shape, dtype=np.float32)
    vessels = _grow_vessels(rng, frame, lung, anatomy, vessel_occupancy)
    vessel_hu = np.float32(rng.uniform(*HU_VESSEL))
    for k in range(frame.shape[0]):  # slice by slice: cache friendly, no full-size temporaries
        occupancy = vessel_occupancy[k]
        occupancy *= lung[k]
        hu[k] += occupancy * (vessel_hu - hu[k])
    del vessel_occupancy

    count = int(rng.choice(len(NODULE_COUNT_WEIGHTS), p=NODULE_COUNT_WEIGHTS)) if n_nodules is None else n_nodules
    nodules_mm = _place_nodules(rng, frame, lung, anatomy, vessels, count)
    for nodule in nodules_mm:
        _draw_nodule(rng, frame, hu, lung, nodule)

    _add_noise(rng, hu)
    ndimage.gaussian_filter(hu, BLUR_SIGMA_IRC, output=hu, truncate=2.5)
    outside_fov = ~anatomy["fov"]
    outside_hu = float(rng.choice(OUTSIDE_FOV_HU))
    hu_int = np.empty(frame.shape, dtype=np.int16)
    for k in range(frame.shape[0]):
        plane = hu[k]
        plane[outside_fov] = outside_hu
        np.clip(np.rint(plane, out=plane), *HU_INT16_RANGE, out=plane)
        hu_int[k] = plane
    del hu

    origin_canonical = np.array([  # xyz of canonical voxel (0, 0, 0)
        -0.5 * extent[2] + rng.uniform(-15, 15),
        -0.5 * extent[1] + rng.uniform(-25, 15),
        rng.uniform(-350, -50),
    ]).round(4)
    spacing_xyz = spacing[::-1].copy()
    shape_xyz = np.array(frame.shape[::-1])
    origin = origin_canonical + np.where(signs < 0, spacing_xyz * (shape_xyz - 1), 0.0)
    geometry = Geometry(origin, spacing_xyz, np.diag(signs).astype(float), frame.shape)
    flip_axes = tuple(axis for axis, sign in zip((2, 1, 0), signs) if sign < 0)

    def stored_irc(mm: np.ndarray) -> np.ndarray:
        irc = frame.to_irc(mm)
        for axis in flip_axes:
            irc[..., axis] = frame.shape[axis] - 1 - irc[..., axis]
        return irc

    nodules, positives = _finish_nodules(rng, frame, geometry, stored_irc, nodules_mm)
    negatives = _negative_candidates(rng, frame, lung, anatomy["boundary"], vessels, nodules_mm, geometry, stored_irc)
    candidates = positives + negatives
    order = rng.permutation(len(candidates))
    if flip_axes:
        hu_int = np.ascontiguousarray(np.flip(hu_int, axis=flip_axes))
        lung = np.ascontiguousarray(np.flip(lung, axis=flip_axes))
    return SyntheticSeries(hu_int, geometry, tuple(nodules), tuple(candidates[i] for i in order), lung)


def _add_noise(rng: np.random.Generator, hu: np.ndarray) -> None:
    """Add white Gaussian noise (correlated later by the blur) to ``hu`` in place.

    Each slice takes a randomly shifted window of a small pool of noise slices:
    far cheaper than drawing one normal number per voxel, and no visible pattern.
    """
    n_slices, rows, cols = hu.shape
    sd = np.float32(rng.uniform(*NOISE_SD_BEFORE_BLUR))
    pool = rng.standard_normal((NOISE_POOL_SLICES, rows + NOISE_POOL_PAD, cols + NOISE_POOL_PAD),
                               dtype=np.float32) * sd
    picks = rng.integers(0, NOISE_POOL_SLICES, n_slices)
    shifts = rng.integers(0, NOISE_POOL_PAD + 1, (n_slices, 2))
    for k in range(n_slices):
        (dy, dx), sign = shifts[k], np.float32(1 if k % 2 else -1)
        hu[k] += sign * pool[picks[k], dy:dy + rows, dx:dx + cols]


def _superellipse(x: np.ndarray, y: np.ndarray, a: float, b: float, power: float = 2.0) -> np.ndarray:
    return np.abs(x / a) ** power + np.abs(y / b) ** power


def _draw_anatomy(rng: np.random.Generator, frame: _Frame) -> tuple[np.ndarray, np.ndarray, dict]:
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

    static[_superellipse(bx, by, body_a, body_b) < 1] = HU_FAT + rng.uniform(-20, 20)
    static[_superellipse(bx, by, body_a - fat, body_b - fat) < 1] = HU_MUSCLE
    rho_cavity = _superellipse(bx, by, cav_a, cav_b)
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
    sternum = _superellipse(bx, by + cav_b + 0.5 * wall, 0.08 * cav_a, 0.45 * wall) < 1
    trachea = bx ** 2 + (by + 0.25 * cav_b) ** 2 < (0.07 * cav_a) ** 2

    rib_band = (rho_cavity >= 1.0) & (_superellipse(bx, by, cav_a + 0.6 * wall, cav_b + 0.6 * wall) < 1)
    angle_from_back = np.arccos(np.clip(by / np.sqrt(bx ** 2 + by ** 2 + 1e-6), -1, 1))
    rib_band &= angle_from_back < 0.82 * np.pi
    rib_offset = (0.35 * cav_a * angle_from_back).astype(np.float32)
    rib_period = rng.uniform(24, 32)

    mediastinum = _superellipse(bx, by + 0.15 * cav_b, 0.13 * cav_a, 0.75 * cav_b) < 1
    spine_zone = bx ** 2 + (by - vert_y) ** 2 < (1.5 * vert_r) ** 2
    lung_allowed = (rho_cavity < 0.96) & ~mediastinum & ~spine_zone & fov
    heart_rho = _superellipse(bx - 0.12 * cav_a, by - 0.05 * cav_b, 0.4 * cav_a, 0.55 * cav_b)

    t_base = rng.uniform(0.03, 0.1)
    t_apex = rng.uniform(0.9, 0.97)
    dome = rng.uniform(0.15, 0.25)
    lungs = []
    for side in (-1, 1):  # -1: patient's right (-x in LPS)
        lx, ly = bx - side * 0.5 * cav_a, by + 0.05 * cav_b
        ax, ay = 0.45 * cav_a, 0.8 * cav_b
        radial = _superellipse(lx, ly, ax, ay, 2.4) ** (1 / 2.4)
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
    knots = _texture_knots(rng, frame.shape, lung_pixels)
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


def _texture_knots(rng: np.random.Generator, shape: tuple[int, int, int], pixels: np.ndarray) -> np.ndarray:
    """Smooth lung texture (HU offsets) at every TEXTURE_KNOT_SLICES-th slice, on ``pixels`` only.

    Coarse random grids upsampled by Gaussian weights, evaluated only at the
    given pixels; slices in between interpolate linearly, so no full-volume
    noise field is ever built.
    """
    n_knots = shape[0] // TEXTURE_KNOT_SLICES + 2
    rows, cols = np.unravel_index(pixels, shape[1:])
    knots = np.zeros((n_knots, len(pixels)), dtype=np.float32)
    for cell, amplitude in TEXTURE_OCTAVES:
        row_weights, col_weights = (_upsampling_matrix(n, cell) for n in shape[1:])
        coarse = rng.standard_normal((n_knots, row_weights.shape[1], col_weights.shape[1])).astype(np.float32)
        along_cols = coarse @ col_weights.T  # (knots, coarse rows, C)
        pixel_row_weights = row_weights[rows].T * np.float32(amplitude)  # (coarse rows, P)
        for knot in range(n_knots):
            knots[knot] += np.einsum("ap,ap->p", along_cols[knot][:, cols], pixel_row_weights)
    return knots


def _upsampling_matrix(n: int, cell: int) -> np.ndarray:
    """(n, m) Gaussian weights from a coarse grid of spacing ``cell`` with unit-variance output."""
    m = max(2, n // cell + 2)
    fine = (np.arange(n) + 0.5) / cell + 0.5
    weights = np.exp(-0.5 * ((fine[:, None] - np.arange(m)[None, :]) / 0.6) ** 2)
    weights /= np.sqrt((weights ** 2).sum(axis=1, keepdims=True))
    return weights.astype(np.float32)


def _draw_tube(frame: _Frame, target: np.ndarray, start: np.ndarray, end: np.ndarray,
               radius_start: float, radius_end: float) -> None:
    """Max-composite a tapering tube (line-segment distance field) into ``target``."""
    reach = max(radius_start, radius_end) + EDGE_MM
    lo, hi = frame.box(np.minimum(start, end) - reach, np.maximum(start, end) + reach)
    if np.any(hi <= lo):
        return
    z, y, x = frame.axes_mm(lo, hi)
    axis = (end - start).astype(np.float32)
    length2 = max(float(axis @ axis), 1e-6)
    dz, dy, dx = z - np.float32(start[0]), y - np.float32(start[1]), x - np.float32(start[2])
    t = _unit_clip((dz * axis[0] + dy * axis[1] + dx * axis[2]) / length2)
    dist = np.sqrt((dz - t * axis[0]) ** 2 + (dy - t * axis[1]) ** 2 + (dx - t * axis[2]) ** 2)
    radius = radius_start + t * np.float32(radius_end - radius_start)
    occupancy = _unit_clip((radius - dist) / EDGE_MM + 0.5)
    region = target[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    np.maximum(region, occupancy, out=region)


def _unit_clip(values: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] in place (cheaper than np.clip on the many small arrays here)."""
    return np.minimum(np.maximum(values, 0, out=values), 1, out=values)


def _in_lung(frame: _Frame, lung: np.ndarray, mm: np.ndarray) -> np.ndarray:
    irc = np.rint(frame.to_irc(np.atleast_2d(mm))).astype(int)
    inside = np.all((irc >= 0) & (irc < np.array(frame.shape)), axis=1)
    result = np.zeros(len(irc), dtype=bool)
    result[inside] = lung[tuple(irc[inside].T)]
    return result


def _point_in_lung(frame: _Frame, lung: np.ndarray, mm: np.ndarray) -> bool:
    i, r, c = (int(round(v)) for v in frame.to_irc(mm))
    n_i, n_r, n_c = frame.shape
    return 0 <= i < n_i and 0 <= r < n_r and 0 <= c < n_c and bool(lung[i, r, c])


def _random_unit(rng: np.random.Generator) -> np.ndarray:
    vector = rng.standard_normal(3)
    return vector / np.linalg.norm(vector)


def _rotate_towards(direction: np.ndarray, other: np.ndarray, angle: float) -> np.ndarray:
    """``direction`` turned by ``angle`` radians in the plane it spans with ``other``."""
    perpendicular = other - (other @ direction) * direction
    norm = np.linalg.norm(perpendicular)
    if norm < 1e-6:
        return direction
    return np.cos(angle) * direction + np.sin(angle) * perpendicular / norm


def _grow_vessels(rng: np.random.Generator, frame: _Frame, lung: np.ndarray, anatomy: dict,
                  occupancy: np.ndarray) -> _Vessels:
    """Grow and draw branching, tapering vessel trees from each hilum."""
    min_radius = max(0.35, 0.35 * float(frame.spacing[1]))
    z_extent = frame.shape[0] * frame.spacing[0]
    starts, ends, radii, junctions = [], [], [], []
    max_segments = int(np.clip(frame.shape[1] * frame.shape[2] / 100, 300, 2500))
    for side in anatomy["lungs"]:
        ax, ay = side["axes"]
        cx, cy = side["center"]
        lateral = np.sign(cx) if cx != 0 else 1.0
        hilum = np.array([z_extent * (side["base"] + 0.5 * (0.93 - side["base"])), cy, cx - lateral * 0.6 * ax])
        root_radius = float(np.clip(rng.uniform(3.0, 4.5), 0.8, 0.16 * ax))
        length_scale = float(np.clip(ax / 55.0, 0.25, 1.0))
        root_dirs = [(1, 0, 0), (-1, 0, 0), (0, 0, lateral), (0, -1, 0.5 * lateral), (0, 1, 0.5 * lateral),
                     (0.7, 0, lateral), (-0.7, 0, lateral), (-0.7, 1, 0.3 * lateral)]
        stack = []
        for direction in root_dirs:
            vector = np.array(direction, float) + 0.35 * rng.standard_normal(3)
            stack.append((hilum, vector / np.linalg.norm(vector), root_radius * rng.uniform(0.75, 1.0), 0))
        count = 0
        while stack and count < max_segments:
            start, direction, radius, depth = stack.pop()
            length = (rng.uniform(3, 6) * radius + rng.uniform(3, 6)) * length_scale
            end = start + direction * length
            end_radius = radius * 0.95
            end_inside = _point_in_lung(frame, lung, end)
            middle_inside = _point_in_lung(frame, lung, 0.5 * (start + end))
            if end_inside or middle_inside or _point_in_lung(frame, lung, start):
                _draw_tube(frame, occupancy, start, end, radius, end_radius)  # else clipped away anyway
            count += 1
            if middle_inside:
                starts.append(start)
                ends.append(end)
                radii.append(radius)
            if (not end_inside and depth >= 1) or end_radius < min_radius:
                continue
            outward = end - hilum
            outward /= max(np.linalg.norm(outward), 1e-6)
            if rng.random() < 0.85:
                if end_inside:
                    junctions.append(end)
                axis = _random_unit(rng)
                children = ((rng.uniform(0.82, 0.95), axis), (rng.uniform(0.65, 0.82), -axis))
            else:
                children = ((rng.uniform(0.85, 0.95), _random_unit(rng)),)
            for scale, turn in children:
                child = _rotate_towards(direction, turn, np.deg2rad(rng.uniform(15, 40)))
                child = child + 0.25 * outward
                stack.append((end, child / np.linalg.norm(child), end_radius * scale, depth + 1))
    empty = np.zeros((0, 3))
    return _Vessels(np.array(starts) if starts else empty, np.array(ends) if ends else empty,
                    np.array(radii), np.array(junctions) if junctions else empty)


@dataclass
class _NoduleDraft:
    center_mm: np.ndarray
    diameter_mm: float
    texture: str
    location: str
    latent_malignant: bool
    lobulation: float
    lobe_axes: np.ndarray
    lobe_weights: np.ndarray
    lobe_orders: np.ndarray
    spicule_dirs: np.ndarray
    spicule_lengths: np.ndarray
    hu: float


def _ball_fraction_in_lung(frame: _Frame, lung: np.ndarray, center: np.ndarray, radius: float) -> float:
    """Fraction of the ball's voxels inside the lungs; 0 for a ball cut by the volume border."""
    lo = np.floor(frame.to_irc(center - radius)).astype(int)
    hi = np.ceil(frame.to_irc(center + radius)).astype(int) + 1
    if np.any(lo < 0) or np.any(hi > np.array(frame.shape)):
        return 0.0
    z, y, x = frame.axes_mm(lo, hi)
    ball = ((z - center[0]) ** 2 + (y - center[1]) ** 2 + (x - center[2]) ** 2) <= radius ** 2
    total = int(ball.sum())
    if total == 0:
        return float(_in_lung(frame, lung, center)[0])
    inside = lung[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] & ball
    return float(inside.sum()) / total


def _random_lung_points(rng: np.random.Generator, frame: _Frame, lung: np.ndarray, count: int) -> np.ndarray:
    """``count`` uniform points (mm) inside the lungs, by rejection sampling."""
    found = []
    total = 0
    for _ in range(200):
        irc = rng.uniform(0, 1, (max(64, 4 * count), 3)) * np.array(frame.shape) - 0.5
        keep = _in_lung(frame, lung, frame.to_mm(irc))
        found.append(frame.to_mm(irc[keep]))
        total += int(keep.sum())
        if total >= count:
            break
    points = np.concatenate(found) if found else np.zeros((0, 3))
    return points[:count]


def _place_nodules(rng: np.random.Generator, frame: _Frame, lung: np.ndarray, anatomy: dict,
                   vessels: _Vessels, count: int) -> list[_NoduleDraft]:
    anatomy["boundary"] = _boundary_indices(lung)
    placed: list[_NoduleDraft] = []
    usable_vessels = np.flatnonzero((vessels.radii > 0.6) & (vessels.radii < 3.5))
    for _ in range(count):
        diameter = float(np.clip(rng.lognormal(np.log(NODULE_MEDIAN_MM), NODULE_LOG_SD), *NODULE_DIAMETER_MM))
        location = str(rng.choice(NODULE_LOCATIONS, p=NODULE_LOCATION_WEIGHTS))
        center = None
        while center is None and diameter >= NODULE_DIAMETER_MM[0]:
            center = _find_nodule_center(rng, frame, lung, anatomy, vessels, usable_vessels, placed,
                                         diameter / 2, location)
            if center is None:
                diameter *= 0.8
        if center is None:
            log.debug("dropped a nodule that does not fit the lungs")
            continue
        placed.append(_nodule_draft(rng, center, diameter, location))
    return placed


def _find_nodule_center(rng: np.random.Generator, frame: _Frame, lung: np.ndarray, anatomy: dict,
                        vessels: _Vessels, usable_vessels: np.ndarray, placed: list[_NoduleDraft],
                        radius: float, location: str) -> np.ndarray | None:
    boundary = anatomy["boundary"]
    for _ in range(PLACEMENT_TRIES):
        if location == "pleural" and len(boundary):
            wall = frame.to_mm(np.array(np.unravel_index(rng.choice(boundary), frame.shape), float))
            side = min(anatomy["lungs"], key=lambda s: abs(s["center"][0] - wall[2]))
            inward = np.array([0.0, side["center"][1] - wall[1], side["center"][0] - wall[2]])
            inward /= max(np.linalg.norm(inward), 1e-6)
            center = wall + inward * radius * rng.uniform(0.5, 0.9)
            ok = 0.55 <= _ball_fraction_in_lung(frame, lung, center, radius) <= 0.97
        elif location == "juxtavascular" and len(usable_vessels):
            i = rng.choice(usable_vessels)
            axis = vessels.ends[i] - vessels.starts[i]
            axis /= max(np.linalg.norm(axis), 1e-6)
            perpendicular = _rotate_towards(axis, _random_unit(rng), np.pi / 2)
            point = vessels.starts[i] + rng.uniform(0.2, 0.8) * (vessels.ends[i] - vessels.starts[i])
            center = point + perpendicular * (vessels.radii[i] + radius * rng.uniform(0.6, 0.9))
            ok = _ball_fraction_in_lung(frame, lung, center, radius + 0.5) >= 0.97
        else:
            points = _random_lung_points(rng, frame, lung, 1)
            if not len(points):
                return None
            center = points[0]
            ok = _ball_fraction_in_lung(frame, lung, center, radius + 1.0) >= 0.999
        ok = ok and bool(_in_lung(frame, lung, center)[0]) and all(
            np.linalg.norm(center - other.center_mm) > radius + other.diameter_mm / 2 + NODULE_GAP_MM
            for other in placed)
        if ok:
            return center
    return None


def _nodule_draft(rng: np.random.Generator, center: np.ndarray, diameter: float, location: str) -> _NoduleDraft:
    malignant = bool(rng.random() < 1 / (1 + np.exp(-(diameter - MALIGNANCY_MIDPOINT_MM) / MALIGNANCY_SCALE_MM)))
    ground_glass = diameter >= GROUND_GLASS_MIN_MM and rng.random() < GROUND_GLASS_FRACTION
    if malignant:
        lobulation = rng.uniform(0.12, 0.28)
        spicules = 0 if rng.random() < 0.3 else int(rng.integers(4, 11))
    else:
        lobulation = rng.uniform(0.0, 0.07)
        spicules = int(rng.integers(1, 4)) if rng.random() < 0.1 else 0
    lobes = int(rng.integers(2, 5))
    weights = rng.uniform(0.3, 1.0, lobes)
    hu_range = HU_GROUND_GLASS if ground_glass else HU_SOLID
    return _NoduleDraft(
        center_mm=center, diameter_mm=diameter, texture="ground_glass" if ground_glass else "solid",
        location=location, latent_malignant=malignant, lobulation=float(lobulation),
        lobe_axes=np.array([_random_unit(rng) for _ in range(lobes)]), lobe_weights=weights / weights.sum(),
        lobe_orders=rng.integers(3, 6, lobes), spicule_dirs=np.array([_random_unit(rng) for _ in range(spicules)]),
        spicule_lengths=rng.uniform(0.5, 1.3, spicules) * diameter / 2 + 1.0, hu=float(rng.uniform(*hu_range)))


_CHEBYSHEV = {3: (0, -3, 0, 4), 4: (1, 0, -8, 0, 8), 5: (0, 5, 0, -20, 0, 16)}


def _draw_nodule(rng: np.random.Generator, frame: _Frame, hu: np.ndarray, lung: np.ndarray,
                 nodule: _NoduleDraft) -> None:
    """Blend a lobulated (and maybe spiculated) nodule into ``hu``."""
    radius = nodule.diameter_mm / 2
    reach = radius * (1 + nodule.lobulation) + EDGE_MM
    if len(nodule.spicule_lengths):
        reach = max(reach, radius + float(nodule.spicule_lengths.max()) + EDGE_MM)
    lo, hi = frame.box(nodule.center_mm - reach, nodule.center_mm + reach)
    z, y, x = frame.axes_mm(lo, hi)
    c = nodule.center_mm.astype(np.float32)
    dz, dy, dx = z - c[0], y - c[1], x - c[2]
    dist = np.sqrt(dz ** 2 + dy ** 2 + dx ** 2) + np.float32(1e-6)
    bumps = np.zeros(dist.shape, dtype=np.float32)
    for axis, weight, order in zip(nodule.lobe_axes, nodule.lobe_weights, nodule.lobe_orders):
        cosine = (dz * np.float32(axis[0]) + dy * np.float32(axis[1]) + dx * np.float32(axis[2])) / dist
        bumps += np.float32(weight) * np.polynomial.polynomial.polyval(cosine, _CHEBYSHEV[int(order)])
    surface = radius * (1 + nodule.lobulation * bumps)
    occupancy = np.clip((surface - dist) / EDGE_MM + 0.5, 0, 1).astype(np.float32)
    region_lung = lung[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    if len(nodule.spicule_lengths):
        spikes = np.zeros(occupancy.shape, dtype=np.float32)
        local = _Frame(occupancy.shape, frame.spacing, frame.to_mm(lo))
        base_radius = max(0.45, 0.15 * radius)
        for direction, length in zip(nodule.spicule_dirs, nodule.spicule_lengths):
            start = nodule.center_mm + direction * radius * 0.8
            _draw_tube(local, spikes, start, start + direction * length, base_radius, 0.2)
        np.maximum(occupancy, spikes * region_lung, out=occupancy)
    region = hu[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    values = np.float32(nodule.hu)
    if nodule.texture == "ground_glass":
        values = values + rng.standard_normal(occupancy.shape, dtype=np.float32) * np.float32(40)
    region += occupancy * (values - region)


def _finish_nodules(rng: np.random.Generator, frame: _Frame, geometry: Geometry, stored_irc,
                    drafts: list[_NoduleDraft]) -> tuple[list[SyntheticNodule], list[SyntheticCandidate]]:
    nodules, positives = [], []
    for draft in drafts:
        readers = int(rng.choice(READER_COUNTS, p=READER_COUNT_WEIGHTS))
        mean = SCORE_MEAN[draft.latent_malignant]
        scores = tuple(int(s) for s in np.clip(np.rint(rng.normal(mean, SCORE_SD, readers)), 1, 5))
        radius = draft.diameter_mm / 2 * (1 + draft.lobulation)
        irc = stored_irc(draft.center_mm)
        corner_a = np.floor(stored_irc(draft.center_mm - radius))
        corner_b = np.ceil(stored_irc(draft.center_mm + radius))
        low, high = np.minimum(corner_a, corner_b), np.maximum(corner_a, corner_b)
        xyz = geometry.irc_to_xyz(irc)
        nodules.append(SyntheticNodule(
            center_xyz=_triple(xyz), center_irc=_triple(irc), diameter_mm=round(draft.diameter_mm, 6),
            texture=draft.texture, location=draft.location, lobulation=draft.lobulation,
            spicules=len(draft.spicule_lengths), malignancy_scores=scores,
            is_malignant=sum(s >= MALIGNANT_SCORE for s in scores) >= MALIGNANT_VOTES,
            bbox_low_xyz=_triple(geometry.irc_to_xyz(low)), bbox_high_xyz=_triple(geometry.irc_to_xyz(high))))
        jitter_sd = min(1.5, draft.diameter_mm / 6)
        for _ in range(1 + rng.binomial(2, 0.3)):
            point = draft.center_mm + rng.normal(0, jitter_sd, 3)
            positives.append(SyntheticCandidate(_triple(geometry.irc_to_xyz(stored_irc(point))), True, "nodule"))
    return nodules, positives


def _negative_candidates(rng: np.random.Generator, frame: _Frame, lung: np.ndarray, boundary: np.ndarray,
                         vessels: _Vessels, nodules: list[_NoduleDraft], geometry: Geometry,
                         stored_irc) -> list[SyntheticCandidate]:
    """Hard negatives on vessels, junctions and the pleura, plus random lung points."""
    counts = rng.multinomial(int(rng.integers(*NEGATIVES_PER_SERIES)), NEGATIVE_WEIGHTS)
    groups = []
    for kind, count in zip(NEGATIVE_KINDS, counts):
        if kind == "vessel" and len(vessels.radii):
            lengths = np.linalg.norm(vessels.ends - vessels.starts, axis=1)
            pick = rng.choice(len(lengths), count, p=lengths / lengths.sum())
            t = rng.uniform(0, 1, (count, 1))
            points = vessels.starts[pick] + t * (vessels.ends[pick] - vessels.starts[pick])
            points += rng.normal(0, 0.7, points.shape)
        elif kind == "entry" and len(vessels.radii):
            entering = ~_in_lung(frame, lung, vessels.starts)
            if not entering.any():
                entering[:] = True
            pick = rng.choice(np.flatnonzero(entering), count)
            t = rng.uniform(0.2, 0.7, (count, 1))
            points = vessels.starts[pick] + t * (vessels.ends[pick] - vessels.starts[pick])
            points += rng.normal(0, 0.7, points.shape)
        elif kind == "junction" and len(vessels.junctions):
            points = vessels.junctions[rng.integers(0, len(vessels.junctions), count)]
            points = points + rng.normal(0, 0.7, points.shape)
        elif kind == "wall" and len(boundary):
            irc = np.array(np.unravel_index(rng.choice(boundary, count), frame.shape), float).T
            points = frame.to_mm(irc + rng.uniform(-0.5, 0.5, irc.shape))
        else:
            points = _random_lung_points(rng, frame, lung, count)
        groups.append((kind, points.reshape(-1, 3)))
    candidates = []
    for kind, points in groups:
        keep = np.ones(len(points), dtype=bool)
        for nodule in nodules:
            clearance = nodule.diameter_mm / 2 * (1 + nodule.lobulation) + NEGATIVE_NODULE_CLEARANCE_MM
            keep &= np.linalg.norm(points - nodule.center_mm, axis=1) > clearance
        irc = np.clip(frame.to_irc(points[keep]), 0, np.array(frame.shape) - 1)
        xyz = geometry.irc_to_xyz(stored_irc(frame.to_mm(irc))) if len(irc) else np.zeros((0, 3))
        candidates.extend(SyntheticCandidate(_triple(p), False, kind) for p in np.atleast_2d(xyz))
    return candidates


def _boundary_indices(lung: np.ndarray) -> np.ndarray:
    interior = lung.copy()
    interior[:, 1:, :] &= lung[:, :-1, :]
    interior[:, :-1, :] &= lung[:, 1:, :]
    interior[:, :, 1:] &= lung[:, :, :-1]
    interior[:, :, :-1] &= lung[:, :, 1:]
    return np.flatnonzero(lung & ~interior)


def _triple(values: np.ndarray) -> tuple[float, float, float]:
    return tuple(round(float(v), 6) for v in np.asarray(values).reshape(3))


def make_series_uid(rng: np.random.Generator) -> str:
    """A DICOM-looking LUNA16 series UID drawn from ``rng``."""
    digits = rng.integers(0, 10, UID_DIGITS)
    digits[0] = rng.integers(1, 10)
    return UID_PREFIX + "".join(str(d) for d in digits)


def write_series(series: SyntheticSeries, path: str | os.PathLike) -> None:
    """Write ``series`` as uncompressed MetaImage ``path`` (.mhd + .raw), atomically."""
    write_metaimage(series.hu, series.geometry, path)


def write_dataset(out_dir: str | os.PathLike, series: Iterable[tuple[str, SyntheticSeries]],
                  subsets: int = DEFAULT_SUBSETS) -> list[SeriesInfo]:
    """Write ``(uid, series)`` pairs round-robin into ``subset0..K-1`` plus the three CSVs.

    Series are written as they come, so a generator keeps only one in memory.
    """
    root = Path(out_dir)
    for k in range(subsets):
        (root / f"subset{k}").mkdir(parents=True, exist_ok=True)
    infos = []
    for i, (uid, one) in enumerate(series):
        path = root / f"subset{i % subsets}" / f"{uid}.mhd"
        write_series(one, path)
        infos.append(SeriesInfo(uid, i % subsets, path, one.geometry, one.nodules, one.candidates))
    write_tables(root, infos)
    return infos


def write_tables(out_dir: str | os.PathLike, infos: Sequence[SeriesInfo]) -> None:
    """Write annotations.csv, candidates.csv and annotations_with_malignancy.csv."""
    root = Path(out_dir)
    annotations, candidates, malignancy = [], [], []
    for info in infos:
        for nodule in info.nodules:
            annotations.append([info.series_uid, *map(_number, nodule.center_xyz), _number(nodule.diameter_mm)])
            scores = list(nodule.malignancy_scores)
            malignancy.append([info.series_uid, *map(_number, nodule.center_xyz), _number(nodule.diameter_mm),
                               str(nodule.is_malignant), str(scores),
                               *map(_number, nodule.bbox_low_xyz), *map(_number, nodule.bbox_high_xyz),
                               len(scores)])
        for candidate in info.candidates:
            candidates.append([info.series_uid, *map(_number, candidate.center_xyz), int(candidate.is_nodule)])
    for name, columns, rows in (("annotations.csv", ANNOTATION_COLUMNS, annotations),
                                ("candidates.csv", CANDIDATE_COLUMNS, candidates),
                                ("annotations_with_malignancy.csv", MALIGNANCY_COLUMNS, malignancy)):
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
        atomic_write_text(root / name, buffer.getvalue())


def _number(value: float) -> str:
    return f"{value:.6f}"


def series_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of series ``index``: independent of how many series are made."""
    return np.random.default_rng([seed, index])


def series_flip(index: int) -> tuple[int, int, int] | None:
    """Every FLIP_EVERY-th series (index 3, 7, ...) is stored with flipped axes."""
    if index % FLIP_EVERY != FLIP_EVERY - 1:
        return None
    return FLIPPED_DIRECTIONS[(index // FLIP_EVERY) % len(FLIPPED_DIRECTIONS)]


def generate_dataset(out_dir: str | os.PathLike, series: int = 10, seed: int = 0, subsets: int = DEFAULT_SUBSETS,
                     shape: tuple[int, int] = DEFAULT_SHAPE, slices: tuple[int, int] = DEFAULT_SLICES,
                     overwrite: bool = False, progress: bool = True) -> list[SeriesInfo]:
    """Generate a synthetic LUNA16 folder; deterministic for given arguments.

    Refuses a folder that already holds LUNA16 files unless ``overwrite``, which
    first removes the ``.mhd``/``.raw`` files in its ``subset*/`` folders.
    """
    if series < 1 or subsets < 1:
        raise UsageError(f"--series and --subsets must be >= 1 (got {series} and {subsets})")
    low, high = slices
    if low > high:
        raise UsageError(f"--slices MIN MAX needs MIN <= MAX (got {low} {high})")
    root = Path(out_dir)
    existing = _existing_dataset_files(root)
    if existing and not overwrite:
        raise UsageError(f"{root} already holds a dataset ({existing[0].name}); choose an empty folder "
                         "or pass --overwrite")
    for path in existing:
        if path.suffix in (".mhd", ".raw"):
            path.unlink()
    uid_rng = np.random.default_rng([seed, series, 0x5E41E5])
    uids: list[str] = []
    while len(uids) < series:
        uid = make_series_uid(uid_rng)
        if uid not in uids:
            uids.append(uid)

    def generate() -> Iterator[tuple[str, SyntheticSeries]]:
        for i in tqdm(range(series), desc="synth", unit="series", disable=not progress):
            rng = series_rng(seed, i)
            n_slices = int(rng.integers(low, high + 1))
            yield uids[i], make_series(rng, shape, n_slices, flip=series_flip(i))

    infos = write_dataset(root, generate(), subsets)
    log.info("wrote %d series with %d nodules to %s", len(infos), sum(len(i.nodules) for i in infos), root)
    return infos


def _existing_dataset_files(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [root / name for name in ("annotations.csv", "candidates.csv", "annotations_with_malignancy.csv")
             if (root / name).exists()]
    for subset in sorted(root.glob("subset*")):
        found.extend(sorted(subset.glob("*.mhd")) + sorted(subset.glob("*.raw")))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser("python -m p2ch_luna.synth",
                         "Write a synthetic chest-CT dataset in the LUNA16 layout.")
    parser.add_argument("out_dir", nargs="?", default=None,
                        help="output folder (default: the --data-root folder)")
    parser.add_argument("--series", type=int, default=10, help="number of series")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--subsets", type=int, default=DEFAULT_SUBSETS, help="number of subset folders")
    parser.add_argument("--shape", type=int, nargs=2, default=list(DEFAULT_SHAPE), metavar=("ROWS", "COLS"),
                        help="in-plane size of each slice")
    parser.add_argument("--slices", type=int, nargs=2, default=list(DEFAULT_SLICES), metavar=("MIN", "MAX"),
                        help="range of the number of slices per series")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in OUT_DIR")
    return run_command(_body, parser, argv)


def _body(args: argparse.Namespace) -> int:
    out_dir = Path(args.out_dir) if args.out_dir else paths_from_args(args).data_root
    infos = generate_dataset(out_dir, series=args.series, seed=args.seed, subsets=args.subsets,
                             shape=tuple(args.shape), slices=tuple(args.slices), overwrite=args.overwrite)
    nodules = sum(len(info.nodules) for info in infos)
    candidates = sum(len(info.candidates) for info in infos)
    print(f"wrote {len(infos)} series, {nodules} nodules, {candidates} candidates to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
