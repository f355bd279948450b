"""Expected calibration error, temperature and Platt fitting on hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from p2ch_luna.metrics.calibration import (
    TEMPERATURE_BOUNDS,
    binary_nll,
    expected_calibration_error,
    fit_calibration,
    fit_platt,
    fit_temperature,
    logit_margins,
    temperature_probabilities,
)


def test_ece_of_a_perfectly_calibrated_case_is_zero() -> None:
    # 0.25 for four samples, one of them positive; 0.75 for four, three positive; 1.0 for one positive.
    probabilities = np.array([0.25] * 4 + [0.75] * 4 + [1.0])
    labels = np.array([1, 0, 0, 0, 1, 1, 1, 0, 1])
    assert expected_calibration_error(labels, probabilities) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_a_known_case_equals_the_hand_computed_value() -> None:
    # Bin [0.2, 0.3): 4 samples, 1 positive, mean 0.25 -> gap 0. Bin [0.8, 0.9): 2 samples, 1 positive,
    # mean 0.8 -> gap 0.3. ECE = 4/6 * 0 + 2/6 * 0.3 = 0.1.
    probabilities = np.array([0.25, 0.25, 0.25, 0.25, 0.8, 0.8])
    labels = np.array([1, 0, 0, 0, 1, 0])
    assert expected_calibration_error(labels, probabilities) == pytest.approx(0.1)
    # Two bins only: [0, 0.5) holds the four 0.25s, [0.5, 1] the two 0.8s: the same gaps.
    assert expected_calibration_error(labels, probabilities, bins=2) == pytest.approx(0.1)
    # One bin: |2/6 - mean(p)| = |0.3333 - 0.4333| = 0.1.
    assert expected_calibration_error(labels, probabilities, bins=1) == pytest.approx(0.1)


def test_ece_bad_input_and_empty() -> None:
    assert math.isnan(expected_calibration_error(np.zeros(0), np.zeros(0)))
    with pytest.raises(ValueError, match="differ in shape"):
        expected_calibration_error(np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error(np.zeros(1), np.array([1.5]))


def overconfident_case() -> tuple[np.ndarray, np.ndarray]:
    """Logit margins of +-4 that are right 3 times in 4: the calibrated probability is 0.75, T = 4 / ln 3."""
    margins = np.array([4.0] * 4 + [-4.0] * 4)
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 1], dtype=bool)
    logits = np.stack([np.zeros_like(margins), margins], axis=1)
    return np.tile(logits, (2, 1)), np.tile(labels, 2)


def test_temperature_fitting_lowers_the_ece_of_an_overconfident_case() -> None:
    logits, labels = overconfident_case()
    fit = fit_temperature(logits, labels)
    assert fit.fitted and fit.samples == 16
    assert fit.temperature == pytest.approx(4.0 / math.log(3.0), rel=1e-5)
    before = expected_calibration_error(labels, temperature_probabilities(logits))
    after = expected_calibration_error(labels, temperature_probabilities(logits, fit.temperature))
    # Each bin holds 8 samples, 6 (or 2) positive, at sigmoid(+-4): the gap is |0.75 - sigmoid(4)| in both.
    assert before == pytest.approx(abs(0.75 - 1 / (1 + math.exp(-4.0))), rel=1e-9)
    assert after == pytest.approx(0.0, abs=1e-5)
    assert fit.nll_after < fit.nll_before
    assert fit_temperature(logits, labels) == fit  # deterministic


def test_probabilities_match_the_softmax_at_the_temperature() -> None:
    logits = np.array([[0.3, -1.2], [2.0, 2.5], [-40.0, 60.0]])
    expected = torch.softmax(torch.tensor(logits) / 2.5, dim=1)[:, 1].numpy()
    np.testing.assert_allclose(temperature_probabilities(logits, 2.5), expected, rtol=1e-12)
    assert binary_nll([0, 1, 1], logit_margins(logits), 2.5) == pytest.approx(
        -np.mean(np.log([1 - expected[0], expected[1], expected[2]])))


def test_a_sharp_model_gets_its_temperature_back() -> None:
    rng = np.random.default_rng(0)
    true_margins = rng.normal(0.0, 2.0, size=4000)
    labels = rng.random(4000) < 1 / (1 + np.exp(-true_margins))
    logits = np.stack([np.zeros(4000), 3.0 * true_margins], axis=1)  # three times too sure
    assert fit_temperature(logits, labels).temperature == pytest.approx(3.0, rel=0.1)


def test_an_underconfident_model_gets_a_temperature_below_one() -> None:
    logits, labels = overconfident_case()
    fit = fit_temperature(logits / 20.0, labels)  # margins +-0.2: far too unsure
    assert fit.temperature == pytest.approx(0.2 / math.log(3.0), rel=1e-5) and fit.temperature < 1


def test_a_model_scoring_against_its_labels_ends_at_the_upper_bound() -> None:
    logits, labels = overconfident_case()
    fit = fit_temperature(logits, ~labels)
    assert fit.fitted and fit.temperature == pytest.approx(TEMPERATURE_BOUNDS[1])


@pytest.mark.parametrize("labels, logits, reason", [
    (np.zeros(20, dtype=bool), np.zeros((20, 2)), "0 positive and 20 negative"),
    (np.ones(20, dtype=bool), np.zeros((20, 2)), "20 positive and 0 negative"),
    (np.array([1, 0, 1, 0, 1]), np.zeros((5, 2)), "5 validation sample"),
    (np.array([1, 0] * 10), np.array([[0.0, np.inf]] + [[0.0, 1.0]] * 19), "non-finite"),
])
def test_degenerate_input_gives_temperature_one_and_a_reason(labels: np.ndarray, logits: np.ndarray,
                                                             reason: str) -> None:
    fit = fit_temperature(logits, labels)
    assert fit.temperature == 1.0 and not fit.fitted and reason in fit.reason


def test_bad_shapes_and_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\(N, 2\) logits"):
        fit_temperature(np.zeros(10), np.zeros(10))
    with pytest.raises(ValueError, match="differ in length"):
        fit_temperature(np.zeros((10, 2)), np.zeros(9))
    with pytest.raises(ValueError, match="bounds"):
        fit_temperature(np.zeros((10, 2)), np.zeros(10), bounds=(2.0, 5.0))


def _prior_shifted_case() -> tuple[np.ndarray, np.ndarray]:
    """A model trained on balanced samples scoring candidates of which 1 in 100 is a nodule: its margins are
    the true log-odds plus log(99) (the prior shift), doubled (overconfident)."""
    rng = np.random.default_rng(7)
    labels = rng.random(20000) < 0.01
    true_log_odds = np.where(labels, 2.0, -2.0) + rng.normal(0.0, 1.5, labels.size) - math.log(99.0)
    margins = 2.0 * (true_log_odds + math.log(99.0))
    return np.stack([np.zeros_like(margins), margins], axis=1), labels


def test_platt_scaling_undoes_a_prior_shift_that_a_temperature_cannot() -> None:
    logits, labels = _prior_shifted_case()
    temperature, platt = fit_temperature(logits, labels), fit_platt(logits, labels)
    assert platt.method == "platt" and platt.fitted and platt.bias < -3  # about -log(99)
    assert platt.nll_after < temperature.nll_after < temperature.nll_before
    ece = {fit.method: expected_calibration_error(labels, temperature_probabilities(logits, fit.temperature, fit.bias))
           for fit in (temperature, platt)}
    assert ece["platt"] < 0.01 < 0.1 < ece["temperature"]
    # At 0.5 the shifted model flags most negatives; calibrated, about as many as there are nodules.
    flagged = np.count_nonzero(temperature_probabilities(logits, platt.temperature, platt.bias) >= 0.5)
    assert np.count_nonzero(temperature_probabilities(logits) >= 0.5) > 10 * labels.sum() > 10 * flagged / 2


def test_platt_keeps_the_ranking_and_recovers_a_known_slope_and_bias() -> None:
    rng = np.random.default_rng(8)
    margins = rng.normal(0.0, 3.0, 40000)
    labels = rng.random(margins.size) < 1.0 / (1.0 + np.exp(-(margins / 2.0 - 1.5)))
    fit = fit_calibration(np.stack([np.zeros_like(margins), margins], axis=1), labels, "platt")
    assert fit.temperature == pytest.approx(2.0, rel=0.05) and fit.bias == pytest.approx(-1.5, abs=0.1)
    calibrated = temperature_probabilities(np.stack([np.zeros_like(margins), margins], axis=1), fit.temperature,
                                           fit.bias)
    assert np.array_equal(np.argsort(calibrated, kind="stable"), np.argsort(margins, kind="stable"))


def test_platt_against_the_labels_falls_back_to_the_temperature_alone() -> None:
    rng = np.random.default_rng(9)
    labels = rng.random(200) < 0.5
    logits = np.stack([np.zeros(200), np.where(labels, -2.0, 2.0) + rng.normal(0, 0.5, 200)], axis=1)
    fit = fit_platt(logits, labels)
    assert fit.method == "temperature" and fit.bias == 0.0
    assert fit == fit_temperature(logits, labels)
    with pytest.raises(ValueError, match="calibration method"):
        fit_calibration(logits, labels, "isotonic")
