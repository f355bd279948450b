"""Step 4 of diagnosis: a classifier's probability for a chunk around each candidate."""

from __future__ import annotations

import numpy as np
import torch

from p2ch_luna.diagnose.inference import autocast, host_to_device, progress_bar
from p2ch_luna.errors import UsageError
from p2ch_luna.io.ct import extract_chunk
from p2ch_luna.models.classifier import CHUNK_SHAPE_IRC
from p2ch_luna.models.layout import to_memory_format

CPU_CLASSIFICATION_BATCH = 16
"""Candidates per classifier batch on the CPU (x4 mirror views: 64 chunks), the fastest batch in
channels-last there (``python -m bench.bench_diagnose``)."""
CUDA_CLASSIFICATION_BATCH = 64
ALL_VIEWS_BAND = (0.0, 1.0)
"""A flip band that holds every probability: all four views for every candidate, in one pass."""
DEFAULT_FLIP_BAND = (0.02, 1.0)
"""Mirror views only for candidates whose first-view nodule probability is at least 0.02. On the real
CPTAC CT with the book's classifier a first view of 0.035 still reached 0.5 on the mean of all four, and
one of 0.92 fell below it, so the band must reach that low and up to 1 to keep the findings of all views
(``python -m bench.bench_flip_band``; figures in docs/benchmarks.md, "Uncertain-band cascade")."""
MIRROR_VIEWS = 3


def parse_flip_band(text: str) -> tuple[float, float]:
    """``LOW,HIGH`` (``--flip-band``) as two probabilities with ``0 <= LOW <= HIGH <= 1``."""
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--flip-band {text!r} is not two numbers LOW,HIGH (such as 0.1,0.9)") from None
    if not 0.0 <= low <= high <= 1.0:
        raise UsageError(f"--flip-band {text!r} needs 0 <= LOW <= HIGH <= 1")
    return low, high


def _mirror_views(inputs: torch.Tensor) -> list[torch.Tensor]:
    """The three in-plane mirror images (rows, columns, both) of a batch of chunks (N, 1, I, R, C)."""
    return [inputs.flip(3), inputs.flip(4), inputs.flip((3, 4))]


def classify_chunks(hu: np.ndarray, centers_irc: np.ndarray, model: torch.nn.Module, batch_size: int,
                    device: torch.device, amp: bool = False, flips: bool = False,
                    progress: bool = False, description: str = "classification",
                    temperature: float = 1.0, bias: float = 0.0,
                    flip_band: tuple[float, float] = ALL_VIEWS_BAND) -> np.ndarray:
    """Probability of class 1, ``sigmoid((logit_1 - logit_0) / temperature + bias)`` (the checkpoint's
    calibration; the softmax when they are 1 and 0), for a chunk around each voxel centre.

    With ``flips`` the probability is the mean over the chunk and its three
    in-plane mirror images (test-time augmentation with the training flips).
    The next batch is cut on the host while the device computes this one:
    the scores are read back after the last batch. ``progress`` shows a bar of
    the candidates on a terminal.

    A ``flip_band`` narrower than [0, 1] makes ``flips`` a cascade: every candidate is scored on its
    chunk alone (in batches of four times ``batch_size``: as many chunks per pass), and only those
    whose probability lies in the band (inclusive) get the mirror images and the mean of the four
    views; the others keep the single-view probability.
    """
    if flips and tuple(flip_band) != ALL_VIEWS_BAND:
        return _classify_cascade(hu, centers_irc, model, batch_size, device, amp, progress, description,
                                 temperature, bias, flip_band)
    shape = tuple(getattr(model, "input_shape", CHUNK_SHAPE_IRC))
    scores = []
    with torch.inference_mode(), autocast(device, amp), progress_bar(len(centers_irc), description, "candidate",
                                                            progress) as bar:
        for start in range(0, len(centers_irc), batch_size):
            batch = centers_irc[start : start + batch_size]
            bar.update(len(batch))
            chunks = np.stack([extract_chunk(hu, center, shape) for center in batch])
            inputs = host_to_device(chunks, device).unsqueeze(1).float()
            views = [inputs, *_mirror_views(inputs)] if flips else [inputs]
            logits = model(to_memory_format(torch.cat(views), channels_last=True)).float()
            scores.append(_calibrated(logits, temperature, bias).reshape(len(views), len(batch)).mean(dim=0))
    if not scores:
        return np.zeros(0, dtype=np.float64)
    return torch.cat(scores).cpu().numpy().astype(np.float64)  # the one wait for the device


def _classify_cascade(hu: np.ndarray, centers_irc: np.ndarray, model: torch.nn.Module, batch_size: int,
                      device: torch.device, amp: bool, progress: bool, description: str, temperature: float,
                      bias: float, flip_band: tuple[float, float]) -> np.ndarray:
    """:func:`classify_chunks` with ``flips``: one view for all, the mirror views only inside ``flip_band``."""
    single = classify_chunks(hu, centers_irc, model, batch_size * (1 + MIRROR_VIEWS), device, amp, False,
                             progress, description, temperature, bias)
    low, high = flip_band
    uncertain = np.flatnonzero((single >= low) & (single <= high))
    probabilities = single.copy()
    if not len(uncertain):
        return probabilities
    shape = tuple(getattr(model, "input_shape", CHUNK_SHAPE_IRC))
    sums = []
    with torch.inference_mode(), autocast(device, amp), progress_bar(len(uncertain), f"{description}, mirrors",
                                                            "candidate", progress) as bar:
        for start in range(0, len(uncertain), batch_size):
            batch = centers_irc[uncertain[start : start + batch_size]]
            bar.update(len(batch))
            chunks = np.stack([extract_chunk(hu, center, shape) for center in batch])
            inputs = host_to_device(chunks, device).unsqueeze(1).float()
            logits = model(to_memory_format(torch.cat(_mirror_views(inputs)), channels_last=True)).float()
            views = _calibrated(logits, temperature, bias).reshape(MIRROR_VIEWS, len(batch))
            sums.append(views.sum(dim=0))
    mirrored = torch.cat(sums).cpu().numpy().astype(np.float64)
    probabilities[uncertain] = (single[uncertain] + mirrored) / (1 + MIRROR_VIEWS)
    return probabilities


def _calibrated(logits: torch.Tensor, temperature: float, bias: float) -> torch.Tensor:
    """Class-1 probability of (N, 2) logits under the checkpoint's calibration."""
    return torch.sigmoid((logits[:, 1] - logits[:, 0]) / temperature + bias)
