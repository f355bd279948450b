"""Diagnosis of one CT, and of a list of them: lungs, segmentation, grouping, classification.

1. lung mask from HU (:mod:`p2ch_luna.diagnose.lungs`); every later step stays inside it;
2. the U-Net on every slice that holds lung (:mod:`p2ch_luna.diagnose.segment`);
3. the mask grouped into candidates (:mod:`p2ch_luna.diagnose.grouping`);
4. nodule probability per candidate, averaged over its in-plane mirror images unless
   ``flips`` is off (the mirrors only where the first view's lies in ``flip_band``), one
   detection per blob, then malignancy probability for those above the nodule threshold
   (:mod:`p2ch_luna.diagnose.classify`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from p2ch_luna.diagnose.classify import (
    CPU_CLASSIFICATION_BATCH,
    CUDA_CLASSIFICATION_BATCH,
    DEFAULT_FLIP_BAND,
    classify_chunks,
)
from p2ch_luna.diagnose.grouping import MIN_CANDIDATE_DIAMETER_MM, group_candidates, keep_strongest
from p2ch_luna.diagnose.lungs import DEFAULT_MARGIN_MM, Lungs, find_lungs
from p2ch_luna.diagnose.model_set import DiagnosisModels
from p2ch_luna.diagnose.prefetch import PreparedCt, prepared_cts
from p2ch_luna.diagnose.segment import CPU_SEGMENTATION_BATCH, segment_ct
from p2ch_luna.geometry import Geometry
from p2ch_luna.io.ct import Ct
from p2ch_luna.kernels.choice import DEFAULT_KERNELS

if TYPE_CHECKING:
    from p2ch_luna.viewer.slices import ViewerSlices

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DiagnoseConfig:
    """Thresholds and post-processing (book defaults) and how to run the models."""

    segmentation_threshold: float = 0.5
    erosion_iterations: int = 1
    grouping: str = "peaks"
    max_shell_fill: float | None = None
    min_diameter_mm: float = MIN_CANDIDATE_DIAMETER_MM
    """``--max-shell-fill``: peaks more tube than blob are dropped (None: none)."""
    flips: bool = True
    flip_band: tuple[float, float] = DEFAULT_FLIP_BAND
    """With ``flips``: the nodule classifier's mirror views only for candidates whose first-view
    probability lies in [low, high] (0, 1: for all); the malignancy classifier always uses all views."""
    nodule_threshold: float = 0.5
    malignancy_threshold: float = 0.5
    batch_size: int = CPU_SEGMENTATION_BATCH
    amp: bool = False
    lung_margin_mm: float = DEFAULT_MARGIN_MM
    kernels: str = DEFAULT_KERNELS
    """``--kernels``: the classifiers' small convolutions by torch (cuDNN) or by the Triton kernels (CUDA)."""
    runtime: str = "torch"
    """``--runtime``: the models in PyTorch or their ONNX exports in onnxruntime."""



@dataclasses.dataclass
class SeriesDiagnosis:
    """Everything found in one CT: one row per candidate, plus what the report needs."""

    series_uid: str
    source: str
    shape_irc: tuple[int, int, int]
    spacing_irc: tuple[float, float, float]
    lung_volume_ml: float
    candidates: pd.DataFrame
    timings: dict[str, float]
    geometry: Geometry | None = None
    figures: dict[str, bytes] = dataclasses.field(default_factory=dict)
    """PNG bytes per finding, keyed by file name."""
    mask_bits: np.ndarray | None = None
    """The segmentation mask inside the lungs, ``np.packbits``-ed (``--save-mask``)."""
    viewer: ViewerSlices | None = None
    """The slices and masks as the viewer page stores them (``--output`` unless ``--no-viewer``)."""



def diagnose_ct(ct: Ct, models: DiagnosisModels, config: DiagnoseConfig, device: torch.device,
                source: str = "", lungs: Lungs | None = None, progress: bool = False,
                ) -> tuple[SeriesDiagnosis, np.ndarray, np.ndarray]:
    """Run the whole pipeline on one CT; returns the diagnosis, the lung mask and the nodule mask.

    ``lungs`` found beforehand (:mod:`p2ch_luna.diagnose.prefetch`) skip that step; the
    caller then adds its time to the timings. ``progress`` shows bars of the
    model stages on a terminal.
    """
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    spacing_irc = tuple(float(v) for v in ct.geometry.spacing_irc)
    if lungs is None:
        lungs = find_lungs(ct.hu, spacing_irc, margin_mm=config.lung_margin_mm)
        lap("lungs_s")
    nodule_mask = segment_ct(ct.hu, lungs.mask, models.segmentation.model, config.segmentation_threshold,
                             config.batch_size, device, config.amp, progress)
    lap("segmentation_s")
    candidates = group_candidates(ct.hu, nodule_mask, lungs.mask, ct, config.erosion_iterations, config.grouping,
                                  workers=torch.get_num_threads(), max_shell_fill=config.max_shell_fill,
                                  min_diameter_mm=config.min_diameter_mm)
    lap("grouping_s")
    centers = np.rint(candidates[["index", "row", "col"]].to_numpy(np.float64)).astype(np.int64)
    batch = CUDA_CLASSIFICATION_BATCH if device.type == "cuda" else CPU_CLASSIFICATION_BATCH
    candidates["nodule_probability"] = classify_chunks(ct.hu, centers, models.nodule.model, batch, device,
                                                       config.amp, config.flips, progress, "nodule classification",
                                                       models.nodule.temperature, models.nodule.bias,
                                                       config.flip_band)
    order = np.argsort(-candidates["nodule_probability"].to_numpy(), kind="mergesort")
    candidates, centers = candidates.iloc[order], centers[order]
    if config.grouping == "peaks":
        keep = keep_strongest(candidates)
        candidates, centers = candidates[keep], centers[keep]
    if models.malignancy is not None:
        suspicious = candidates["nodule_probability"].to_numpy() >= config.nodule_threshold
        candidates.loc[suspicious, "malignancy_probability"] = classify_chunks(
            ct.hu, centers[suspicious], models.malignancy.model, batch, device, config.amp, config.flips, progress,
            "malignancy", models.malignancy.temperature, models.malignancy.bias)
    lap("classification_s")
    diagnosis = SeriesDiagnosis(
        series_uid=ct.series_uid, source=source or str(ct.source or ""), shape_irc=ct.shape,
        spacing_irc=spacing_irc, lung_volume_ml=lungs.volume_ml,
        candidates=candidates.reset_index(drop=True), timings=timings, geometry=ct.geometry,
    )
    return diagnosis, lungs.mask, nodule_mask & lungs.mask


def findings(diagnosis: SeriesDiagnosis, config: DiagnoseConfig) -> pd.DataFrame:
    """Candidates at or above the nodule threshold (the report's findings)."""
    candidates = diagnosis.candidates
    return candidates[candidates["nodule_probability"] >= config.nodule_threshold]


def diagnose_series(selection: Sequence[tuple[str, Path]], models: DiagnosisModels, config: DiagnoseConfig,
                    device: torch.device, figures: bool, save_mask: bool, prefetch: int = 0,
                    show_progress: bool = True, viewer: bool = False) -> list[SeriesDiagnosis]:
    """Load and diagnose each CT, rendering the per-finding figures (the mask, the viewer's slices) as bytes.

    With ``prefetch`` > 0, that many worker processes load the next CTs and
    find their lungs while this one runs the models (:mod:`p2ch_luna.diagnose.prefetch`).
    With ``show_progress``, a bar shows the CTs, or for a single CT its model stages.
    """
    stage_bars = show_progress and len(selection) < 2
    results = []
    with contextlib.closing(prepared_cts(selection, config.lung_margin_mm, prefetch)) as prepared_all:
        for (_, path), prepared in tqdm(zip(selection, prepared_all), desc="diagnose", unit="CT",
                                        total=len(selection), disable=not show_progress or stage_bars):
            results.append(_diagnose_prepared(prepared, path, models, config, device, figures, save_mask,
                                              stage_bars, viewer))
    return results


def _diagnose_prepared(prepared: PreparedCt, path: Path, models: DiagnosisModels,
                       config: DiagnoseConfig, device: torch.device, figures: bool,
                       save_mask: bool, progress: bool = False, viewer: bool = False) -> SeriesDiagnosis:
    """Diagnose one loaded CT whose lungs are found; figures, mask and viewer bytes when asked."""
    from p2ch_luna.diagnose import figures as finding_figures  # matplotlib: only when drawing

    started = time.perf_counter()
    ct = prepared.ct
    diagnosis, lung_mask, nodule_mask = diagnose_ct(ct, models, config, device, source=str(path),
                                                    lungs=prepared.lungs, progress=progress)
    diagnosis.timings = {"load_s": prepared.load_s, "lungs_s": prepared.lungs_s, **diagnosis.timings}
    if figures:
        diagnosis.figures = finding_figures.render_findings(ct, findings(diagnosis, config), lung_mask)
    if save_mask:
        diagnosis.mask_bits = np.packbits(nodule_mask)
    if viewer:
        from p2ch_luna.viewer.slices import encode_ct

        encoding_started = time.perf_counter()
        diagnosis.viewer = encode_ct(ct, lung_mask, nodule_mask)
        diagnosis.timings["viewer_s"] = time.perf_counter() - encoding_started
    # Work done for this CT, wherever it ran (loading and lungs may have overlapped the previous CT).
    diagnosis.timings["total_s"] = prepared.load_s + prepared.lungs_s + time.perf_counter() - started
    log.info("%s: %d candidates, %d findings in %.1f s", diagnosis.series_uid, len(diagnosis.candidates),
             len(findings(diagnosis, config)), diagnosis.timings["total_s"])
    return diagnosis
