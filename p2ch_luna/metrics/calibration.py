"""Calibration of binary classifiers: expected calibration error, temperature and Platt scaling.

The classifiers return two logits per sample; their probability of class 1 is
``softmax(logits / T)[:, 1]``, which equals ``sigmoid((logit_1 - logit_0) / T)``.
Temperature scaling (Guo et al. 2017, "On calibration of modern neural networks")
fits the one number ``T > 0`` that minimises the negative log-likelihood of held-out
labels: it rescales how sure the model is without changing its ranking (ROC AUC,
FROC and CPM stay the same). Platt scaling (Platt 1999) fits a bias too,
``sigmoid(margin / T + b)``: the bias moves the probabilities by the log of the ratio between the
balanced training prior (half positives) and the validation candidates' (a few in a thousand), which no
temperature can (``python -m bench.bench_calibration --method platt|temperature``).
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


CALIBRATION_METHODS = ("platt", "temperature")
"""What :func:`fit_calibration` fits: a temperature and a bias, or a temperature alone."""
PLATT_ITERATIONS = 100
"""Newton steps of :func:`fit_platt` at most (it converges in about ten)."""


@dataclasses.dataclass(frozen=True)
class TemperatureFit:
    """A fitted temperature (and, for Platt scaling, bias), the mean negative log-likelihood at T = 1,
    b = 0 and at the fit, and, where no fit was made (``temperature`` 1, ``bias`` 0), the reason why."""

    temperature: float
    nll_before: float
    nll_after: float
    samples: int
    reason: str | None = None
    bias: float = 0.0
    method: str = "temperature"
    """What was fitted: ``"platt"`` (temperature and bias) or ``"temperature"`` (bias 0)."""

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


def temperature_probabilities(logits: np.ndarray, temperature: float = 1.0, bias: float = 0.0) -> np.ndarray:
    """``sigmoid((logit_1 - logit_0) / temperature + bias)`` of (N, 2) logits, computed stably
    (``softmax(logits / temperature)[:, 1]`` when ``bias`` is 0)."""
    return _sigmoid(logit_margins(logits) / temperature + bias)


def binary_nll(labels: np.ndarray, margins: np.ndarray, temperature: float = 1.0, bias: float = 0.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``sigmoid(margins / temperature + bias)``."""
    signs = np.where(np.asarray(labels, dtype=bool), 1.0, -1.0)
    values = np.asarray(margins, dtype=np.float64) / temperature + bias
    return float(np.logaddexp(0.0, -signs * values).mean())


def fit_calibration(logits: np.ndarray, labels: np.ndarray, method: str = "platt") -> TemperatureFit:
    """:func:`fit_platt` or :func:`fit_temperature`, by ``method`` (one of ``CALIBRATION_METHODS``)."""
    if method == "platt":
        return fit_platt(logits, labels)
    if method == "temperature":
        return fit_temperature(logits, labels)
    raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, not {method!r}")


def fit_platt(logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
              min_samples: int = MIN_CALIBRATION_SAMPLES, min_per_class: int = MIN_SAMPLES_PER_CLASS) -> TemperatureFit:
    """Platt scaling: the ``T`` and ``b`` of ``sigmoid(margin / T + b)`` that minimise the NLL of Platt's
    smoothed targets (``(N+ + 1) / (N+ + 2)`` for positives, ``1 / (N- + 2)`` for negatives, so separable
    validation sets give finite values), by Newton's method with step halving (convex, deterministic).

    The same refusals as :func:`fit_temperature` (then T = 1, b = 0 and a reason). A fit whose slope is
    not positive (scores against their labels) or whose T leaves ``bounds`` falls back to
    :func:`fit_temperature` (``method`` says which was fitted). ``nll_after`` is the NLL of the labels themselves.
    """
    margins, labels, refusal = _checked(logits, labels, min_samples, min_per_class)
    if refusal is not None:
        return refusal
    positives = int(labels.sum())
    targets = np.where(labels, (positives + 1.0) / (positives + 2.0), 1.0 / (labels.size - positives + 2.0))
    design = np.stack([margins, np.ones_like(margins)], axis=1)
    weights = np.array([1.0, 0.0])

    def loss(w: np.ndarray) -> float:
        values = design @ w
        return float((np.logaddexp(0.0, values) - targets * values).mean())

    current = loss(weights)
    for _ in range(PLATT_ITERATIONS):
        probabilities = _sigmoid(design @ weights)
        gradient = design.T @ (probabilities - targets) / labels.size
        hessian = (design * (probabilities * (1 - probabilities))[:, None]).T @ design / labels.size
        step = np.linalg.solve(hessian + 1e-12 * np.eye(2), gradient)
        scale = 1.0
        while scale > 1e-8 and loss(weights - scale * step) > current:
            scale /= 2
        weights = weights - scale * step
        previous, current = current, loss(weights)
        if previous - current < 1e-12:
            break
    slope, bias = float(weights[0]), float(weights[1])
    low, high = bounds
    if slope <= 0 or not low <= 1.0 / slope <= high:
        return fit_temperature(logits, labels, bounds, min_samples, min_per_class)
    temperature = 1.0 / slope
    return TemperatureFit(temperature, binary_nll(labels, margins), binary_nll(labels, margins, temperature, bias),
                          labels.size, None, bias, "platt")


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
                    min_samples: int = MIN_CALIBRATION_SAMPLES,
                    min_per_class: int = MIN_SAMPLES_PER_CLASS) -> TemperatureFit:
    """The temperature in ``bounds`` that minimises the mean NLL of ``labels`` under ``softmax(logits / T)``.

    The NLL is convex in 1/T, so it has one minimum along log T, found by a golden-section search (no
    randomness, same result on every run). Too few samples, too few of either class, or non-finite logits
    give T = 1 and a ``reason``. A minimum at a bound is returned as it is (the caller may say so).
    """
    low, high = bounds
    if not 0.0 < low < 1.0 < high:
        raise ValueError(f"temperature bounds must satisfy 0 < low < 1 < high, not {bounds}")
    margins, labels, refusal = _checked(logits, labels, min_samples, min_per_class)
    if refusal is not None:
        return refusal

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
    return TemperatureFit(temperature, binary_nll(labels, margins), loss(log_temperature), labels.size)


def _checked(logits: np.ndarray, labels: np.ndarray, min_samples: int, min_per_class: int,
             ) -> tuple[np.ndarray, np.ndarray, TemperatureFit | None]:
    """Margins and labels of a fit, and the no-fit result (T = 1 with its reason) when they are too few,
    of one class, or not finite."""
    margins = logit_margins(logits)
    labels = np.asarray(labels, dtype=bool).ravel()
    if labels.shape != margins.shape:
        raise ValueError(f"labels {labels.shape} and logits {margins.shape} differ in length")
    count, positives = labels.size, int(labels.sum())
    reason = None
    if count < min_samples:
        reason = f"{count} validation sample(s), fewer than {min_samples}"
    elif min(positives, count - positives) < min_per_class:
        reason = f"{positives} positive and {count - positives} negative validation sample(s), fewer than " \
                 f"{min_per_class} of each"
    elif not np.all(np.isfinite(margins)):
        reason = "non-finite logits"
    if reason is None:
        return margins, labels, None
    nll = binary_nll(labels, margins) if count and np.all(np.isfinite(margins)) else float("nan")
    return margins, labels, TemperatureFit(1.0, nll, nll, count, reason)


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -values))
