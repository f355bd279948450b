"""Generator regimes: the ranges a synthetic series draws its scanner and patient from.

``default`` is the generator's own regime (the parameters of :mod:`p2ch_luna.synth.parameters`; the demo trains on
it). ``shifted`` is a test regime that training on ``default`` never sees: thicker slices (up to 3 mm), more
noise, a blurrier kernel, another HU calibration (gain and offset), darker vessels and denser nodules, thinner or
thicker vessel trees, smaller nodules, more ground glass and more nodules on the pleura and on vessels.
``wide`` is domain randomisation for training: every range spans ``default``'s and ``shifted``'s.

The draws that only a non-default regime makes (calibration, blur and vessel scales) are skipped when their range
is a single point, so ``default`` gives the same data byte for byte as before regimes existed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from p2ch_luna.errors import UsageError
from p2ch_luna.synth import parameters as p


@dataclasses.dataclass(frozen=True)
class Regime:
    """What one regime draws from: ranges ``(low, high)`` are uniform, tuples of weights are categorical."""

    name: str
    slice_spacings_mm: tuple[float, ...] = p.SLICE_SPACINGS_MM
    slice_spacing_weights: tuple[float, ...] = p.SLICE_SPACING_WEIGHTS
    noise_sd: tuple[float, float] = p.NOISE_SD_BEFORE_BLUR
    blur_scale: tuple[float, float] = (1.0, 1.0)
    """Factor on the partial-volume blur's sigma (the reconstruction kernel's sharpness)."""
    hu_gain: tuple[float, float] = (1.0, 1.0)
    """Calibration: HU become ``-1000 + gain * (HU + 1000) + offset`` before noise."""
    hu_offset: tuple[float, float] = (0.0, 0.0)
    vessel_hu: tuple[float, float] = p.HU_VESSEL
    vessel_radius_scale: tuple[float, float] = (1.0, 1.0)
    """Factor on the vessel trees' root radius (their calibre, and how far they branch)."""
    solid_hu: tuple[float, float] = p.HU_SOLID
    nodule_median_mm: float = p.NODULE_MEDIAN_MM
    ground_glass_fraction: float = p.GROUND_GLASS_FRACTION
    location_weights: tuple[float, ...] = p.NODULE_LOCATION_WEIGHTS
    """Weights of ``parameters.NODULE_LOCATIONS`` (isolated, pleural, juxtavascular)."""

    def __post_init__(self) -> None:
        for name, weights, count in (("slice_spacing_weights", self.slice_spacing_weights,
                                      len(self.slice_spacings_mm)),
                                     ("location_weights", self.location_weights, len(p.NODULE_LOCATIONS))):
            if len(weights) != count or not np.isclose(sum(weights), 1.0) or min(weights) < 0:
                raise ValueError(f"regime {self.name}: {name} must be {count} weights summing to 1")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "tuple[float, float]" and value[0] > value[1]:
                raise ValueError(f"regime {self.name}: {field.name} must be (low, high), not {value}")


def draw(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    """A uniform draw from ``bounds``; a single point is returned without touching ``rng`` (so adding such a
    range to a regime leaves the default regime's random stream, and its data, unchanged)."""
    low, high = bounds
    return float(low) if low == high else float(rng.uniform(low, high))


DEFAULT = Regime("default")

SHIFTED = Regime(
    "shifted",
    slice_spacings_mm=(1.0, 1.25, 2.0, 2.5, 3.0),
    slice_spacing_weights=(0.15, 0.2, 0.2, 0.2, 0.25),
    noise_sd=(45.0, 80.0),
    blur_scale=(1.15, 1.5),
    hu_gain=(0.93, 1.04),
    hu_offset=(-40.0, 25.0),
    vessel_hu=(15.0, 60.0),
    vessel_radius_scale=(0.75, 1.25),
    solid_hu=(-40.0, 80.0),
    nodule_median_mm=5.5,
    ground_glass_fraction=0.35,
    location_weights=(0.3, 0.35, 0.35),
)

WIDE = Regime(
    "wide",
    slice_spacings_mm=(0.7, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0),
    slice_spacing_weights=(0.08, 0.04, 0.13, 0.2, 0.1, 0.15, 0.15, 0.15),
    noise_sd=(20.0, 80.0),
    blur_scale=(0.85, 1.5),
    hu_gain=(0.93, 1.06),
    hu_offset=(-45.0, 30.0),
    vessel_hu=(10.0, 95.0),
    vessel_radius_scale=(0.7, 1.3),
    solid_hu=(-50.0, 90.0),
    nodule_median_mm=6.0,
    ground_glass_fraction=0.3,
    location_weights=(0.35, 0.33, 0.32),
)

REGIMES: dict[str, Regime] = {regime.name: regime for regime in (DEFAULT, SHIFTED, WIDE)}


def regime_named(name: str) -> Regime:
    """The regime called ``name``; a clear error for any other name."""
    try:
        return REGIMES[name]
    except KeyError:
        raise UsageError(f"unknown generator regime {name!r} (choose from {', '.join(REGIMES)})") from None
