"""What a synthetic series records about itself: its nodules (annotations, malignancy scores) and its
``candidates.csv`` rows."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SyntheticCandidate:
    center_xyz: tuple[float, float, float]
    is_nodule: bool
    kind: str  # "nodule" or one of NEGATIVE_KINDS


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
