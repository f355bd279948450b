"""Tests for p2ch_luna.synth: LUNA16-format files, geometry, determinism, difficulty."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import ndimage

from p2ch_luna.data.luna import read_candidate_table
from p2ch_luna.io.ct import load_ct
from p2ch_luna.synth import generator as synth
from p2ch_luna.synth.nodules import nodule_draft
from p2ch_luna.synth.parameters import FLIPPED_DIRECTIONS, MALIGNANCY_COLUMNS, OUTSIDE_FOV_HU, UID_PREFIX
from p2ch_luna.synth.series import make_series
from p2ch_luna.synth.writer import SeriesInfo, write_series

SHAPE = (96, 96)
SLICES = (40, 50)
SOLID_MIN_HU = -700
GROUND_GLASS_MIN_HU = -800
VESSEL_THRESHOLD_HU = -400


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SeriesInfo]]:
    root = tmp_path_factory.mktemp("synth")
    infos = synth.generate_dataset(root, series=4, seed=0, subsets=2, shape=SHAPE, slices=SLICES,
                                   progress=False)
    return root, infos


def _centre_hu(image: sitk.Image, xyz: tuple[float, float, float]) -> int:
    col, row, index = np.rint(image.TransformPhysicalPointToContinuousIndex(xyz)).astype(int)
    size = image.GetSize()
    assert 0 <= col < size[0] and 0 <= row < size[1] and 0 <= index < size[2], xyz
    return int(sitk.GetArrayViewFromImage(image)[index, row, col])


def _min_hu(texture: str) -> int:
    return SOLID_MIN_HU if texture == "solid" else GROUND_GLASS_MIN_HU


def test_layout_and_images_load_with_geometry(dataset) -> None:
    root, infos = dataset
    assert sorted(p.name for p in root.glob("subset*")) == ["subset0", "subset1"]
    assert [info.subset for info in infos] == [0, 1, 0, 1]
    for info in infos:
        assert info.series_uid.startswith(UID_PREFIX)
        assert info.path == root / f"subset{info.subset}" / f"{info.series_uid}.mhd"
        header = info.path.read_text()
        assert "ElementType = MET_SHORT" in header and "CompressedData = False" in header
        image = sitk.ReadImage(str(info.path))
        assert image.GetPixelID() == sitk.sitkInt16
        assert image.GetSize()[:2] == SHAPE[::-1] and SLICES[0] <= image.GetSize()[2] <= SLICES[1]
        assert np.allclose(image.GetSpacing(), info.geometry.spacing_xyz)
        assert np.allclose(image.GetOrigin(), info.geometry.origin_xyz)
        assert np.allclose(np.reshape(image.GetDirection(), (3, 3)), info.geometry.direction)
        spacing = image.GetSpacing()
        assert 0.55 <= spacing[0] == spacing[1] <= 0.9 and 0.7 <= spacing[2] <= 2.5
        hu = sitk.GetArrayViewFromImage(image)
        assert hu.min() in OUTSIDE_FOV_HU and hu.max() >= 300  # scanner circle, bone


def test_every_fourth_series_is_flipped(dataset) -> None:
    _, infos = dataset
    signs = [tuple(np.diag(info.geometry.direction).astype(int)) for info in infos]
    assert signs == [(1, 1, 1)] * 3 + [FLIPPED_DIRECTIONS[0]]


def test_csv_columns_match_luna16(dataset) -> None:
    root, infos = dataset
    assert (root / "annotations.csv").read_text().splitlines()[0] == "seriesuid,coordX,coordY,coordZ,diameter_mm"
    assert (root / "candidates.csv").read_text().splitlines()[0] == "seriesuid,coordX,coordY,coordZ,class"
    malignancy = pd.read_csv(root / "annotations_with_malignancy.csv")
    assert list(malignancy.columns) == list(MALIGNANCY_COLUMNS)
    assert malignancy["mal_bool"].dtype == bool
    for details, length, label in zip(malignancy["mal_details"], malignancy["len_mal_details"],
                                      malignancy["mal_bool"]):
        scores = ast.literal_eval(details)
        assert len(scores) == length and all(1 <= s <= 5 for s in scores)
        assert label == (sum(s >= 4 for s in scores) >= 2)
    assert len(malignancy) == sum(len(info.nodules) for info in infos)


def test_annotations_map_onto_nodules(dataset) -> None:
    root, infos = dataset
    annotations = pd.read_csv(root / "annotations.csv")
    by_uid = {info.series_uid: info for info in infos}
    assert len(annotations) == sum(len(info.nodules) for info in infos) > 0
    for uid, rows in annotations.groupby("seriesuid"):
        info = by_uid[uid]
        image = sitk.ReadImage(str(info.path))
        for (_, row), nodule in zip(rows.iterrows(), info.nodules):
            assert row.diameter_mm == pytest.approx(nodule.diameter_mm, abs=1e-5)
            assert 3.0 <= row.diameter_mm <= 30.0
            assert _centre_hu(image, (row.coordX, row.coordY, row.coordZ)) > _min_hu(nodule.texture)


def test_candidates_surround_nodules_and_include_many_negatives(dataset) -> None:
    root, infos = dataset
    candidates = pd.read_csv(root / "candidates.csv")
    annotations = pd.read_csv(root / "annotations.csv")
    for info in infos:
        rows = candidates[candidates.seriesuid == info.series_uid]
        assert (rows["class"] == 0).sum() >= 100
        positives = rows.loc[rows["class"] == 1, ["coordX", "coordY", "coordZ"]].to_numpy()
        centres = annotations.loc[annotations.seriesuid == info.series_uid,
                                  ["coordX", "coordY", "coordZ"]].to_numpy()
        assert len(positives) >= len(centres)
        for point in positives:
            assert np.linalg.norm(centres - point, axis=1).min() < 6.0
        negatives = rows.loc[rows["class"] == 0, ["coordX", "coordY", "coordZ"]].to_numpy()
        irc = info.geometry.xyz_to_irc(negatives)
        assert info.geometry.contains_irc(irc).all()
        kinds = {c.kind for c in info.candidates}
        assert {"vessel", "junction", "entry", "wall", "lung"} <= kinds


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    runs = [tmp_path / "a", tmp_path / "b"]
    for root in runs:
        synth.generate_dataset(root, series=2, seed=7, subsets=1, shape=(64, 64), slices=(24, 30), progress=False)
    files = sorted(p.relative_to(runs[0]) for p in runs[0].rglob("*") if p.is_file())
    assert len(files) == 7  # 2 x (.mhd + .raw) + 3 CSVs
    for name in files:
        assert (runs[0] / name).read_bytes() == (runs[1] / name).read_bytes(), name
    other = tmp_path / "c"
    synth.generate_dataset(other, series=2, seed=8, subsets=1, shape=(64, 64), slices=(24, 30), progress=False)
    assert (other / "candidates.csv").read_bytes() != (runs[0] / "candidates.csv").read_bytes()


@pytest.mark.parametrize("flip", FLIPPED_DIRECTIONS)
def test_flipped_series_maps_annotations_onto_nodules(tmp_path: Path, flip: tuple[int, int, int]) -> None:
    series = make_series(np.random.default_rng(3), SHAPE, 44, flip=flip, n_nodules=3)
    assert series.nodules
    path = tmp_path / "flipped.mhd"
    write_series(series, path)
    image = sitk.ReadImage(str(path))
    assert np.allclose(np.diag(np.reshape(image.GetDirection(), (3, 3))), flip)
    for nodule in series.nodules:
        assert _centre_hu(image, nodule.center_xyz) > _min_hu(nodule.texture)
        assert np.allclose(image.TransformContinuousIndexToPhysicalPoint(nodule.center_irc[::-1]),
                           nodule.center_xyz, atol=1e-4)
        # A reader that ignored the direction would look somewhere else entirely.
        wrong = (np.asarray(nodule.center_xyz) - image.GetOrigin()) / image.GetSpacing()
        assert np.abs(wrong - nodule.center_irc[::-1]).max() > 5


def test_threshold_finds_vessels_as_well_as_nodules() -> None:
    series = make_series(np.random.default_rng(1), (128, 128), 48, n_nodules=2)
    bright = (series.hu > VESSEL_THRESHOLD_HU) & series.lung_mask
    labels, count = ndimage.label(bright)
    nodule_labels = {labels[tuple(np.rint(n.center_irc).astype(int))] for n in series.nodules} - {0}
    assert len(nodule_labels) == len(series.nodules) > 0  # the threshold does find the nodules
    vessel_components = count - len(nodule_labels)
    assert vessel_components > 3 * len(series.nodules)


def test_lungs_are_walled_off_from_outside_air() -> None:
    series = make_series(np.random.default_rng(2), SHAPE, 40, n_nodules=0)
    labels, _ = ndimage.label(series.hu < VESSEL_THRESHOLD_HU)
    outside = labels[0, 0, 0]
    assert outside != 0
    assert not np.any(labels[series.lung_mask] == outside)
    lung_hu = series.hu[series.lung_mask]
    assert -900 < np.median(lung_hu) < -800


def test_malignancy_rises_with_size_and_margin() -> None:
    rng = np.random.default_rng(0)
    drafts = [nodule_draft(rng, np.zeros(3), d, "isolated") for d in rng.uniform(3, 25, 2000)]
    diameters = np.array([d.diameter_mm for d in drafts])
    malignant = np.array([d.latent_malignant for d in drafts])
    lobulation = np.array([d.lobulation for d in drafts])
    assert malignant[diameters < 6].mean() < 0.15 < 0.85 < malignant[diameters > 15].mean()
    assert lobulation[malignant].mean() > 2 * lobulation[~malignant].mean()


def test_loads_through_package_readers(dataset) -> None:
    root, infos = dataset
    table = read_candidate_table(root)
    assert set(table["series_uid"]) == {info.series_uid for info in infos}
    nodule_centres = table.loc[table["is_nodule"], ["center_x", "center_y", "center_z"]].to_numpy()
    for info in infos:
        for nodule in info.nodules:
            assert np.abs(nodule_centres - nodule.center_xyz).max(axis=1).min() < 1e-3
    flipped = infos[3]
    ct = load_ct(flipped.path)
    assert np.allclose(ct.geometry.direction, flipped.geometry.direction)
    for nodule in flipped.nodules:
        index = tuple(ct.geometry.xyz_to_irc(nodule.center_xyz))
        assert ct.hu[index] > _min_hu(nodule.texture)


def test_command_line(tmp_path: Path) -> None:
    argv = [str(tmp_path), "--series", "1", "--shape", "48", "48", "--slices", "20", "20"]
    assert synth.main(argv) == 0
    assert len(list(tmp_path.glob("subset0/*.mhd"))) == 1
    assert synth.main(argv) == 2  # refuses to overwrite silently
    assert synth.main([*argv, "--overwrite", "--seed", "1"]) == 0
    assert len(list(tmp_path.glob("subset0/*.mhd"))) == 1
    assert synth.main([str(tmp_path / "x"), "--shape", "8", "8", "--series", "1"]) == 2
