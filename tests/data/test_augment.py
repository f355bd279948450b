"""Tests for p2ch_luna.data.augment: affine sampling and application, 3D and 2D."""

from __future__ import annotations

import pytest
import torch

from p2ch_luna.data.augment import (
    AugmentConfig,
    add_noise,
    apply_affine_2d,
    apply_affine_3d,
    augment_batch_2d,
    augment_batch_3d,
    sample_affine_2d,
    sample_affine_3d,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def gaussian_blob(shape: tuple[int, ...], center: tuple[float, ...], sigma: float = 1.5) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.arange(size, dtype=torch.float32) for size in shape], indexing="ij")
    squared = sum((grid - c) ** 2 for grid, c in zip(grids, center))
    return torch.exp(-squared / (2 * sigma**2))


def center_of_mass(tensor: torch.Tensor) -> torch.Tensor:
    """Centre of mass of each (C=1) sample, in voxel indices: (B, spatial dims)."""
    spatial = tensor.shape[2:]
    grids = torch.meshgrid(*[torch.arange(size, dtype=torch.float32, device=tensor.device) for size in spatial],
                           indexing="ij")
    weights = tensor[:, 0].float()
    total = weights.flatten(1).sum(1)
    return torch.stack([(weights * grid).flatten(1).sum(1) / total for grid in grids], dim=1).cpu()


def generator(device: str, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@pytest.mark.parametrize("device", DEVICES)
def test_flip_twice_is_identity(device: str) -> None:
    volumes = torch.randn(6, 1, 4, 6, 8, device=device)
    affine = sample_affine_3d(6, AugmentConfig(flip=True), generator(device), device)
    flipped = apply_affine_3d(volumes, affine)
    assert not torch.allclose(flipped, volumes)
    torch.testing.assert_close(apply_affine_3d(flipped, affine), volumes, atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_rotation_keeps_centred_sphere_centred(device: str) -> None:
    shape = (8, 12, 16)
    center = tuple((size - 1) / 2 for size in shape)
    sphere = (gaussian_blob(shape, center, sigma=2.0) > 0.3).float()
    volumes = sphere.expand(5, 1, *shape).to(device)
    affine = sample_affine_3d(5, AugmentConfig(rotate=True), generator(device), device, shape)
    rotated = apply_affine_3d(volumes, affine)
    assert (center_of_mass(rotated) - torch.tensor(center)).abs().max() < 0.5


@pytest.mark.parametrize("device", DEVICES)
def test_rotation_keeps_voxel_distances_on_non_square_planes(device: str) -> None:
    shape = (1, 20, 32)
    plane_center = torch.tensor([(shape[1] - 1) / 2, (shape[2] - 1) / 2])
    blob_rc = (9.5, 22.0)
    volumes = gaussian_blob(shape, (0.0, *blob_rc)).expand(6, 1, *shape).to(device)
    affine = sample_affine_3d(6, AugmentConfig(rotate=True), generator(device, 3), device, shape)
    rotated_rc = center_of_mass(apply_affine_3d(volumes, affine))[:, 1:]
    radius = (torch.tensor(blob_rc) - plane_center).norm()
    torch.testing.assert_close((rotated_rc - plane_center).norm(dim=1), radius.expand(6), atol=0.5, rtol=0)
    assert (rotated_rc - torch.tensor(blob_rc)).norm(dim=1).max() > 3  # it did rotate


@pytest.mark.parametrize("device", DEVICES)
def test_offset_moves_blob_by_expected_voxels(device: str) -> None:
    shape = (16, 16, 16)
    center = (7.5, 7.5, 7.5)
    volumes = gaussian_blob(shape, center).expand(4, 1, *shape).to(device)
    affine = sample_affine_3d(4, AugmentConfig(offset=0.3), generator(device), device)
    translation_xyz = affine[:, :, 3].cpu()
    assert translation_xyz.abs().max() > 0.1  # the book's augment3d offset was always zero
    moved = apply_affine_3d(volumes, affine)
    expected_shift_irc = -translation_xyz.flip(1) * torch.tensor(shape) / 2
    torch.testing.assert_close(center_of_mass(moved) - torch.tensor(center), expected_shift_irc, atol=0.1, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_scale_changes_blob_size_by_the_sampled_factor(device: str) -> None:
    shape = (16, 16, 16)
    sphere = (gaussian_blob(shape, (7.5, 7.5, 7.5), sigma=2.0) > 0.3).float()
    volumes = sphere.expand(6, 1, *shape).to(device)
    affine = sample_affine_3d(6, AugmentConfig(scale=0.2), generator(device), device)
    scaled = apply_affine_3d(volumes, affine)
    # affine maps output to input, so volume grows by 1 / det(affine).
    expected_ratio = 1 / torch.linalg.det(affine[:, :, :3].cpu())
    ratio = scaled.flatten(1).sum(1).cpu() / sphere.sum()
    torch.testing.assert_close(ratio, expected_ratio, rtol=0.1, atol=0)
    assert expected_ratio.max() > 1.05 and expected_ratio.min() < 0.95


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_augmentation(device: str) -> None:
    batch = torch.randn(3, 1, 4, 6, 6, device=device)
    first = augment_batch_3d(batch, AugmentConfig.book(), generator(device, 7))
    again = augment_batch_3d(batch, AugmentConfig.book(), generator(device, 7))
    other = augment_batch_3d(batch, AugmentConfig.book(), generator(device, 8))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_none_config_leaves_batch_unchanged() -> None:
    batch = torch.randn(2, 1, 4, 6, 6)
    assert torch.equal(augment_batch_3d(batch, AugmentConfig.none(), generator("cpu")), batch)


def test_noise_has_requested_sigma() -> None:
    noisy = add_noise(torch.zeros(10_000), 25.0, generator("cpu"))
    assert 24.0 < noisy.std().item() < 26.0


@pytest.mark.parametrize("device", DEVICES)
def test_2d_mask_follows_image(device: str) -> None:
    shape = (24, 40)
    image = gaussian_blob(shape, (8.0, 27.0), sigma=2.0).expand(6, 1, *shape).to(device) * 1000
    mask = image > 300
    config = AugmentConfig(flip=True, offset=0.1, scale=0.2, rotate=True)
    out_images, out_masks = augment_batch_2d(image, mask, config, generator(device))
    assert out_masks.dtype == torch.bool and out_masks.shape == mask.shape
    assert not torch.equal(out_masks, mask)
    torch.testing.assert_close(center_of_mass(out_masks), center_of_mass(out_images), atol=0.5, rtol=0)


def test_2d_noise_only_on_images() -> None:
    images = torch.zeros(2, 1, 8, 8)
    masks = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    masks[:, :, 2:5, 3:6] = True
    out_images, out_masks = augment_batch_2d(images, masks, AugmentConfig(noise=25.0), generator("cpu"))
    assert out_images.std() > 10
    assert torch.equal(out_masks, masks)


def test_2d_affine_shapes_and_apply() -> None:
    affine = sample_affine_2d(3, AugmentConfig.book_segmentation(), generator("cpu"), "cpu", (5, 7))
    assert affine.shape == (3, 2, 3)
    assert apply_affine_2d(torch.randn(3, 2, 5, 7), affine).shape == (3, 2, 5, 7)
    with pytest.raises(ValueError):
        apply_affine_2d(torch.randn(3, 2, 5, 7), affine, mode="bicubic")
