"""Generator regimes: each range reaches the image, the default regime's data is as before, bad regimes fail."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from p2ch_luna.errors import UsageError
from p2ch_luna.synth.generator import generate_dataset
from p2ch_luna.synth.regime import DEFAULT, REGIMES, SHIFTED, Regime, regime_named
from p2ch_luna.synth.series import make_series, series_rng

SHAPE = (96, 96)


def series_of(regime: Regime, seed: int = 3):
    return make_series(np.random.default_rng(seed), SHAPE, 32, n_nodules=1, regime=regime)


def test_a_calibration_offset_moves_the_lungs_by_that_offset_and_nothing_else() -> None:
    # A single-point range draws nothing, so both series see the same random stream: same anatomy, same noise.
    base, moved = series_of(DEFAULT), series_of(Regime("offset", hu_offset=(50.0, 50.0)))
    assert np.array_equal(base.lung_mask, moved.lung_mask)
    difference = moved.hu[base.lung_mask].astype(np.int32) - base.hu[base.lung_mask]
    assert abs(float(np.median(difference)) - 50) <= 1


def test_more_noise_and_a_sharper_or_blurrier_kernel_reach_the_voxels() -> None:
    def roughness(series) -> float:  # the typical voxel-to-voxel step inside the lungs (vessel edges aside)
        hu = series.hu.astype(np.float32)
        inside = series.lung_mask[:, :, 1:] & series.lung_mask[:, :, :-1]
        return float(np.median(np.abs(hu[:, :, 1:] - hu[:, :, :-1])[inside]))

    base = roughness(series_of(DEFAULT))
    noisy = roughness(series_of(Regime("noisy", noise_sd=(110.0, 110.0))))
    assert noisy > 1.5 * base
    assert roughness(series_of(Regime("blurred", noise_sd=(110.0, 110.0), blur_scale=(2.0, 2.0)))) < 0.7 * noisy
    assert roughness(series_of(Regime("sharp", noise_sd=(110.0, 110.0), blur_scale=(0.7, 0.7)))) > 1.3 * noisy


def test_the_nodule_mix_follows_the_regime() -> None:
    pleural = Regime("pleural", location_weights=(0.0, 1.0, 0.0), solid_hu=(75.0, 75.0), ground_glass_fraction=0.0)
    nodules = [n for seed in range(4) for n in make_series(np.random.default_rng(seed), SHAPE, 32, n_nodules=2,
                                                          regime=pleural).nodules]
    assert nodules and {n.location for n in nodules} == {"pleural"}
    assert {n.texture for n in nodules} == {"solid"}


def test_another_regime_draws_other_patients_and_the_default_stream_is_unchanged(tmp_path) -> None:
    assert series_rng(5, 2).random() == np.random.default_rng([5, 2]).random()
    assert series_rng(5, 2, SHIFTED).random() != series_rng(5, 2).random()
    default = generate_dataset(tmp_path / "d", series=2, seed=5, shape=SHAPE, slices=(24, 28), progress=False)
    shifted = generate_dataset(tmp_path / "s", series=2, seed=5, shape=SHAPE, slices=(24, 28), progress=False,
                               regime=SHIFTED)
    assert {i.series_uid for i in default}.isdisjoint({i.series_uid for i in shifted})


def test_regimes_check_their_ranges_and_names() -> None:
    assert set(REGIMES) == {"default", "shifted", "wide"}
    with pytest.raises(ValueError, match="location_weights"):
        dataclasses.replace(DEFAULT, location_weights=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="noise_sd"):
        Regime("bad", noise_sd=(60.0, 20.0))
    with pytest.raises(UsageError, match="unknown generator regime 'sharp'"):
        regime_named("sharp")
