"""Implanted nodules: partial-volume spheres, sites with room, the LUNA16 folder they are written to."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from p2ch_luna.data.luna import read_candidate_table
from p2ch_luna.diagnose.lungs import find_lungs
from p2ch_luna.errors import DataError, UsageError
from p2ch_luna.io.ct import Ct, list_series_on_disk, load_ct, write_metaimage
from p2ch_luna.synth import implant
from p2ch_luna.synth.series import make_series


@pytest.mark.parametrize("radius, center, spacing", [
    (3.0, (20.0, 20.0, 20.0), (2.5, 0.7, 0.7)),
    (5.0, (20.3, 19.6, 20.45), (1.25, 0.6, 0.8)),
    (8.0, (20.0, 20.5, 20.0), (0.7, 0.7, 0.7)),
])
def test_sphere_fraction_holds_the_sphere_volume(radius: float, center, spacing) -> None:
    box, fraction = implant.sphere_fraction(center, radius, spacing, (60, 80, 80))
    assert fraction.shape == tuple(s.stop - s.start for s in box)
    assert fraction.min() >= 0.0 and fraction.max() <= 1.0
    volume = fraction.sum() * np.prod(spacing)
    assert volume == pytest.approx(4.0 / 3.0 * np.pi * radius**3, rel=0.02)
    centre = tuple(int(round(c)) - s.start for c, s in zip(center, box))
    assert fraction[centre] == 1.0
    assert fraction[0, 0, 0] == 0.0 and fraction[-1, -1, -1] == 0.0  # the box reaches past the sphere


def test_sphere_fraction_box_is_clipped_at_the_array_edge() -> None:
    box, fraction = implant.sphere_fraction((0.0, 10.0, 10.0), 3.0, (1.0, 1.0, 1.0), (20, 20, 20))
    assert box[0].start == 0 and fraction.shape[0] == box[0].stop
    # What lies inside the array is the sphere above the index axis' first voxel edge, z = -0.5.
    inside = np.pi * ((9.0 * 3.0 - 3.0**3 / 3.0) - (9.0 * -0.5 - (-0.5) ** 3 / 3.0))
    assert fraction.sum() == pytest.approx(inside, rel=0.02)


def test_implant_sphere_raises_the_sphere_and_keeps_the_noise() -> None:
    rng = np.random.default_rng(0)
    hu = np.rint(rng.normal(-850.0, 30.0, (40, 64, 64))).astype(np.int16)
    before = hu.copy()
    implant.implant_sphere(hu, (20, 32, 32), 8.0, (1.0, 1.0, 1.0), 40.0)
    assert hu.dtype == np.int16
    core = (slice(16, 25), slice(28, 37), slice(28, 37))  # well inside the sphere: fraction 1
    assert hu[core].mean() == pytest.approx(40.0, abs=10.0)
    assert np.std(hu[core].astype(float) - before[core]) < 1.0  # one shift: the noise is the CT's own
    assert np.std(hu[core]) == pytest.approx(np.std(before[core]), rel=0.01)
    changed = np.argwhere(hu != before)
    distances = np.linalg.norm(changed - [20, 32, 32], axis=1)
    assert distances.max() < 8.0 + np.sqrt(3) / 2 + 1e-9  # only voxels that the sphere touches


def test_implant_sphere_on_the_wall_only_raises_the_denser_tissue_towards_the_nodule() -> None:
    hu = np.full((30, 40, 40), -850, dtype=np.int16)
    hu[:, :, 20:] = 40  # chest wall muscle
    hu[:, :, 26:] = -100  # fat
    hu[15, 20, 23] = 500  # a rib voxel
    before = hu.copy()
    implant.implant_sphere(hu, (15, 20, 18), 9.0, (1.0, 1.0, 1.0), 40.0)
    assert hu[15, 20, 12] == 40 and hu[15, 20, 21] == 40  # lung raised to the nodule; muscle unchanged
    assert hu[15, 20, 23] == 500  # never lowered
    assert hu[15, 20, 26] == 40  # fat inside the sphere becomes nodule
    assert -100 < hu[15, 20, 27] < 40  # fat on the sphere's edge: partly
    assert (hu[:, :, 20:] >= before[:, :, 20:]).all() and (hu[:, :, 20:] <= 500).all()


def _lung_box(shape: tuple[int, int, int], inner: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray]:
    """HU of parenchyma (-850) everywhere and a lung label over ``inner``."""
    hu = np.full(shape, -850, dtype=np.int16)
    labels = np.zeros(shape, dtype=np.int32)
    labels[inner] = 1
    return hu, labels


def _whole(room: implant.Room, values: np.ndarray) -> np.ndarray:
    """A map of ``room`` (over the lungs' box) placed in an array that reaches the box's far corner."""
    whole = np.zeros(tuple(s.stop for s in room.box), dtype=values.dtype)
    whole[room.box] = values
    return whole


def test_clearance_counts_to_dense_tissue_and_to_the_lung_edge() -> None:
    hu, labels = _lung_box((30, 40, 40), (slice(5, 25), slice(5, 35), slice(5, 35)))
    hu[15, 20, 28] = 50  # a vessel voxel
    room = implant.Room(hu, labels, (2.0, 1.0, 1.0))
    clearance = _whole(room, room.parenchyma_clearance)
    assert clearance[4, 4, 4] == 0.0 and clearance[15, 20, 28] == 0.0
    assert clearance[15, 20, 20] == pytest.approx(8.0)  # 8 voxels of 1 mm to the vessel
    assert clearance[15, 20, 10] == pytest.approx(6.0)  # 6 voxels to the lung's edge at column 4
    assert clearance[6, 20, 20] == pytest.approx(4.0)  # 2 slices of 2 mm to the edge at index 4
    wall = _whole(room, room.wall_depth)
    assert wall[15, 20, 20] == pytest.approx(15.0) and wall[15, 20, 28] == pytest.approx(7.0)
    vessels = _whole(room, room.vessel_clearance)
    assert vessels[15, 20, 28] == 0.0 and vessels[15, 20, 20] == pytest.approx(8.0)


def test_pleural_sites_straddle_the_lung_edge_away_from_vessels() -> None:
    hu, labels = _lung_box((40, 60, 60), (slice(5, 35), slice(5, 55), slice(5, 55)))
    hu[20, 30, 48] = 50  # a vessel near one wall
    hu[5:35, 5, 5:55] = 0  # the pleura: dense, but on the rim, so not a vessel
    room = implant.Room(hu, labels, (1.0, 1.0, 1.0))
    sites = room.sites(10.0, "pleural", margin_mm=2.0)
    assert len(sites) > 0
    wall = _whole(room, room.wall_depth)[tuple(sites.T)]
    assert wall.min() >= 0.4 * 5.0 and wall.max() <= 0.7 * 5.0
    assert np.linalg.norm(sites - [20, 30, 48], axis=1).min() >= 5.0 + 2.0
    assert any(site[1] < 10 for site in sites)  # the dense rim at row 5 does not rule out that wall
    assert len(room.sites(10.0, "isolated", margin_mm=2.0)) > 0
    with pytest.raises(ValueError, match="placement"):
        room.sites(10.0, "floating", margin_mm=2.0)


def test_vascular_sites_engulf_part_of_a_vessel_inside_the_lung() -> None:
    hu, labels = _lung_box((40, 60, 60), (slice(2, 38), slice(2, 58), slice(2, 58)))
    hu[20, 30, 10:50] = 60  # a vessel along the columns
    room = implant.Room(hu, labels, (1.0, 1.0, 1.0))
    sites = room.sites(10.0, "vascular", margin_mm=2.0)
    assert len(sites) > 0
    nearest = np.stack([np.full(len(sites), 20), np.full(len(sites), 30), np.clip(sites[:, 2], 10, 49)], axis=1)
    to_vessel = np.linalg.norm(sites - nearest, axis=1)
    assert to_vessel.min() >= 0.5 * 5.0 and to_vessel.max() <= 0.9 * 5.0
    assert _whole(room, room.wall_depth)[tuple(sites.T)].min() >= 5.0 + 2.0
    with pytest.raises(DataError, match="no room on a vessel for a 40 mm nodule"):
        implant.choose_sites(room, [40.0], ["vascular"], np.random.default_rng(0), margin_mm=2.0)


def test_sites_have_room_keep_apart_and_repeat_with_the_seed() -> None:
    hu, labels = _lung_box((50, 90, 90), (slice(2, 48), slice(2, 88), slice(2, 88)))
    room = implant.Room(hu, labels, (1.0, 1.0, 1.0))
    diameters, placements = [4.0, 8.0, 6.0], ["isolated", "pleural", "isolated"]
    sites = implant.choose_sites(room, diameters, placements, np.random.default_rng(1), margin_mm=2.0)
    assert sites == implant.choose_sites(room, diameters, placements, np.random.default_rng(1), margin_mm=2.0)
    assert sites != implant.choose_sites(room, diameters, placements, np.random.default_rng(2), margin_mm=2.0)
    clearance = _whole(room, room.parenchyma_clearance)
    wall = _whole(room, room.wall_depth)
    for site, diameter, placement in zip(sites, diameters, placements):
        if placement == "isolated":
            assert clearance[site] >= diameter / 2 + 2.0
        else:
            assert 0.4 * diameter / 2 <= wall[site] <= 0.7 * diameter / 2
    for a in range(3):
        for b in range(a + 1, 3):
            gap = np.linalg.norm(np.subtract(sites[a], sites[b])) - (diameters[a] + diameters[b]) / 2
            assert gap >= implant.SEPARATION_MM


def test_no_room_is_a_data_error_that_says_what_fits() -> None:
    hu, labels = _lung_box((20, 20, 20), (slice(1, 19), slice(1, 19), slice(1, 19)))
    room = implant.Room(hu, labels, (1.0, 1.0, 1.0))  # the deepest voxel is 9 mm from the edge
    with pytest.raises(DataError, match=r"12 mm nodule.*at most 8\.0 mm fits with --clearance 5"):
        implant.choose_sites(room, [12.0], ["isolated"], np.random.default_rng(0), margin_mm=5.0)
    hu[10, 10, 10] = 50  # a vessel in the middle: no edge voxel is 20 mm from it
    room = implant.Room(hu, labels, (1.0, 1.0, 1.0))
    with pytest.raises(DataError, match=r"no room on the pleura for a 30 mm nodule"):
        implant.choose_sites(room, [30.0], ["pleural"], np.random.default_rng(0), margin_mm=5.0)


@pytest.fixture(scope="module")
def small_ct() -> Ct:
    """A synthetic chest CT without nodules, stored with a flipped index axis."""
    series = make_series(np.random.default_rng(3), (128, 128), 48, flip=(1, 1, -1), n_nodules=0)
    return Ct(hu=series.hu, geometry=series.geometry, series_uid="1.2.826.0.1.3680043.8.498.1")


def test_implanted_nodules_sit_in_the_lungs_where_the_annotations_say(small_ct: Ct) -> None:
    implanted, nodules = implant.implant_nodules(small_ct, [3.0, 5.0], nodule_hu=40.0, seed=0, clearance_mm=2.0)
    assert implanted.series_uid.startswith("2.25.") and implanted.series_uid != small_ct.series_uid
    assert implanted.series_uid == implant.implant_nodules(small_ct, [3.0, 5.0], 40.0, 0, 2.0)[0].series_uid
    assert implanted.geometry is small_ct.geometry
    lungs = find_lungs(small_ct.hu, tuple(small_ct.geometry.spacing_irc))
    untouched = np.ones(small_ct.shape, dtype=bool)
    for nodule in nodules:
        irc = small_ct.geometry.xyz_to_irc(nodule.center_xyz)  # the annotation's world centre maps back
        assert tuple(irc) == nodule.center_irc
        assert lungs.labels[tuple(irc)] > 0
        assert implanted.hu[tuple(irc)] > 0 > small_ct.hu[tuple(irc)]
        box, _ = implant.sphere_fraction(irc, nodule.diameter_mm / 2, small_ct.geometry.spacing_irc,
                                         small_ct.shape)
        untouched[box] = False
    assert np.array_equal(implanted.hu[untouched], small_ct.hu[untouched])


@pytest.mark.parametrize("arguments, message", [
    (dict(diameters_mm=[]), "at least one"),
    (dict(diameters_mm=[4.0, 0.0]), "positive"),
    (dict(diameters_mm=[float("nan")]), "positive"),
    (dict(diameters_mm=[4.0], nodule_hu=-900.0), "--hu must be above -800"),
    (dict(diameters_mm=[4.0], clearance_mm=-1.0), "--clearance"),
    (dict(diameters_mm=[4.0, 5.0, 6.0], placements=["isolated", "pleural"]), "--placement needs one value or one per "
                                                                              "diameter \\(3\\), got 2"),
    (dict(diameters_mm=[4.0, 5.0], nodule_hu=[40.0, -600.0, 0.0]), "--hu needs one value or one per diameter"),
    (dict(diameters_mm=[4.0, 5.0], nodule_hu=[40.0, -900.0]), "--hu must be above -800 HU.*got -900"),
    (dict(diameters_mm=[4.0], placements=["floating"]), "--placement must be one of isolated, pleural, vascular"),
])
def test_bad_arguments_are_usage_errors(small_ct: Ct, arguments: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        implant.implant_nodules(small_ct, **arguments)


def test_command_adds_a_loadable_series_and_replaces_only_its_own_rows(small_ct: Ct, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "source.mhd"
    write_metaimage(np.asarray(small_ct.hu), small_ct.geometry, source)
    out = tmp_path / "out"
    out.mkdir()
    other_row = "1.2.3.other,-128.6994211,-175.3192718,-298.3875064,5.651470635"
    (out / "annotations.csv").write_text(f"seriesuid,coordX,coordY,coordZ,diameter_mm\n{other_row}\n")
    arguments = [str(source), str(out), "--diameters", "3", "5", "--clearance", "2"]
    assert implant.main(arguments) == 0
    assert implant.main(arguments) == 0  # the same implant again: its rows are replaced, not added
    assert implant.main([*arguments, "--seed", "1"]) == 0  # another implant: a second series
    printed = capsys.readouterr().out
    series = list_series_on_disk(out)
    assert len(series) == 2 and all(f"--series-uid {uid}" in printed for uid in series)
    annotations = pd.read_csv(out / "annotations.csv", dtype={"seriesuid": str})
    candidates = pd.read_csv(out / "candidates.csv", dtype={"seriesuid": str})
    assert (out / "annotations.csv").read_text().splitlines()[1] == other_row  # kept, digit for digit
    assert sorted(annotations["seriesuid"].value_counts().tolist()) == [1, 2, 2]
    classes = [line.rsplit(",", 1)[1] for line in (out / "candidates.csv").read_text().splitlines()[1:]]
    assert candidates["class"].tolist() == [1, 1, 1, 1] and classes == ["1", "1", "1", "1"]  # written as integers
    for uid, path in series.items():
        ct = load_ct(path)
        assert np.array_equal(ct.geometry.affine, small_ct.geometry.affine)
        rows = annotations[annotations["seriesuid"] == uid]
        irc = ct.geometry.xyz_to_irc(rows[["coordX", "coordY", "coordZ"]].to_numpy())
        assert (ct.hu[tuple(irc.T)] > 0).all()  # each annotation's centre is on its nodule


def test_arguments_are_checked_before_the_ct_is_read(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert implant.main([str(tmp_path / "missing.mhd"), str(tmp_path / "out"), "--diameters", "0"]) == 2
    assert "--diameters must be positive" in capsys.readouterr().err.strip().splitlines()[-1]


def test_an_unwritable_output_folder_is_one_line(small_ct: Ct, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "source.mhd"
    write_metaimage(np.asarray(small_ct.hu), small_ct.geometry, source)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    assert implant.main([str(source), str(blocked / "out"), "--diameters", "3", "--clearance", "2"]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("python -m p2ch_luna.implant: error: could not write ") and "subset0" in error[-1]
    assert "Traceback" not in "\n".join(error) and blocked.read_text() == "not a folder"


def test_the_source_cts_own_nodules_stay_annotated(small_ct: Ct, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "source.mhd"  # a LUNA16 series: its UID is the file's name
    write_metaimage(np.asarray(small_ct.hu), small_ct.geometry, source)
    own = tmp_path / "annotations.csv"
    own.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\nsource,1.5,2.5,3.5,7.25\nother,0,0,0,9\n")
    out = tmp_path / "out"
    assert implant.main([str(source), str(out), "--diameters", "3", "--clearance", "2", "--annotations", str(own)]) == 0
    rows = pd.read_csv(out / "annotations.csv")
    assert len(rows) == 2 and rows["seriesuid"].nunique() == 1 and rows["seriesuid"][0].startswith("2.25.")
    assert rows.iloc[1][["coordX", "coordY", "coordZ", "diameter_mm"]].tolist() == [1.5, 2.5, 3.5, 7.25]
    assert len(pd.read_csv(out / "candidates.csv")) == 2
    own.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\nother,0,0,0,9\n")
    assert implant.main([str(source), str(out), "--diameters", "3", "--clearance", "2", "--annotations", str(own)]) == 0
    assert "has no rows of series source" in capsys.readouterr().err
    assert len(pd.read_csv(out / "annotations.csv")) == 1  # the rerun replaced the series' rows


@pytest.mark.parametrize("arguments, code, message", [
    (["--diameters", "0"], 2, "--diameters must be positive"),
    (["--hu", "-1000"], 2, "--hu must be above"),
    (["--diameters", "40"], 1, "no room in the lungs for a 40 mm nodule"),
])
def test_command_errors_are_one_line_and_write_nothing(small_ct: Ct, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                       arguments: list[str], code: int, message: str) -> None:
    source = tmp_path / "source.mhd"
    write_metaimage(np.asarray(small_ct.hu), small_ct.geometry, source)
    out = tmp_path / "out"
    assert implant.main([str(source), str(out), *arguments]) == code
    error = capsys.readouterr().err.strip().splitlines()
    assert message in error[-1] and "Traceback" not in "\n".join(error)
    assert not out.exists()


def test_a_luna16_folder_gets_its_candidates_v2_rows(small_ct: Ct, tmp_path: Path) -> None:
    """Training reads ``candidates_V2.csv`` before ``candidates.csv``: implanting into a LUNA16 copy adds rows there."""
    source = tmp_path / "source.mhd"
    write_metaimage(np.asarray(small_ct.hu), small_ct.geometry, source)
    out = tmp_path / "luna"
    out.mkdir()
    (out / "candidates_V2.csv").write_text("seriesuid,coordX,coordY,coordZ,class\nother,1.25,2.5,-3.75,0\n")
    assert implant.main([str(source), str(out), "--diameters", "3", "--clearance", "2"]) == 0
    assert not (out / "candidates.csv").exists()
    rows = pd.read_csv(out / "candidates_V2.csv", dtype={"seriesuid": str})
    assert rows["seriesuid"].tolist()[0] == "other" and rows["class"].tolist() == [0, 1]
    assert rows.iloc[0][["coordX", "coordY", "coordZ"]].tolist() == [1.25, 2.5, -3.75]
    table = read_candidate_table(out)  # "other" is not on disk
    candidates = table[table["source"] == "candidate"]
    assert candidates["is_nodule"].tolist() == [True] and candidates["series_uid"].iloc[0].startswith("2.25.")
