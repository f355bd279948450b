"""resample: the fused resampling + noise kernel against torch's affine_grid/grid_sample, its noise, its guards.

Without CUDA the kernel runs in Triton's interpreter (conftest sets ``TRITON_INTERPRET=1`` there) on small
volumes; with CUDA it also runs compiled, and ``augment_batch_3d`` is checked to route int16 batches to it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from p2ch_luna.data import resample
from p2ch_luna.data.augment import AugmentConfig, apply_affine_3d, augment_batch_3d, sample_affine_3d

needs_kernel = pytest.mark.skipif(resample.kernels() is None, reason="needs Triton: the optional [triton] extra (pip install '.[triton]'; .ci/run installs it)")
DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def _kernel_devices() -> list[torch.device]:
    return [device for device in DEVICES if device.type == "cuda" or resample.interpreting()]


def _hu_volumes(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.int16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-1000, 600, shape, generator=generator, dtype=torch.int16).to(dtype)


@needs_kernel
@pytest.mark.parametrize("shape", [(4, 1, 6, 10, 12), (3, 2, 5, 7, 4), (2, 1, 1, 3, 1)])
@pytest.mark.parametrize("dtype", [torch.int16, torch.float32])
def test_resampling_matches_grid_sample(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """The book's augmentation (mirroring, zoom, shifts, rotation) with borders repeated, as float64
    affine_grid + grid_sample compute it, for integer and float volumes, several channels, singleton axes."""
    volumes = _hu_volumes(shape, seed=sum(shape), dtype=dtype)
    generator = torch.Generator().manual_seed(3)
    affine = sample_affine_3d(shape[0], AugmentConfig.book(), generator, "cpu", shape[2:])
    affine[0, :, 3] = torch.tensor([1.5, -1.2, 0.9])  # one sample shifted far past the borders
    expected = resample.reference_resample_3d(volumes, affine)
    for device in _kernel_devices():
        got = resample.affine_resample_3d(volumes.to(device), affine.to(device))
        assert got.dtype == torch.float32 and got.shape == volumes.shape and got.device.type == device.type
        torch.testing.assert_close(got.cpu().double(), expected, rtol=0, atol=2e-3)


@needs_kernel
def test_the_identity_matrix_gives_the_volumes_back() -> None:
    volumes = _hu_volumes((2, 1, 4, 5, 6), seed=1)
    identity = torch.eye(3, 4).repeat(2, 1, 1)
    for device in _kernel_devices():
        got = resample.affine_resample_3d(volumes.to(device), identity.to(device)).cpu()
        torch.testing.assert_close(got, volumes.float(), rtol=0, atol=1e-3)


@needs_kernel
def test_noise_is_seeded_per_voxel_with_the_requested_spread() -> None:
    volumes = torch.zeros(4, 1, 10, 12, 14, dtype=torch.int16)
    identity = torch.eye(3, 4).repeat(4, 1, 1)
    for device in _kernel_devices():
        generator = torch.Generator(device=device).manual_seed(0)
        seed = resample.noise_seed(generator)
        assert seed.shape == (1,) and seed.dtype == torch.int64 and seed.device.type == device.type
        first = resample.affine_resample_3d(volumes.to(device), identity.to(device), 25.0, seed).cpu()
        again = resample.affine_resample_3d(volumes.to(device), identity.to(device), 25.0, seed).cpu()
        other = resample.affine_resample_3d(volumes.to(device), identity.to(device), 25.0,
                                            resample.noise_seed(generator)).cpu()
        assert torch.equal(first, again)
        assert not torch.allclose(first, other)
        assert not torch.allclose(first[0], first[1])  # each sample its own noise
        assert abs(float(first.mean())) < 1.5  # 6,720 draws: the mean's spread is about 0.3
        assert float(first.std()) == pytest.approx(25.0, rel=0.05)


def test_bad_arguments_are_refused() -> None:
    volumes = torch.zeros(2, 1, 3, 3, 3)
    with pytest.raises(ValueError, match="shapes"):
        resample.affine_resample_3d(volumes, torch.zeros(3, 3, 4))
    with pytest.raises(ValueError, match="seed"):
        resample.affine_resample_3d(volumes, torch.eye(3, 4).repeat(2, 1, 1), noise_sigma=1.0)


def test_runs_on_only_what_the_kernel_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    has_kernel = resample.kernels() is not None
    assert resample.runs_on(torch.zeros(1, 1, 2, 2, 2)) == (has_kernel and resample.interpreting())
    assert not resample.runs_on(torch.zeros(1, 2, 2, 2))
    assert not resample.runs_on(torch.zeros(0, 1, 2, 2, 2))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not resample.runs_on(torch.zeros(1, 1, 2, 2, 2))  # the CPU computes with torch's operators


@pytest.mark.parametrize("fault, errors, message", [
    (RuntimeError("no C compiler"), None, "does not run"),
    (None, (0.3, 0.0), "computes wrong on cpu (relative error 0.3"),
    (None, (0.0, 0.5), "noise off by 0.5"),
])
def test_a_kernel_that_fails_or_computes_wrong_is_not_used(monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture,
                                                           fault: Exception | None, errors: tuple[float, float],
                                                           message: str) -> None:
    def self_test(device: torch.device) -> tuple[float, float]:
        if fault is not None:
            raise fault
        return errors

    monkeypatch.setattr(resample, "_self_test_errors", self_test)
    resample.works_on.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="p2ch_luna.data.resample"):
            assert not resample.works_on(torch.device("cpu"))
    finally:
        resample.works_on.cache_clear()
    assert message in caplog.text and "torch's operators augment instead" in caplog.text


@needs_kernel
def test_the_self_test_passes_where_the_kernel_runs() -> None:
    for device in _kernel_devices():
        resample_error, noise_error = resample._self_test_errors(device)
        assert resample_error < resample.SELF_TEST_TOLERANCE and noise_error < resample.NOISE_TOLERANCE


def test_integer_batches_augment_as_their_float_copies_on_the_cpu() -> None:
    """On the CPU an int16 batch goes through torch's operators exactly as its float32 copy does."""
    volumes = _hu_volumes((3, 1, 6, 8, 8), seed=4)
    config = AugmentConfig.book()
    from_integers = augment_batch_3d(volumes, config, torch.Generator().manual_seed(9))
    from_floats = augment_batch_3d(volumes.float(), config, torch.Generator().manual_seed(9))
    assert from_integers.dtype == torch.float32
    assert torch.equal(from_integers, from_floats)
    assert torch.equal(augment_batch_3d(volumes, AugmentConfig.none(), torch.Generator()), volumes.float())


@pytest.mark.skipif(not torch.cuda.is_available() or resample.kernels() is None, reason="needs CUDA and Triton")
def test_integer_cuda_batches_take_the_fused_kernel() -> None:
    """augment_batch_3d on an int16 CUDA batch draws the same matrices as torch's path and resamples as it does;
    ``fused=False`` keeps torch's operators."""
    volumes = _hu_volumes((8, 1, 32, 48, 48), seed=5).cuda()
    config = dataclasses.replace(AugmentConfig.book(), noise=0.0, fused=True)
    fused = augment_batch_3d(volumes, config, torch.Generator(device="cuda").manual_seed(2))
    plain = augment_batch_3d(volumes, dataclasses.replace(config, fused=False),
                             torch.Generator(device="cuda").manual_seed(2))
    affine = sample_affine_3d(8, config, torch.Generator(device="cuda").manual_seed(2), "cuda", (32, 48, 48))
    torch.testing.assert_close(plain, apply_affine_3d(volumes.float(), affine), rtol=0, atol=0)
    torch.testing.assert_close(fused, plain, rtol=0, atol=2e-2)
