"""Calibration of binary classifiers: expected calibration error and temperature scaling.

The classifiers return two logits per sample; their probability of class 1 is
``softmax(logits / T)[:, 1]``, which equals ``sigmoid((logit_1 - logit_0) / T)``.
Temperature scaling (Guo et al. 2017, "On calibration of modern neural networks")
fits the one number ``T > 0`` that minimises the negative log-likelihood of held-out
labels: it rescales how sure the model is without changing its ranking (ROC AUC,
FROC and CPM stay the same).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

DEFAULT_ECE_BINS = 10
"""Equal-width probability bins of :func:`expected_calibration_error` (the common choice since Guo et al.)."""
TEMPERATURE_BOUNDS = (0.05, 20.0)
"""The search range of :func:`fit_temperature`: beyond it the probabilities are practically 0/1 or 0.5."""
MIN_CALIBRATION_SAMPLES = 10
"""Fewer validation samples than this give no temperature (T = 1)."""
MIN_SAMPLES_PER_CLASS = 2
"""Fewer positives or negatives than this give no temperature (T = 1)."""
SEARCH_TOLERANCE = 1e-6
"""Width in log T at which the golden-section search stops."""
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


@dataclasses.dataclass(frozen=True)
class TemperatureFit:
    """A fitted temperature, the mean negative log-likelihood at T = 1 and at T, and, where no fit was
    made (``temperature`` 1), the reason why."""

    temperature: float
    nll_before: float
    nll_after: float
    samples: int
    reason: str | None = None

    @property
    def fitted(self) -> bool:
        return self.reason is None


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = DEFAULT_ECE_BINS) -> float:
    """ECE of the class-1 probabilities: sum over ``bins`` equal-width bins of [0, 1] of
    (share of samples in the bin) x |fraction of positives in the bin - mean probability in the bin|.

    Bin ``k`` holds probabilities in [k/bins, (k+1)/bins), the last one also 1.0. ``nan`` for no samples.
    """
    labels = np.asarray(labels, dtype=bool).ravel()
    probabilities = np.asarray(probabilities, dtype=np.float64).ravel()
    if labels.shape != probabilities.shape:
        raise ValueError(f"labels {labels.shape} and probabilities {probabilities.shape} differ in shape")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, not {bins}")
    if probabilities.size and not (np.all(probabilities >= 0.0) and np.all(probabilities <= 1.0)):
        raise ValueError("probabilities must lie in [0, 1]")
    if labels.size == 0:
        return float("nan")
    index = np.minimum((probabilities * bins).astype(np.int64), bins - 1)
    positives = np.bincount(index, weights=labels.astype(np.float64), minlength=bins)
    confidence = np.bincount(index, weights=probabilities, minlength=bins)
    return float(np.abs(positives - confidence).sum() / labels.size)


def logit_margins(logits: np.ndarray) -> np.ndarray:
    """``logit_1 - logit_0`` of (N, 2) logits, as float64: the class-1 log-odds at T = 1."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] != 2:
        raise ValueError(f"expected (N, 2) logits, not shape {logits.shape}")
    return logits[:, 1] - logits[:, 0]


def temperature_probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``softmax(logits / temperature)[:, 1]`` of (N, 2) logits, computed stably."""
    return _sigmoid(logit_margins(logits) / temperature)


def binary_nll(labels: np.ndarray, margins: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``sigmoid(margins / temperature)``."""
    signs = np.where(np.asarray(labels, dtype=bool), 1.0, -1.0)
    return float(np.logaddexp(0.0, -signs * np.asarray(margins, dtype=np.float64) / temperature).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
                    min_samples: int = MIN_CALIBRATION_SAMPLES,
                    min_per_class: int = MIN_SAMPLES_PER_CLASS) -> TemperatureFit:
    """The temperature in ``bounds`` that minimises the mean NLL of ``labels`` under ``softmax(logits / T)``.

    The NLL is convex in 1/T, so it has one minimum along log T, found by a golden-section search (no
    randomness, same result on every run). Too few samples, too few of either class, or non-finite logits
    give T = 1 and a ``reason``. A minimum at a bound is returned as it is (the caller may say so).
    """
    margins = logit_margins(logits)
    labels = np.asarray(labels, dtype=bool).ravel()
    if labels.shape != margins.shape:
        raise ValueError(f"labels {labels.shape} and logits {margins.shape} differ in length")
    low, high = bounds
    if not 0.0 < low < 1.0 < high:
        raise ValueError(f"temperature bounds must satisfy 0 < low < 1 < high, not {bounds}")
    count, positives = labels.size, int(labels.sum())
    reason = None
    if count < min_samples:
        reason = f"{count} validation sample(s), fewer than {min_samples}"
    elif min(positives, count - positives) < min_per_class:
        reason = f"{positives} positive and {count - positives} negative validation sample(s), fewer than " \
                 f"{min_per_class} of each"
    elif not np.all(np.isfinite(margins)):
        reason = "non-finite logits"
    if reason is not None:
        nll = binary_nll(labels, margins) if count and np.all(np.isfinite(margins)) else float("nan")
        return TemperatureFit(1.0, nll, nll, count, reason)

    def loss(log_temperature: float) -> float:
        return binary_nll(labels, margins, math.exp(log_temperature))

    a, b = math.log(low), math.log(high)
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    loss_c, loss_d = loss(c), loss(d)
    while b - a > SEARCH_TOLERANCE:
        if loss_c <= loss_d:
            b, d, loss_d = d, c, loss_c
            c = b - _GOLDEN * (b - a)
            loss_c = loss(c)
        else:
            a, c, loss_c = c, d, loss_d
            d = a + _GOLDEN * (b - a)
            loss_d = loss(d)
    best = (a + b) / 2.0
    # The ends of the range are candidates too: the minimum may lie at a bound.
    log_temperature = min((math.log(low), best, math.log(high)), key=loss)
    temperature = math.exp(log_temperature)
    return TemperatureFit(temperature, binary_nll(labels, margins), loss(log_temperature), count)


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -values))
