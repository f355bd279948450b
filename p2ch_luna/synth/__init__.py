"""Synthetic chest CTs in the LUNA16 format (``python -m p2ch_luna.synth``) and nodules implanted into real CTs
(:mod:`p2ch_luna.synth.implant`).

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

``--regime shifted`` draws every series from other ranges (slice thickness up to 3 mm, noise, blur, HU
calibration, vessel calibre, nodule mix), a test regime the default-trained models never see; ``--regime wide``
spans both, for domain randomisation (:mod:`p2ch_luna.synth.regime`).

All world coordinates are ``origin + direction @ (spacing * [col, row, index])``,
exactly what SimpleITK's ``TransformContinuousIndexToPhysicalPoint`` gives.

Modules: ``parameters`` (every number above), ``drawing``, ``anatomy``, ``vessels``, ``nodules``,
``candidates``, ``series`` (one series), ``writer`` (LUNA16 files) and ``generator`` (a dataset, the command).
"""

from __future__ import annotations

from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """The ``python -m p2ch_luna.synth`` command (imported on call, so importing the package stays light)."""
    from p2ch_luna.synth.generator import main as run

    return run(argv)
