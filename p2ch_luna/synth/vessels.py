"""Vessel trees grown from each hilum: tapering segments that split until they leave the lung or are thinner
than a voxel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from p2ch_luna.synth.drawing import Frame, draw_tube, point_in_lung, random_unit, rotate_towards


@dataclass
class Vessels:
    starts: np.ndarray  # (n, 3) mm, segments inside the lungs
    ends: np.ndarray
    radii: np.ndarray
    junctions: np.ndarray  # (m, 3) mm


def grow_vessels(rng: np.random.Generator, frame: Frame, lung: np.ndarray, anatomy: dict,
                  occupancy: np.ndarray, radius_scale: float = 1.0) -> Vessels:
    """Grow and draw branching, tapering vessel trees from each hilum (root radius times ``radius_scale``)."""
    min_radius = max(0.35, 0.35 * float(frame.spacing[1]))
    z_extent = frame.shape[0] * frame.spacing[0]
    starts, ends, radii, junctions = [], [], [], []
    max_segments = int(np.clip(frame.shape[1] * frame.shape[2] / 100, 300, 2500))
    for side in anatomy["lungs"]:
        ax, ay = side["axes"]
        cx, cy = side["center"]
        lateral = np.sign(cx) if cx != 0 else 1.0
        hilum = np.array([z_extent * (side["base"] + 0.5 * (0.93 - side["base"])), cy, cx - lateral * 0.6 * ax])
        root_radius = float(np.clip(rng.uniform(3.0, 4.5) * radius_scale, 0.8, 0.16 * ax))
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
            end_inside = point_in_lung(frame, lung, end)
            middle_inside = point_in_lung(frame, lung, 0.5 * (start + end))
            if end_inside or middle_inside or point_in_lung(frame, lung, start):
                draw_tube(frame, occupancy, start, end, radius, end_radius)  # else clipped away anyway
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
                axis = random_unit(rng)
                children = ((rng.uniform(0.82, 0.95), axis), (rng.uniform(0.65, 0.82), -axis))
            else:
                children = ((rng.uniform(0.85, 0.95), random_unit(rng)),)
            for scale, turn in children:
                child = rotate_towards(direction, turn, np.deg2rad(rng.uniform(15, 40)))
                child = child + 0.25 * outward
                stack.append((end, child / np.linalg.norm(child), end_radius * scale, depth + 1))
    empty = np.zeros((0, 3))
    return Vessels(np.array(starts) if starts else empty, np.array(ends) if ends else empty,
                    np.array(radii), np.array(junctions) if junctions else empty)
