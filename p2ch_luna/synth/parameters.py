"""The synthetic CTs' parameters: geometry, HU of each tissue, noise and blur, nodule, reader and candidate
distributions, and the LUNA16 CSV columns (the generative model is described in :mod:`p2ch_luna.synth`).
"""

from __future__ import annotations

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
HU_INT16_RANGE = (-3024, 3071)
"""What the written int16 HU are clipped to."""

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
