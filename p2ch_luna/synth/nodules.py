"""Nodules: size, kind (solid, ground glass), place (isolated, pleural, juxtavascular), margins (lobulated,
spiculated for malignant ones), drawing into the CT, and the simulated readers' malignancy scores.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from p2ch_luna.geometry import Geometry
from p2ch_luna.synth.drawing import (
    Frame,
    boundary_indices,
    draw_tube,
    in_lung,
    random_lung_points,
    random_unit,
    rotate_towards,
    triple,
)
from p2ch_luna.synth.parameters import (
    EDGE_MM,
    GROUND_GLASS_MIN_MM,
    HU_GROUND_GLASS,
    MALIGNANCY_MIDPOINT_MM,
    MALIGNANCY_SCALE_MM,
    MALIGNANT_SCORE,
    MALIGNANT_VOTES,
    NODULE_DIAMETER_MM,
    NODULE_GAP_MM,
    NODULE_LOCATIONS,
    NODULE_LOG_SD,
    PLACEMENT_TRIES,
    READER_COUNT_WEIGHTS,
    READER_COUNTS,
    SCORE_MEAN,
    SCORE_SD,
)
from p2ch_luna.synth.records import SyntheticCandidate, SyntheticNodule
from p2ch_luna.synth.regime import DEFAULT, Regime
from p2ch_luna.synth.vessels import Vessels

log = logging.getLogger(__name__)


@dataclass
class NoduleDraft:
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


def ball_fraction_in_lung(frame: Frame, lung: np.ndarray, center: np.ndarray, radius: float) -> float:
    """Fraction of the ball's voxels inside the lungs; 0 for a ball cut by the volume border."""
    lo = np.floor(frame.to_irc(center - radius)).astype(int)
    hi = np.ceil(frame.to_irc(center + radius)).astype(int) + 1
    if np.any(lo < 0) or np.any(hi > np.array(frame.shape)):
        return 0.0
    z, y, x = frame.axes_mm(lo, hi)
    ball = ((z - center[0]) ** 2 + (y - center[1]) ** 2 + (x - center[2]) ** 2) <= radius ** 2
    total = int(ball.sum())
    if total == 0:
        return float(in_lung(frame, lung, center)[0])
    inside = lung[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] & ball
    return float(inside.sum()) / total


def place_nodules(rng: np.random.Generator, frame: Frame, lung: np.ndarray, anatomy: dict,
                   vessels: Vessels, count: int, regime: Regime = DEFAULT) -> list[NoduleDraft]:
    anatomy["boundary"] = boundary_indices(lung)
    placed: list[NoduleDraft] = []
    usable_vessels = np.flatnonzero((vessels.radii > 0.6) & (vessels.radii < 3.5))
    for _ in range(count):
        diameter = float(np.clip(rng.lognormal(np.log(regime.nodule_median_mm), NODULE_LOG_SD), *NODULE_DIAMETER_MM))
        location = str(rng.choice(NODULE_LOCATIONS, p=regime.location_weights))
        center = None
        while center is None and diameter >= NODULE_DIAMETER_MM[0]:
            center = find_nodule_center(rng, frame, lung, anatomy, vessels, usable_vessels, placed,
                                         diameter / 2, location)
            if center is None:
                diameter *= 0.8
        if center is None:
            log.debug("dropped a nodule that does not fit the lungs")
            continue
        placed.append(nodule_draft(rng, center, diameter, location, regime))
    return placed


def find_nodule_center(rng: np.random.Generator, frame: Frame, lung: np.ndarray, anatomy: dict,
                        vessels: Vessels, usable_vessels: np.ndarray, placed: list[NoduleDraft],
                        radius: float, location: str) -> np.ndarray | None:
    boundary = anatomy["boundary"]
    for _ in range(PLACEMENT_TRIES):
        if location == "pleural" and len(boundary):
            wall = frame.to_mm(np.array(np.unravel_index(rng.choice(boundary), frame.shape), float))
            side = min(anatomy["lungs"], key=lambda s: abs(s["center"][0] - wall[2]))
            inward = np.array([0.0, side["center"][1] - wall[1], side["center"][0] - wall[2]])
            inward /= max(np.linalg.norm(inward), 1e-6)
            center = wall + inward * radius * rng.uniform(0.5, 0.9)
            ok = 0.55 <= ball_fraction_in_lung(frame, lung, center, radius) <= 0.97
        elif location == "juxtavascular" and len(usable_vessels):
            i = rng.choice(usable_vessels)
            axis = vessels.ends[i] - vessels.starts[i]
            axis /= max(np.linalg.norm(axis), 1e-6)
            perpendicular = rotate_towards(axis, random_unit(rng), np.pi / 2)
            point = vessels.starts[i] + rng.uniform(0.2, 0.8) * (vessels.ends[i] - vessels.starts[i])
            center = point + perpendicular * (vessels.radii[i] + radius * rng.uniform(0.6, 0.9))
            ok = ball_fraction_in_lung(frame, lung, center, radius + 0.5) >= 0.97
        else:
            points = random_lung_points(rng, frame, lung, 1)
            if not len(points):
                return None
            center = points[0]
            ok = ball_fraction_in_lung(frame, lung, center, radius + 1.0) >= 0.999
        ok = ok and bool(in_lung(frame, lung, center)[0]) and all(
            np.linalg.norm(center - other.center_mm) > radius + other.diameter_mm / 2 + NODULE_GAP_MM
            for other in placed)
        if ok:
            return center
    return None


def nodule_draft(rng: np.random.Generator, center: np.ndarray, diameter: float, location: str,
                 regime: Regime = DEFAULT) -> NoduleDraft:
    malignant = bool(rng.random() < 1 / (1 + np.exp(-(diameter - MALIGNANCY_MIDPOINT_MM) / MALIGNANCY_SCALE_MM)))
    ground_glass = diameter >= GROUND_GLASS_MIN_MM and rng.random() < regime.ground_glass_fraction
    if malignant:
        lobulation = rng.uniform(0.12, 0.28)
        spicules = 0 if rng.random() < 0.3 else int(rng.integers(4, 11))
    else:
        lobulation = rng.uniform(0.0, 0.07)
        spicules = int(rng.integers(1, 4)) if rng.random() < 0.1 else 0
    lobes = int(rng.integers(2, 5))
    weights = rng.uniform(0.3, 1.0, lobes)
    hu_range = HU_GROUND_GLASS if ground_glass else regime.solid_hu
    return NoduleDraft(
        center_mm=center, diameter_mm=diameter, texture="ground_glass" if ground_glass else "solid",
        location=location, latent_malignant=malignant, lobulation=float(lobulation),
        lobe_axes=np.array([random_unit(rng) for _ in range(lobes)]), lobe_weights=weights / weights.sum(),
        lobe_orders=rng.integers(3, 6, lobes), spicule_dirs=np.array([random_unit(rng) for _ in range(spicules)]),
        spicule_lengths=rng.uniform(0.5, 1.3, spicules) * diameter / 2 + 1.0, hu=float(rng.uniform(*hu_range)))

CHEBYSHEV = {3: (0, -3, 0, 4), 4: (1, 0, -8, 0, 8), 5: (0, 5, 0, -20, 0, 16)}


def draw_nodule(rng: np.random.Generator, frame: Frame, hu: np.ndarray, lung: np.ndarray,
                 nodule: NoduleDraft) -> None:
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
        bumps += np.float32(weight) * np.polynomial.polynomial.polyval(cosine, CHEBYSHEV[int(order)])
    surface = radius * (1 + nodule.lobulation * bumps)
    occupancy = np.clip((surface - dist) / EDGE_MM + 0.5, 0, 1).astype(np.float32)
    region_lung = lung[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    if len(nodule.spicule_lengths):
        spikes = np.zeros(occupancy.shape, dtype=np.float32)
        local = Frame(occupancy.shape, frame.spacing, frame.to_mm(lo))
        base_radius = max(0.45, 0.15 * radius)
        for direction, length in zip(nodule.spicule_dirs, nodule.spicule_lengths):
            start = nodule.center_mm + direction * radius * 0.8
            draw_tube(local, spikes, start, start + direction * length, base_radius, 0.2)
        np.maximum(occupancy, spikes * region_lung, out=occupancy)
    region = hu[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    values = np.float32(nodule.hu)
    if nodule.texture == "ground_glass":
        values = values + rng.standard_normal(occupancy.shape, dtype=np.float32) * np.float32(40)
    region += occupancy * (values - region)


def finish_nodules(rng: np.random.Generator, frame: Frame, geometry: Geometry, stored_irc,
                    drafts: list[NoduleDraft]) -> tuple[list[SyntheticNodule], list[SyntheticCandidate]]:
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
            center_xyz=triple(xyz), center_irc=triple(irc), diameter_mm=round(draft.diameter_mm, 6),
            texture=draft.texture, location=draft.location, lobulation=draft.lobulation,
            spicules=len(draft.spicule_lengths), malignancy_scores=scores,
            is_malignant=sum(s >= MALIGNANT_SCORE for s in scores) >= MALIGNANT_VOTES,
            bbox_low_xyz=triple(geometry.irc_to_xyz(low)), bbox_high_xyz=triple(geometry.irc_to_xyz(high))))
        jitter_sd = min(1.5, draft.diameter_mm / 6)
        for _ in range(1 + rng.binomial(2, 0.3)):
            point = draft.center_mm + rng.normal(0, jitter_sd, 3)
            positives.append(SyntheticCandidate(triple(geometry.irc_to_xyz(stored_irc(point))), True, "nodule"))
    return nodules, positives
