"""Test sets that training never saw, and quiet diagnoses of them (the demo's last stage and
``bench/bench_generalisation.py``).

- ``shifted``: synthetic series of the generator's ``shifted`` regime (:mod:`p2ch_luna.synth.regime`): other
  slice thickness, noise, blur, HU calibration, vessel calibre and nodule mix than the training data's;
- ``implanted``: copies of a real CT with nodules implanted into its lungs (:mod:`p2ch_luna.synth.implant`,
  one seed per copy): real anatomy with a known answer;
- ``real CT``: the real CT itself, without annotations: how many findings a real scan gets.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Sequence

from p2ch_luna import diagnose
from p2ch_luna.errors import LunaError
from p2ch_luna.synth import implant
from p2ch_luna.synth.generator import generate_dataset
from p2ch_luna.synth.regime import SHIFTED, Regime

IMPLANT_DIAMETERS_MM = ("6", "10", "14")
IMPLANT_PLACEMENTS = ("isolated", "pleural", "vascular")
"""Each implanted copy gets one nodule of each diameter, one per placement."""


def make_shifted_set(out_dir: Path, series: int, seed: int, shape: tuple[int, int], slices: tuple[int, int],
                     regime: Regime = SHIFTED) -> Path:
    """Write ``series`` synthetic series of ``regime`` to ``out_dir`` (replacing what is there); returns it."""
    generate_dataset(out_dir, series=series, seed=seed, shape=shape, slices=slices, overwrite=True,
                     progress=False, regime=regime)
    return out_dir


def make_implanted_set(ct: Path, out_dir: Path, copies: int) -> Path:
    """Write ``copies`` copies of the CT at ``ct`` to ``out_dir`` as LUNA16 series, copy ``k`` with nodules of
    :data:`IMPLANT_DIAMETERS_MM` at :data:`IMPLANT_PLACEMENTS` drawn with seed ``k``; returns ``out_dir``."""
    for seed in range(1, copies + 1):
        with contextlib.redirect_stdout(io.StringIO()):
            code = implant.main([str(ct), str(out_dir), "--diameters", *IMPLANT_DIAMETERS_MM,
                                 "--placement", *IMPLANT_PLACEMENTS, "--seed", str(seed), "--log-level", "WARNING"])
        if code != 0:
            raise LunaError(f"implanting nodules into {ct} failed (exit code {code})")
    return out_dir


def diagnose_quietly(arguments: Sequence[str], output: Path) -> Path:
    """Run ``diagnose`` with ``arguments`` into ``output`` without its per-series report on stdout (a summary
    table sums it up); returns the path of its ``report.json``."""
    with contextlib.redirect_stdout(io.StringIO()):
        code = diagnose.main([*arguments, "--output", str(output), "--log-level", "WARNING", "--no-viewer"])
    if code != 0:
        raise LunaError(f"diagnose {' '.join(arguments)} failed with exit code {code}")
    return output / "report.json"
