"""Known truth on real anatomy: synthetic nodules implanted into the lungs of a real CT.

A CT of one's own (a DICOM folder, a NIfTI file, a LUNA16 ``.mhd``) has no
annotations to score a model against, and our synthetic CTs are not real
anatomy. ``python -m p2ch_luna.implant CT OUT_DIR --diameters 6 10 16`` puts
spheres of soft tissue into the lungs of ``CT`` and adds the result to
``OUT_DIR`` as one LUNA16-format series (``subset0/<uid>.mhd/.raw``) whose
``annotations.csv`` rows are the implanted nodules, so that

    python -m p2ch_luna.diagnose --data-root OUT_DIR --series-uid UID

scores a model (the LUNA16 FROC/CPM, the book's confusion table) on real
lungs, vessels and noise with a known answer. A model that misses an isolated
sphere, or finds it off centre, has a problem that real annotated data would
show too: wrong HU, a transposed or flipped axis, a chunk cut in the wrong place.

Each nodule:

* ``isolated`` (the default ``--placement``): sits where the lungs hold only
  parenchyma (below ``PARENCHYMA_MAX_HU``) for its radius plus a clearance
  (``--clearance``, 5 mm) around its centre: no vessel, airway wall, fissure or
  pleura touches it. Real lungs leave room for about 15 mm nodules so (the CPTAC
  CT: 16.5 mm); ``--clearance 0`` lets larger ones touch the vessels around them;
* ``pleural``: sits on the lung's edge, its centre ``PLEURAL_DEPTH`` (0.4-0.7) of
  its radius inside the lung, so the rest lies in the chest wall, mediastinum
  or diaphragm, with no vessel within its radius plus the clearance. These are
  the juxtapleural nodules that a lung mask must not cut off;
* ``vascular``: its centre lies ``VESSEL_DISTANCE`` (0.5-0.9) of its radius from a
  vessel, so it engulfs part of the vessel, and its radius plus the clearance
  inside the lung's edge. A grouping that merges a nodule with the vessels it
  touches puts the candidate off the nodule;
* is at least ``SEPARATION_MM`` (edge to edge) from the other implanted ones;
* is a sphere with partial-volume edges (the fraction of each voxel inside it,
  ``SUPERSAMPLING`` points per axis), raised from the parenchyma it replaces to
  ``--hu``, one for all or one per nodule (40 HU: solid; -750 to -300: ground
  glass). The CT's own noise stays on top of it; denser tissue inside the
  sphere only rises towards ``--hu``.

The site is drawn by ``--seed`` among the voxels that qualify, largest nodule
first. The new series gets a UID of its own (``2.25.<uuid5>``, derived from the
source series and every argument), so it never shadows
the source CT in a cache or a dataset; ``annotations.csv`` and ``candidates.csv``
(or the ``candidates_V2.csv`` that training reads first, where the folder has one)
rows of that UID are replaced when the same implant is written again, and rows
of other series are kept, so one folder can collect several CTs.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from p2ch_luna.cli import make_parser, run_command
from p2ch_luna.columns import XYZ_COLUMNS
from p2ch_luna.data.luna import (
    ANNOTATIONS_FILE,
    CANDIDATES_FILES,
    find_candidates_file,
    read_annotations,
    read_csv_checked,
)
from p2ch_luna.diagnose import distance
from p2ch_luna.diagnose.lungs import find_lungs, mask_bounding_box
from p2ch_luna.errors import DataError, UsageError
from p2ch_luna.io.atomic import atomic_write_text
from p2ch_luna.io.ct import Ct, load_ct, write_metaimage

log = logging.getLogger(__name__)

MIN_NODULE_HU = -800.0
"""The least density ``--hu`` accepts: a nodule must be denser than aerated lung."""
PARENCHYMA_MAX_HU = -500
"""Denser voxels (vessels, airway walls, pleura, nodules already there) are kept clear of."""
DEFAULT_CLEARANCE_MM = 5.0
"""Parenchyma between a nodule's surface and the nearest denser voxel or the lung's edge."""
PLACEMENTS = ("isolated", "pleural", "vascular")
PLEURAL_DEPTH = (0.4, 0.7)
"""A pleural nodule's centre lies between these fractions of its radius inside the lung's edge."""
VESSEL_DISTANCE = (0.5, 0.9)
"""A vascular nodule's centre lies between these fractions of its radius from the nearest vessel voxel."""
RIM_MM = 3.0
"""Dense voxels this close to the lung's edge are pleura and chest wall, not vessels (pleural and vascular)."""
SEPARATION_MM = 20.0
"""Least distance between the surfaces of two implanted nodules."""
SUPERSAMPLING = 4
"""Sample points per voxel axis for the partial-volume fraction of the sphere's edge."""
DEFAULT_DIAMETERS_MM = (6.0, 10.0, 16.0)
DEFAULT_NODULE_HU = 40.0
UID_ROOT = "2.25."
"""The DICOM root for UIDs made from a UUID (PS3.5 B.2)."""


@dataclass(frozen=True)
class ImplantedNodule:
    """One implanted nodule: its centre voxel and world position, size, placement and density."""

    center_irc: tuple[int, int, int]
    center_xyz: tuple[float, float, float]
    diameter_mm: float
    placement: str = "isolated"
    hu: float = DEFAULT_NODULE_HU


class Room:
    """Where nodules fit in the lungs of one CT: distance maps (mm) over the lungs' bounding box.

    ``lung_labels`` are :func:`~p2ch_luna.diagnose.lungs.find_lungs`' labels. The maps are computed
    when first needed: an isolated nodule needs ``parenchyma_clearance``, a pleural or
    vascular one ``wall_depth`` and ``vessel_clearance``.
    """

    def __init__(self, hu: np.ndarray, lung_labels: np.ndarray, spacing_irc: Sequence[float]) -> None:
        self.spacing = np.asarray(spacing_irc, dtype=np.float64)
        lung = lung_labels > 0
        self.box = mask_bounding_box(lung, (1, 1, 1))
        if self.box is None:
            raise ValueError("the lung mask is empty")
        self.lung = lung[self.box]
        self.hu = hu[self.box]

    @functools.cached_property
    def parenchyma_clearance(self) -> np.ndarray:
        """From each lung voxel below ``PARENCHYMA_MAX_HU`` to the nearest voxel that is not (0 elsewhere)."""
        return distance.depth_mm(self.lung & (self.hu < PARENCHYMA_MAX_HU), self.spacing)

    @functools.cached_property
    def wall_depth(self) -> np.ndarray:
        """From each lung voxel to the nearest voxel outside the lungs (0 outside)."""
        return distance.depth_mm(self.lung, self.spacing)

    @functools.cached_property
    def vessel_clearance(self) -> np.ndarray:
        """From each voxel to the nearest dense lung voxel deeper than ``RIM_MM`` (vessels, airway walls).

        Pleural and vascular placements use it."""
        vessels = self.lung & (self.hu >= PARENCHYMA_MAX_HU) & (self.wall_depth > RIM_MM)
        if not vessels.any():
            return np.full(self.lung.shape, np.inf)
        return distance.depth_mm(~vessels, self.spacing)

    def sites(self, diameter_mm: float, placement: str, margin_mm: float) -> np.ndarray:
        """Voxels ``(N, 3)`` of the whole CT where a nodule of ``diameter_mm`` may be centred.

        ``"isolated"``: parenchyma all around, for the radius plus ``margin_mm``.
        ``"pleural"``: the centre lies ``PLEURAL_DEPTH`` of the radius inside the lung's edge,
        so the rest of the nodule sits in the wall, with no vessel within the radius plus ``margin_mm``.
        ``"vascular"``: the centre lies ``VESSEL_DISTANCE`` of the radius from a vessel, so the
        nodule engulfs part of it, and the radius plus ``margin_mm`` inside the lung's edge.
        """
        radius = diameter_mm / 2.0
        if placement == "isolated":
            fits = self.parenchyma_clearance >= radius + margin_mm
        elif placement == "pleural":
            low, high = PLEURAL_DEPTH
            fits = ((self.wall_depth >= low * radius) & (self.wall_depth <= high * radius)
                    & (self.vessel_clearance >= radius + margin_mm))
        elif placement == "vascular":
            low, high = VESSEL_DISTANCE
            fits = ((self.vessel_clearance >= low * radius) & (self.vessel_clearance <= high * radius)
                    & (self.wall_depth >= radius + margin_mm))
        else:
            raise ValueError(f"placement must be one of {PLACEMENTS}, not {placement!r}")
        return np.argwhere(fits) + [s.start for s in self.box]

    def no_room(self, diameter_mm: float, placement: str, margin_mm: float) -> DataError:
        """The error for a nodule that does not fit, saying what would."""
        radius = diameter_mm / 2.0
        if placement == "isolated":
            largest = max(2.0 * (float(self.parenchyma_clearance.max(initial=0.0)) - margin_mm), 0.0)
            return DataError(f"no room in the lungs for a {diameter_mm:g} mm nodule: no parenchyma "
                             f"{radius + margin_mm:g} mm from every vessel, wall and implanted nodule (alone, "
                             f"at most {largest:.1f} mm fits with --clearance {margin_mm:g}; give smaller "
                             "or fewer --diameters or a smaller --clearance)")
        if placement == "pleural":
            return DataError(f"no room on the pleura for a {diameter_mm:g} mm nodule: no lung edge with "
                             f"parenchyma {radius + margin_mm:g} mm clear of vessels and implanted nodules (give "
                             "smaller or fewer --diameters or a smaller --clearance)")
        return DataError(f"no room on a vessel for a {diameter_mm:g} mm nodule: no vessel {radius + margin_mm:g} mm "
                         "inside the lung's edge and clear of implanted nodules (give smaller or fewer --diameters "
                         "or a smaller --clearance)")


def choose_sites(room: Room, diameters_mm: Sequence[float], placements: Sequence[str], rng: np.random.Generator,
                 margin_mm: float = DEFAULT_CLEARANCE_MM) -> list[tuple[int, int, int]]:
    """A voxel per diameter (in the order given) with room for the nodule; drawn largest first.

    A site is one of ``room.sites`` for its diameter and placement, and lies
    ``SEPARATION_MM`` beyond the surface of every nodule placed before it.
    """
    sites: dict[int, tuple[int, int, int]] = {}
    for position in sorted(range(len(diameters_mm)), key=lambda k: -diameters_mm[k]):
        radius = diameters_mm[position] / 2.0
        candidates = room.sites(diameters_mm[position], placements[position], margin_mm)
        for other, site in sites.items():
            gap = np.linalg.norm((candidates - site) * room.spacing, axis=1) - radius - diameters_mm[other] / 2.0
            candidates = candidates[gap >= SEPARATION_MM]
        if len(candidates) == 0:
            raise room.no_room(diameters_mm[position], placements[position], margin_mm)
        sites[position] = tuple(int(v) for v in candidates[rng.integers(len(candidates))])
    return [sites[position] for position in range(len(diameters_mm))]


def sphere_fraction(center_irc: Sequence[float], radius_mm: float, spacing_irc: Sequence[float],
                    shape_irc: Sequence[int]) -> tuple[tuple[slice, slice, slice], np.ndarray]:
    """The box around a sphere and the fraction (0..1, float32) of each of its voxels inside the sphere.

    The fraction counts ``SUPERSAMPLING`` ** 3 evenly spaced points per voxel. The box is
    clipped to ``shape_irc``.
    """
    spacing = np.asarray(spacing_irc, dtype=np.float64)
    offsets = (np.arange(SUPERSAMPLING) + 0.5) / SUPERSAMPLING - 0.5
    box, squared = [], []
    for axis in range(3):
        reach = int(np.ceil(radius_mm / spacing[axis])) + 1
        start = max(int(np.floor(center_irc[axis])) - reach, 0)
        stop = min(int(np.ceil(center_irc[axis])) + reach + 1, int(shape_irc[axis]))
        box.append(slice(start, stop))
        points = (np.arange(start, stop)[:, None] + offsets[None, :] - center_irc[axis]) * spacing[axis]
        squared.append(points**2)  # (voxels, samples) along this axis
    in_plane = squared[1][:, None, :, None] + squared[2][None, :, None, :]  # (rows, cols, samples, samples)
    inside = np.zeros(in_plane.shape[:2], dtype=np.int64)[None].repeat(len(squared[0]), axis=0)
    for sample in range(SUPERSAMPLING):  # one sample plane of the index axis at a time bounds the memory
        total = squared[0][:, sample, None, None, None, None] + in_plane[None]
        inside += np.count_nonzero(total <= radius_mm**2, axis=(3, 4))
    return tuple(box), (inside / SUPERSAMPLING**3).astype(np.float32)


def implant_sphere(hu: np.ndarray, center_irc: Sequence[float], radius_mm: float, spacing_irc: Sequence[float],
                   nodule_hu: float) -> None:
    """Raise a partial-volume sphere of ``hu`` (int16, in place) to ``nodule_hu``.

    A parenchyma voxel (below ``PARENCHYMA_MAX_HU``) moves by its fraction inside the
    sphere times the difference between ``nodule_hu`` and the mean of the parenchyma the
    sphere replaces, so the CT's noise stays. A denser voxel (the chest wall of a pleural
    nodule, a rib) rises towards ``nodule_hu`` by its fraction, and never falls.
    """
    box, fraction = sphere_fraction(center_irc, radius_mm, spacing_irc, hu.shape)
    region = hu[box].astype(np.float64)
    parenchyma = region < PARENCHYMA_MAX_HU
    weights = fraction * parenchyma
    replaced = float(np.average(region, weights=weights)) if weights.any() else nodule_hu
    raised = np.where(parenchyma, region + fraction * (nodule_hu - replaced),
                      region + fraction * np.maximum(nodule_hu - region, 0.0))
    info = np.iinfo(np.int16)
    hu[box] = np.clip(np.rint(raised), info.min, info.max).astype(np.int16)


def implanted_uid(source_uid: str, diameters_mm: Sequence[float], placements: Sequence[str],
                  densities_hu: Sequence[float], seed: int, clearance_mm: float) -> str:
    """A DICOM UID for the implanted series, the same for the same source and arguments."""
    nodules = ",".join(f"{d:g} {p} {h:g}" for d, p, h in zip(diameters_mm, placements, densities_hu))
    name = f"p2ch_luna.implant|{source_uid}|{nodules}|{seed}|{clearance_mm:g}"
    return UID_ROOT + str(uuid.uuid5(uuid.NAMESPACE_OID, name).int)


def _one_per_nodule(values: Sequence, count: int, flag: str) -> list:
    """``values`` for each of ``count`` nodules: one value for all, or one each."""
    values = list(values)
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise UsageError(f"{flag} needs one value or one per diameter ({count}), got {len(values)}")
    return values


def nodule_arguments(diameters_mm: Sequence[float], nodule_hu: float | Sequence[float], clearance_mm: float,
                     placements: Sequence[str]) -> tuple[list[str], list[float]]:
    """Each nodule's placement and density, after checking every argument (``UsageError`` naming the flag)."""
    if not diameters_mm:
        raise UsageError("--diameters needs at least one diameter")
    bad = [d for d in diameters_mm if not (np.isfinite(d) and d > 0)]
    if bad:
        raise UsageError(f"--diameters must be positive numbers of mm (got {bad[0]:g})")
    placements = _one_per_nodule(placements, len(diameters_mm), "--placement")
    unknown = [p for p in placements if p not in PLACEMENTS]
    if unknown:
        raise UsageError(f"--placement must be one of {', '.join(PLACEMENTS)} (got {unknown[0]!r})")
    densities = _one_per_nodule(np.atleast_1d(np.asarray(nodule_hu, dtype=np.float64)), len(diameters_mm), "--hu")
    faint = [h for h in densities if not (np.isfinite(h) and h > MIN_NODULE_HU)]
    if faint:
        raise UsageError(f"--hu must be above {MIN_NODULE_HU:g} HU, denser than aerated lung (got {faint[0]:g})")
    if not (np.isfinite(clearance_mm) and clearance_mm >= 0):
        raise UsageError(f"--clearance must be >= 0 mm (got {clearance_mm:g})")
    return placements, [float(h) for h in densities]


def implant_nodules(ct: Ct, diameters_mm: Sequence[float], nodule_hu: float | Sequence[float] = DEFAULT_NODULE_HU,
                    seed: int = 0, clearance_mm: float = DEFAULT_CLEARANCE_MM,
                    placements: Sequence[str] = ("isolated",)) -> tuple[Ct, list[ImplantedNodule]]:
    """A copy of ``ct`` with a nodule of each diameter implanted in its lungs, and where they are.

    ``placements`` (see :meth:`Room.sites`) and ``nodule_hu`` give each nodule's, or one for all.
    """
    placements, densities = nodule_arguments(diameters_mm, nodule_hu, clearance_mm, placements)
    spacing = tuple(float(v) for v in ct.geometry.spacing_irc)
    log.info("finding the lungs of %s (%d x %d x %d voxels)", ct.series_uid, *ct.shape)
    lungs = find_lungs(ct.hu, spacing)
    if lungs.count == 0:
        raise DataError(f"CT {ct.source or ct.series_uid}: no lungs found to implant nodules into")
    log.info("lungs: %.0f ml; measuring where %d nodule(s) fit", lungs.volume_ml, len(diameters_mm))
    room = Room(ct.hu, lungs.labels, spacing)
    sites = choose_sites(room, diameters_mm, placements, np.random.default_rng(seed), clearance_mm)
    hu = ct.hu.copy()
    nodules = []
    for site, diameter, placement, density in zip(sites, diameters_mm, placements, densities):
        implant_sphere(hu, site, diameter / 2.0, spacing, density)
        center_xyz = tuple(float(v) for v in ct.geometry.irc_to_xyz(site))
        nodules.append(ImplantedNodule(center_irc=site, center_xyz=center_xyz, diameter_mm=float(diameter),
                                       placement=placement, hu=density))
    uid = implanted_uid(ct.series_uid, diameters_mm, placements, densities, seed, clearance_mm)
    return Ct(hu=hu, geometry=ct.geometry, series_uid=uid, source=ct.source), nodules


def write_implanted(out_dir: Path, ct: Ct, nodules: Sequence[ImplantedNodule],
                    source_nodules: pd.DataFrame | None = None) -> Path:
    """Add ``ct`` to the LUNA16-format folder ``out_dir``: its ``.mhd``/``.raw`` and its CSV rows.

    ``source_nodules`` (``center_x/y/z, diameter_mm``: the source CT's own annotated nodules)
    are annotations of the new series too. Returns the ``.mhd`` path. Rows of the same series
    UID already in the CSVs are replaced.
    """
    path = out_dir / "subset0" / f"{ct.series_uid}.mhd"
    write_metaimage(np.asarray(ct.hu), ct.geometry, path)
    rows = [[ct.series_uid, *n.center_xyz, n.diameter_mm] for n in nodules]
    if source_nodules is not None:
        rows += [[ct.series_uid, *row] for row in
                 source_nodules[["center_x", "center_y", "center_z", "diameter_mm"]].itertuples(index=False)]
    rows = pd.DataFrame(rows, columns=["seriesuid", *XYZ_COLUMNS, "diameter_mm"])
    _replace_rows(out_dir / ANNOTATIONS_FILE, rows, "annotations")
    candidates = rows.drop(columns="diameter_mm").assign(**{"class": 1})
    _replace_rows(_candidates_file(out_dir), candidates, "candidates", integer_columns=["class"])
    return path


def _candidates_file(out_dir: Path) -> Path:
    """The candidates file training reads in ``out_dir`` (LUNA16's ``candidates_V2.csv`` first), else a new one."""
    try:
        return find_candidates_file(out_dir)
    except DataError:
        return out_dir / CANDIDATES_FILES[-1]


def _replace_rows(path: Path, rows: pd.DataFrame, what: str, integer_columns: Sequence[str] = ()) -> None:
    """Write ``rows`` to the CSV ``path`` in place of the rows of their series; other rows are kept."""
    columns = list(rows.columns)
    numeric = [column for column in columns if column != "seriesuid"]
    if path.is_file():
        existing = read_csv_checked(path, columns, numeric, what=what)
        kept = existing[~existing["seriesuid"].isin(rows["seriesuid"])]
        rows = pd.concat([kept, rows], ignore_index=True)
    rows = rows.astype({column: np.int64 for column in integer_columns})
    atomic_write_text(path, rows.to_csv(index=False, lineterminator="\n"))


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("python -m p2ch_luna.implant",
                         "Implant spherical nodules into the lungs of a real CT and add it, with the nodules "
                         "as annotations, to a LUNA16-format folder: a known answer on real anatomy for "
                         "diagnose and evaluate.", paths=False)
    parser.add_argument("ct", type=Path, help="the CT: a .mhd/.mha file, a NIfTI file or a DICOM series folder")
    parser.add_argument("out_dir", type=Path,
                        help="LUNA16-format folder to add the series to (created if needed; other series' "
                             "rows in its CSVs are kept)")
    parser.add_argument("--diameters", type=float, nargs="+", default=list(DEFAULT_DIAMETERS_MM), metavar="MM",
                        help="diameter of each nodule to implant, in mm")
    parser.add_argument("--hu", type=float, nargs="+", default=[DEFAULT_NODULE_HU],
                        help="density of the nodules in HU, one for all or one per diameter (40: solid; "
                             "-750 to -300: ground glass)")
    parser.add_argument("--placement", nargs="+", choices=PLACEMENTS, default=["isolated"],
                        help="where each nodule goes, one for all or one per diameter: isolated (parenchyma all "
                             "around it), pleural (on the lung's edge, partly in the chest wall, mediastinum or "
                             "diaphragm) or vascular (engulfing part of a vessel)")
    parser.add_argument("--clearance", type=float, default=DEFAULT_CLEARANCE_MM, metavar="MM",
                        help="parenchyma kept between each nodule's surface and any vessel, airway wall or the "
                             "lung's edge, in mm")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sites' draw")
    parser.add_argument("--annotations", type=Path, default=None, metavar="CSV",
                        help="LUNA16 annotations.csv holding the source CT's own nodules (by its series UID, the "
                             ".mhd's name): they become annotations of the new series too, not false positives")
    parser.add_argument("--series-uid", default=None,
                        help="the series to read when the DICOM folder holds several")
    return parser


def _body(args: argparse.Namespace) -> int:
    nodule_arguments(args.diameters, args.hu, args.clearance, args.placement)  # before the CT is read
    ct = load_ct(args.ct, args.series_uid)
    source_nodules = None
    if args.annotations is not None:
        table = read_annotations(args.annotations)
        source_nodules = table[table["series_uid"] == ct.series_uid]
        if source_nodules.empty:
            log.warning("%s has no rows of series %s: its nodules, if any, will count as false positives",
                        args.annotations, ct.series_uid)
    implanted, nodules = implant_nodules(ct, args.diameters, args.hu, args.seed, args.clearance, args.placement)
    path = write_implanted(args.out_dir, implanted, nodules, source_nodules)
    log.info("implanted %d nodule(s) into %s; wrote %s", len(nodules), ct.series_uid, path)
    for nodule in nodules:
        x, y, z = nodule.center_xyz
        print(f"{nodule.diameter_mm:g} mm {nodule.placement} nodule of {nodule.hu:g} HU at "
              f"({x:.1f}, {y:.1f}, {z:.1f}) mm, voxel {nodule.center_irc}")
    if source_nodules is not None and len(source_nodules):
        print(f"{len(source_nodules)} annotated nodule(s) of the source CT kept as annotations")
    print(f"series {implanted.series_uid} in {args.out_dir}; score a model on it with:\n"
          f"  python -m p2ch_luna.diagnose --data-root {args.out_dir} --series-uid {implanted.series_uid}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_body, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
