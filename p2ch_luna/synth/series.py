"""One synthetic series: geometry, anatomy, vessels, nodules, noise and blur, candidates; its content depends only
on its random generator, so a dataset is the same byte for byte for the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from p2ch_luna.errors import UsageError
from p2ch_luna.geometry import Geometry
from p2ch_luna.synth.anatomy import draw_anatomy
from p2ch_luna.synth.candidates import negative_candidates
from p2ch_luna.synth.drawing import Frame
from p2ch_luna.synth.nodules import draw_nodule, finish_nodules, place_nodules
from p2ch_luna.synth.parameters import (
    BLUR_SIGMA_IRC,
    DEFAULT_SHAPE,
    FLIP_EVERY,
    FLIPPED_DIRECTIONS,
    HU_INT16_RANGE,
    IN_PLANE_SPACING_MM,
    MIN_SHAPE,
    MIN_SLICES,
    NODULE_COUNT_WEIGHTS,
    NOISE_POOL_PAD,
    NOISE_POOL_SLICES,
    OUTSIDE_FOV_HU,
    UID_DIGITS,
    UID_PREFIX,
)
from p2ch_luna.synth.records import SyntheticCandidate, SyntheticNodule
from p2ch_luna.synth.regime import DEFAULT, Regime, draw
from p2ch_luna.synth.vessels import grow_vessels


@dataclass(frozen=True, eq=False)
class SyntheticSeries:
    """One generated CT in memory: HU ``(I, R, C)`` int16 as stored on disk."""

    hu: np.ndarray
    geometry: Geometry
    nodules: tuple[SyntheticNodule, ...]
    candidates: tuple[SyntheticCandidate, ...]
    lung_mask: np.ndarray  # lungs without vessels or nodules, same orientation as hu


def make_series(rng: np.random.Generator, shape: tuple[int, int] = DEFAULT_SHAPE, n_slices: int = 130,
                flip: tuple[int, int, int] | None = None, n_nodules: int | None = None,
                regime: Regime = DEFAULT) -> SyntheticSeries:
    """Generate one synthetic chest CT in memory.

    ``flip`` gives the axis signs (x, y, z) of the stored direction matrix
    (default identity); ``n_nodules`` overrides the random count (0-4). A
    nodule that does not fit the lungs is dropped, so fewer may come back.
    ``regime`` gives the scanner's and patient's ranges (:mod:`p2ch_luna.synth.regime`).
    """
    rows, cols = (int(v) for v in shape)
    if min(rows, cols) < MIN_SHAPE or n_slices < MIN_SLICES:
        raise UsageError(f"series shape {n_slices}x{rows}x{cols} is too small "
                         f"(need >= {MIN_SLICES} slices of >= {MIN_SHAPE}x{MIN_SHAPE})")
    signs = np.array(flip if flip is not None else (1, 1, 1), dtype=int)
    if signs.shape != (3,) or not np.all(np.abs(signs) == 1):
        raise UsageError(f"flip must be three signs (+1/-1), got {flip}")
    in_plane = float(np.round(rng.uniform(*IN_PLANE_SPACING_MM), 6))
    slice_mm = float(rng.choice(regime.slice_spacings_mm, p=regime.slice_spacing_weights))
    spacing = np.array([slice_mm, in_plane, in_plane])
    extent = spacing * np.array([n_slices, rows, cols])
    frame = Frame((n_slices, rows, cols), spacing, np.array([0.5 * slice_mm, *(0.5 * in_plane - extent[1:] / 2)]))

    hu, lung, anatomy = draw_anatomy(rng, frame)
    vessel_occupancy = np.zeros(frame.shape, dtype=np.float32)
    vessels = grow_vessels(rng, frame, lung, anatomy, vessel_occupancy, draw(rng, regime.vessel_radius_scale))
    vessel_hu = np.float32(rng.uniform(*regime.vessel_hu))
    for k in range(frame.shape[0]):  # slice by slice: cache friendly, no full-size temporaries
        occupancy = vessel_occupancy[k]
        occupancy *= lung[k]
        hu[k] += occupancy * (vessel_hu - hu[k])
    del vessel_occupancy

    count = int(rng.choice(len(NODULE_COUNT_WEIGHTS), p=NODULE_COUNT_WEIGHTS)) if n_nodules is None else n_nodules
    nodules_mm = place_nodules(rng, frame, lung, anatomy, vessels, count, regime)
    for nodule in nodules_mm:
        draw_nodule(rng, frame, hu, lung, nodule)

    calibrate(rng, hu, regime)
    add_noise(rng, hu, regime.noise_sd)
    blur = np.array(BLUR_SIGMA_IRC) * draw(rng, regime.blur_scale)
    ndimage.gaussian_filter(hu, tuple(blur), output=hu, truncate=2.5)
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

    nodules, positives = finish_nodules(rng, frame, geometry, stored_irc, nodules_mm)
    negatives = negative_candidates(rng, frame, lung, anatomy["boundary"], vessels, nodules_mm, geometry, stored_irc)
    candidates = positives + negatives
    order = rng.permutation(len(candidates))
    if flip_axes:
        hu_int = np.ascontiguousarray(np.flip(hu_int, axis=flip_axes))
        lung = np.ascontiguousarray(np.flip(lung, axis=flip_axes))
    return SyntheticSeries(hu_int, geometry, tuple(nodules), tuple(candidates[i] for i in order), lung)


def calibrate(rng: np.random.Generator, hu: np.ndarray, regime: Regime) -> None:
    """The regime's scanner calibration, in place: ``HU -> -1000 + gain * (HU + 1000) + offset`` (air stays
    near -1000 when the offset is small; soft tissue moves most). Nothing is drawn for the identity."""
    gain, offset = draw(rng, regime.hu_gain), draw(rng, regime.hu_offset)
    if gain == 1.0 and offset == 0.0:
        return
    for plane in hu:  # slice by slice: no full-size temporaries
        plane += 1000.0
        plane *= np.float32(gain)
        plane += np.float32(offset - 1000.0)


def add_noise(rng: np.random.Generator, hu: np.ndarray,
              sd_range: tuple[float, float] = DEFAULT.noise_sd) -> None:
    """Add white Gaussian noise (correlated later by the blur) to ``hu`` in place.

    Each slice takes a randomly shifted window of a small pool of noise slices:
    far cheaper than drawing one normal number per voxel, and no visible pattern.
    """
    n_slices, rows, cols = hu.shape
    sd = np.float32(rng.uniform(*sd_range))
    pool = rng.standard_normal((NOISE_POOL_SLICES, rows + NOISE_POOL_PAD, cols + NOISE_POOL_PAD),
                               dtype=np.float32) * sd
    picks = rng.integers(0, NOISE_POOL_SLICES, n_slices)
    shifts = rng.integers(0, NOISE_POOL_PAD + 1, (n_slices, 2))
    for k in range(n_slices):
        (dy, dx), sign = shifts[k], np.float32(1 if k % 2 else -1)
        hu[k] += sign * pool[picks[k], dy:dy + rows, dx:dx + cols]


def make_series_uid(rng: np.random.Generator) -> str:
    """A DICOM-looking LUNA16 series UID drawn from ``rng``."""
    digits = rng.integers(0, 10, UID_DIGITS)
    digits[0] = rng.integers(1, 10)
    return UID_PREFIX + "".join(str(d) for d in digits)


def series_rng(seed: int, index: int, regime: Regime = DEFAULT) -> np.random.Generator:
    """The generator of series ``index``: independent of how many series are made; another regime's series of
    the same seed are other patients (its name is mixed in), the default regime's are as they always were."""
    return np.random.default_rng([seed, index, *regime_key(regime)])


def regime_key(regime: Regime) -> tuple[int, ...]:
    """Extra seed words of a regime: none for the default one."""
    return () if regime.name == DEFAULT.name else tuple(regime.name.encode())


def series_flip(index: int) -> tuple[int, int, int] | None:
    """Every FLIP_EVERY-th series (index 3, 7, ...) is stored with flipped axes."""
    if index % FLIP_EVERY != FLIP_EVERY - 1:
        return None
    return FLIPPED_DIRECTIONS[(index // FLIP_EVERY) % len(FLIPPED_DIRECTIONS)]
