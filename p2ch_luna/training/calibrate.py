"""After a classifier's training run: fit its calibration to its best checkpoint and store it there.

The best checkpoint's model classifies the validation set once (no augmentation, every rank its
shard); :func:`p2ch_luna.metrics.calibration.fit_calibration` fits Platt scaling (a temperature and a
bias, the default) or a temperature alone (``--calibration-method``) to minimise the negative
log-likelihood of those labels, and the checkpoint is rewritten atomically with
``calibration = {"method", "temperature", "bias", "ece_before", "ece_after", "nll_before", "nll_after",
"validation_samples", "validation_positives", "ece_bins", "epoch", "reason"}``. Diagnosis then computes
``sigmoid((logit_1 - logit_0) / temperature + bias)``, so ``--nodule-threshold`` is a probability that
matches the frequency of nodules among validation candidates rather than the balanced training ratio's
(only a bias can undo that prior shift: ``python -m bench.bench_calibration``).

The temperature is fitted on the single chunk of each candidate; diagnosis with ``--flips`` averages
the calibrated probabilities of four mirror images, which are close to but not exactly the fitted ones.
Validation here means the training run's validation candidates (``candidates.csv`` rows of the
validation series), not the candidates diagnosis groups from the segmenter.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from p2ch_luna.data.sampling import make_generator
from p2ch_luna.distributed import all_gather_objects, barrier
from p2ch_luna.metrics.calibration import (
    DEFAULT_ECE_BINS,
    TEMPERATURE_BOUNDS,
    expected_calibration_error,
    fit_calibration,
    temperature_probabilities,
)
from p2ch_luna.models.checkpoint import CALIBRATION_FIELD, load_checkpoint, update_checkpoint
from p2ch_luna.models.layout import channels_last
from p2ch_luna.precision import AmpSettings
from p2ch_luna.training import tensorboard as tblog
from p2ch_luna.training.engine import move_to_device
from p2ch_luna.training.tasks.base import Batch, Task

log = logging.getLogger(__name__)

UNCALIBRATED_METHOD = "none"


def calibrate_best_checkpoint(task: Task, best_path: Path, val_loader: Iterable[Batch], *, device: torch.device,
                              amp: AmpSettings, writer: Any | None, samples_seen: int) -> dict[str, Any] | None:
    """Fit and store the temperature of ``best_path`` when ``task.calibrates``; the stored calibration on
    rank 0, None elsewhere or when skipped. Every rank takes part (each classifies its validation shard)."""
    if not task.calibrates:
        log.info("%s: no calibration (--no-calibrate); diagnosis uses the plain softmax", task.task_name)
        return None
    loaded = load_checkpoint(best_path, expected_task=task.task_name, map_location=device)
    model = channels_last(loaded.model) if task.config.channels_last else loaded.model
    local = validation_logits(task, model, val_loader, device, amp)
    gathered = all_gather_objects(local)
    calibration = None
    if task.context.is_main:
        logits = np.concatenate([part[0] for part in gathered]).reshape(-1, 2)
        labels = np.concatenate([part[1] for part in gathered])
        calibration = calibration_record(logits, labels, loaded.epoch, task.calibration_method)
        update_checkpoint(best_path, {CALIBRATION_FIELD: calibration})
        _report(task.task_name, best_path, calibration, writer, samples_seen)
    barrier()  # the file is rewritten before any rank goes on
    return calibration


@torch.no_grad()
def validation_logits(task: Task, model: torch.nn.Module, loader: Iterable[Batch], device: torch.device,
                      amp: AmpSettings) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) float64 logits and (N,) bool labels of ``model`` on one pass over ``loader`` (no augmentation)."""
    model.eval()
    generator = make_generator(task.config.seed, 0, device, task.context.rank)
    logits, labels = [], []
    for batch in loader:
        images, batch_labels = task.model_inputs(move_to_device(batch, device), augment=False, generator=generator)
        with amp.autocast(device):
            batch_logits = model(images)
        logits.append(batch_logits.float().cpu())
        labels.append(batch_labels.cpu())
    if not logits:
        return np.zeros((0, 2)), np.zeros(0, dtype=bool)
    return torch.cat(logits).double().numpy(), torch.cat(labels).numpy().astype(bool)


def calibration_record(logits: np.ndarray, labels: np.ndarray, epoch: int | None,
                       method: str = "platt") -> dict[str, Any]:
    """The ``calibration`` field for these validation logits: the fitted temperature and bias (1 and 0 with
    a reason when none could be fitted) and the ECE and NLL before and after."""
    fit = fit_calibration(logits, labels, method)
    finite = bool(np.all(np.isfinite(logits)))
    before = expected_calibration_error(labels, temperature_probabilities(logits)) if finite else float("nan")
    after = expected_calibration_error(labels, temperature_probabilities(logits, fit.temperature, fit.bias)) \
        if finite else float("nan")
    return {
        "method": fit.method if fit.fitted else UNCALIBRATED_METHOD,
        "temperature": fit.temperature,
        "bias": fit.bias,
        "ece_before": before,
        "ece_after": after,
        "ece_bins": DEFAULT_ECE_BINS,
        "nll_before": fit.nll_before,
        "nll_after": fit.nll_after,
        "validation_samples": int(labels.size),
        "validation_positives": int(np.count_nonzero(labels)),
        "epoch": epoch,
        "reason": fit.reason,
    }


def _report(task_name: str, path: Path, calibration: dict[str, Any], writer: Any | None, samples_seen: int) -> None:
    samples, positives = calibration["validation_samples"], calibration["validation_positives"]
    if calibration["reason"] is not None:
        log.warning("%s: no calibration fitted (%s); %s keeps temperature 1, diagnosis uses the plain softmax",
                    task_name, calibration["reason"], path.name)
    else:
        log.info("%s calibration (%s) on %d validation samples (%d positive): temperature %.3f, bias %.3f, "
                 "ECE %.4f -> %.4f (%d bins), NLL %.4f -> %.4f; stored in %s", task_name, calibration["method"],
                 samples, positives, calibration["temperature"], calibration["bias"],
                 calibration["ece_before"], calibration["ece_after"],
                 calibration["ece_bins"], calibration["nll_before"], calibration["nll_after"], path.name)
        if any(math.isclose(calibration["temperature"], bound, rel_tol=1e-5) for bound in TEMPERATURE_BOUNDS):
            log.warning("%s: the temperature reached the end of its range %s (validation samples all "
                        "separated, or scored against their labels): take its probabilities with care",
                        task_name, TEMPERATURE_BOUNDS)
    if writer is not None:
        tblog.add_scalars(writer, {"calibration/temperature": calibration["temperature"],
                                   "calibration/bias": calibration["bias"],
                                   "calibration/ece_before": calibration["ece_before"],
                                   "calibration/ece_after": calibration["ece_after"]}, samples_seen)
        writer.flush()
