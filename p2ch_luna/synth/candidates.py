"""``candidates.csv`` rows of one series: jittered class-1 points per nodule and class-0 points on vessels,
junctions, vessel entries, the chest wall and random lung points (none near a nodule).
"""

from __future__ import annotations

import numpy as np

from p2ch_luna.geometry import Geometry
from p2ch_luna.synth.drawing import Frame, in_lung, random_lung_points, triple
from p2ch_luna.synth.nodules import NoduleDraft
from p2ch_luna.synth.parameters import (
    NEGATIVE_KINDS,
    NEGATIVE_NODULE_CLEARANCE_MM,
    NEGATIVE_WEIGHTS,
    NEGATIVES_PER_SERIES,
)
from p2ch_luna.synth.records import SyntheticCandidate
from p2ch_luna.synth.vessels import Vessels


def negative_candidates(rng: np.random.Generator, frame: Frame, lung: np.ndarray, boundary: np.ndarray,
                         vessels: Vessels, nodules: list[NoduleDraft], geometry: Geometry,
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
            entering = ~in_lung(frame, lung, vessels.starts)
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
            points = random_lung_points(rng, frame, lung, count)
        groups.append((kind, points.reshape(-1, 3)))
    candidates = []
    for kind, points in groups:
        keep = np.ones(len(points), dtype=bool)
        for nodule in nodules:
            clearance = nodule.diameter_mm / 2 * (1 + nodule.lobulation) + NEGATIVE_NODULE_CLEARANCE_MM
            keep &= np.linalg.norm(points - nodule.center_mm, axis=1) > clearance
        irc = np.clip(frame.to_irc(points[keep]), 0, np.array(frame.shape) - 1)
        xyz = geometry.irc_to_xyz(stored_irc(frame.to_mm(irc))) if len(irc) else np.zeros((0, 3))
        candidates.extend(SyntheticCandidate(triple(p), False, kind) for p in np.atleast_2d(xyz))
    return candidates


