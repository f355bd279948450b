"""Tests for p2ch_luna.io.ct: readers (MetaImage, NIfTI, DICOM), geometry, chunks and bad inputs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2ch_luna.errors import DataError
from p2ch_luna.geometry import Geometry
from p2ch_luna.io.ct import (
    HU_MAX,
    HU_MIN,
    MIN_SLICES,
    Ct,
    extract_chunk,
    find_series_path,
    list_series_on_disk,
    load_ct,
    read_geometry,
)
from p2ch_luna.io.metaimage import read_metaimage_header

CPTAC_SHAPE = (99, 512, 512)
CPTAC_SPACING = (0.564453125, 0.564453125, 3.0)
SECOND_SERIES_UID = "1.2.826.0.1.3680043.2.1125.99.1"
FLIPPED_PERMUTED = np.array([[0.0, -1.0, 0.0],
                             [0.0, 0.0, 1.0],
                             [-1.0, 0.0, 0.0]])


# ---------------------------------------------------------------------------
# Helpers


def write_mhd(folder: Path, array: np.ndarray, name: str = "ct", spacing=(0.7, 0.8, 2.5),
              origin=(-50.0, -60.0, -70.0), direction=np.eye(3)) -> Path:
    """Write ``array`` (I, R, C) as ``folder/name.mhd`` + ``.raw`` with SimpleITK."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetDirection(tuple(float(v) for v in np.asarray(direction).ravel()))
    path = folder / f"{name}.mhd"
    sitk.WriteImage(image, str(path))
    return path


def small_volume(shape=(6, 8, 10), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1000, size=shape, dtype=np.int16)


def edit_header(path: Path, key: str, value: str) -> None:
    lines = [f"{key} = {value}" if line.split("=")[0].strip() == key else line
             for line in path.read_text().splitlines()]
    path.write_text("\n".join(lines) + "\n")


def write_dicom_series(folder: Path, series_uid: str, slices: int = 5, size: int = 16) -> np.ndarray:
    """A tiny axial CT series written slice by slice with SimpleITK's DICOM writer."""
    array = (np.arange(slices * size * size).reshape(slices, size, size) % 200 - 100).astype(np.int16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(slices):
        image = sitk.GetImageFromArray(array[k])
        image.SetSpacing((0.7, 0.7))
        tags = {
            "0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.99", "0020|000e": series_uid, "0020|0013": str(k + 1),
            "0020|0032": f"-10\\-20\\{k * 2.5}", "0020|0037": "1\\0\\0\\0\\1\\0", "0018|0050": "2.5",
        }
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"extra{k:03d}.dcm"))
        writer.Execute(image)
    return array


# ---------------------------------------------------------------------------
# The real CPTAC chest CT (DICOM)


@pytest.fixture(scope="module")
def cptac_ct(cptac_dir: Path) -> Ct:
    return load_ct(cptac_dir)


@pytest.fixture(scope="module")
def cptac_sitk(cptac_dir: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(cptac_dir)))
    return reader.Execute()


def test_real_ct_shape_spacing_and_orientation(cptac_ct: Ct, cptac_dir: Path) -> None:
    assert cptac_ct.shape == CPTAC_SHAPE
    assert cptac_ct.hu.shape == CPTAC_SHAPE and cptac_ct.hu.dtype == np.int16
    np.testing.assert_allclose(cptac_ct.geometry.spacing_xyz, CPTAC_SPACING, atol=1e-4)
    np.testing.assert_allclose(cptac_ct.geometry.direction, np.eye(3), atol=1e-6)
    assert cptac_ct.series_uid.startswith("1.3.6.1.4.1.14519")
    assert cptac_ct.source == cptac_dir
    assert not cptac_ct.hu.flags.writeable


def test_real_ct_hounsfield_range(cptac_ct: Ct) -> None:
    hu = cptac_ct.hu
    assert hu.min() >= -3024
    assert hu.max() > 1000  # bone
    assert -1050 < np.percentile(hu, 5) < -900  # lots of air around and in the chest
    assert -300 < np.median(hu) < 300  # soft tissue


def test_real_ct_matches_simpleitk(cptac_ct: Ct, cptac_sitk: sitk.Image) -> None:
    np.testing.assert_array_equal(cptac_ct.hu, sitk.GetArrayViewFromImage(cptac_sitk))
    rng = np.random.default_rng(0)
    corner = np.asarray(cptac_sitk.TransformIndexToPhysicalPoint((0, 0, 0)))
    far = np.asarray(cptac_sitk.TransformIndexToPhysicalPoint(tuple(n - 1 for n in cptac_sitk.GetSize())))
    for point in rng.uniform(np.minimum(corner, far), np.maximum(corner, far), size=(10, 3)):
        index_xyz = cptac_sitk.TransformPhysicalPointToIndex(tuple(point))
        np.testing.assert_array_equal(cptac_ct.geometry.xyz_to_irc(point), index_xyz[::-1])
        np.testing.assert_allclose(cptac_ct.geometry.irc_to_xyz(index_xyz[::-1]),
                                   cptac_sitk.TransformIndexToPhysicalPoint(index_xyz), atol=1e-6)


def test_dicom_folder_with_missing_slice_is_refused(cptac_dir: Path, tmp_path: Path) -> None:
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(cptac_dir))  # sorted by position
    assert len(files) == CPTAC_SHAPE[0]
    for index, name in enumerate(files):
        if index != len(files) // 2:
            os.symlink(name, tmp_path / Path(name).name)
    with pytest.raises(DataError, match="missing") as caught:
        load_ct(tmp_path)
    assert str(tmp_path) in str(caught.value)
    assert "6.00 mm" in str(caught.value)  # the 3 mm step doubles at the gap


def test_dicom_folder_with_two_series_needs_a_choice(cptac_dir: Path, tmp_path: Path) -> None:
    for name in cptac_dir.iterdir():
        os.symlink(name, tmp_path / name.name)
    array = write_dicom_series(tmp_path, SECOND_SERIES_UID)
    with pytest.raises(DataError, match="--series-uid") as caught:
        load_ct(tmp_path)
    assert SECOND_SERIES_UID in str(caught.value)
    ct = load_ct(tmp_path, series_uid=SECOND_SERIES_UID)
    assert ct.series_uid == SECOND_SERIES_UID
    np.testing.assert_array_equal(ct.hu, array)
    np.testing.assert_allclose(ct.geometry.spacing_xyz, (0.7, 0.7, 2.5), atol=1e-6)
    with pytest.raises(DataError, match="has no series"):
        load_ct(tmp_path, series_uid="1.2.3.999")


def test_folder_without_dicom_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a DICOM file\n")
    with pytest.raises(DataError, match="no DICOM series") as caught:
        load_ct(tmp_path)
    assert str(tmp_path) in str(caught.value)


# ---------------------------------------------------------------------------
# MetaImage and NIfTI round trips


@pytest.mark.parametrize("direction", [np.eye(3), np.diag([1.0, 1.0, -1.0]), FLIPPED_PERMUTED],
                         ids=["identity", "flipped-z", "flipped-permuted"])
def test_mhd_round_trip_keeps_geometry(tmp_path: Path, direction: np.ndarray) -> None:
    array = np.full((7, 9, 11), -800, dtype=np.int16)
    bright_irc = (5, 2, 8)
    array[bright_irc] = 900
    path = write_mhd(tmp_path, array, name="1.2.3", direction=direction)
    ct = load_ct(path)
    assert ct.series_uid == "1.2.3" and ct.source == path
    np.testing.assert_array_equal(ct.hu, array)
    np.testing.assert_allclose(ct.geometry.direction, direction)
    image = sitk.ReadImage(str(path))
    world = image.TransformIndexToPhysicalPoint(bright_irc[::-1])
    np.testing.assert_array_equal(ct.geometry.xyz_to_irc(world), bright_irc)
    chunk, center = ct.chunk(world, (3, 3, 3))
    np.testing.assert_array_equal(center, bright_irc)
    assert chunk[1, 1, 1] == 900 and (chunk == 900).sum() == 1
    header_only = read_geometry(path)
    assert header_only.shape_irc == ct.geometry.shape_irc == array.shape
    for name in ("origin_xyz", "spacing_xyz", "direction"):
        np.testing.assert_array_equal(getattr(header_only, name), getattr(ct.geometry, name))


def test_nifti_round_trip(tmp_path: Path) -> None:
    array = small_volume()
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-50.0, -60.0, -70.0))
    image.SetDirection(tuple(np.diag([1.0, 1.0, -1.0]).ravel()))
    path = tmp_path / "scan.nii.gz"
    sitk.WriteImage(image, str(path))
    ct = load_ct(path)
    assert ct.series_uid == "scan"
    np.testing.assert_array_equal(ct.hu, array)
    np.testing.assert_allclose(ct.geometry.spacing_xyz, (0.7, 0.8, 2.5), atol=1e-5)
    np.testing.assert_allclose(ct.geometry.direction, np.diag([1.0, 1.0, -1.0]), atol=1e-5)
    np.testing.assert_allclose(ct.geometry.origin_xyz, (-50.0, -60.0, -70.0), atol=1e-4)


def test_read_geometry_refuses_what_load_ct_refuses(tmp_path: Path) -> None:
    path = write_mhd(tmp_path, small_volume())
    edit_header(path, "ElementSpacing", "0.7 0 2.5")
    for read in (read_geometry, load_ct):
        with pytest.raises(DataError, match=r"ct.mhd: ElementSpacing = .* must be > 0"):
            read(path)
    nifti = tmp_path / "flat.nii"
    sitk.WriteImage(sitk.GetImageFromArray(small_volume()[0]), str(nifti))
    with pytest.raises(DataError, match=r"flat.nii has 2 dimensions, expected 3"):
        read_geometry(nifti)
    (tmp_path / "junk.nii").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"junk.nii could not be read"):
        read_geometry(tmp_path / "junk.nii")
    thin = write_mhd(tmp_path, small_volume(shape=(1, 8, 10)), name="thin")
    with pytest.raises(DataError, match="slice"):
        read_geometry(thin)


def test_nifti_without_orientation_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "scan.nii"
    sitk.WriteImage(sitk.GetImageFromArray(small_volume()), str(path))
    data = bytearray(path.read_bytes())
    data[252:256] = bytes(4)  # qform_code, sform_code (int16 each)
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="no orientation") as caught:
        load_ct(path)
    assert str(path) in str(caught.value)


def test_float_ct_is_rounded_to_int16(tmp_path: Path) -> None:
    array = np.full((4, 5, 6), -1000.4, dtype=np.float32)
    array[1, 2, 3] = 40000.0  # beyond int16: clipped
    ct = load_ct(write_mhd(tmp_path, array))
    assert ct.hu.dtype == np.int16
    assert ct.hu[0, 0, 0] == -1000 and ct.hu[1, 2, 3] == np.iinfo(np.int16).max


# ---------------------------------------------------------------------------
# Chunks


def make_ct(shape=(20, 30, 40)) -> Ct:
    hu = (np.arange(np.prod(shape)) % 3000 - 1500).astype(np.int16).reshape(shape)
    geometry = Geometry((-10.0, -20.0, -30.0), (0.5, 0.75, 2.0), np.eye(3), shape)
    return Ct(hu=hu, geometry=geometry, series_uid="synthetic")


def test_chunk_equals_slice_in_the_interior() -> None:
    ct = make_ct()
    center_irc = np.array([10, 15, 20])
    chunk, center = ct.chunk(ct.geometry.irc_to_xyz(center_irc), (4, 6, 8), clip=False)
    np.testing.assert_array_equal(center, center_irc)
    np.testing.assert_array_equal(chunk, ct.hu[8:12, 12:18, 16:24])
    clipped, _ = ct.chunk(ct.geometry.irc_to_xyz(center_irc), (4, 6, 8))
    np.testing.assert_array_equal(clipped, np.clip(ct.hu[8:12, 12:18, 16:24], HU_MIN, HU_MAX))


def test_chunk_shifts_inside_at_borders() -> None:
    ct = make_ct()
    chunk, center = ct.chunk(ct.geometry.irc_to_xyz((0, 29, 1)), (4, 6, 8), clip=False)
    np.testing.assert_array_equal(center, (0, 29, 1))
    np.testing.assert_array_equal(chunk, ct.hu[0:4, 24:30, 0:8])


def test_chunk_wider_than_ct_is_padded_with_air() -> None:
    hu = np.full((2, 4, 4), 100, dtype=np.int16)
    chunk = extract_chunk(hu, (1, 2, 2), (4, 4, 4))
    assert chunk.shape == (4, 4, 4)
    assert (chunk[:2] == 100).all() and (chunk[2:] == HU_MIN).all()
    # Written into a given array (a batch slot): same values, whatever the array held before.
    batch = np.full((2, 4, 4, 4), 7, dtype=np.int16)
    written = extract_chunk(hu, (1, 2, 2), (4, 4, 4), out=batch[1])
    assert np.shares_memory(written, batch)
    np.testing.assert_array_equal(batch[1], chunk)
    assert (batch[0] == 7).all()
    with pytest.raises(ValueError, match="int16 array of shape"):
        extract_chunk(hu, (1, 2, 2), (4, 4, 4), out=np.zeros((4, 4, 4), dtype=np.float32))


def test_centre_outside_ct_is_a_data_error() -> None:
    ct = make_ct()
    outside = ct.geometry.irc_to_xyz((25, 15, 20))
    with pytest.raises(DataError, match="outside CT synthetic"):
        ct.chunk(outside, (4, 6, 8))


# ---------------------------------------------------------------------------
# Bad MetaImage files


@pytest.fixture()
def good_mhd(tmp_path: Path) -> Path:
    return write_mhd(tmp_path, small_volume())


def test_missing_raw(good_mhd: Path) -> None:
    good_mhd.with_suffix(".raw").unlink()
    with pytest.raises(DataError, match="missing") as caught:
        load_ct(good_mhd)
    assert str(good_mhd) in str(caught.value)


def test_short_raw(good_mhd: Path) -> None:
    raw = good_mhd.with_suffix(".raw")
    raw.write_bytes(raw.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated") as caught:
        load_ct(good_mhd)
    assert str(good_mhd) in str(caught.value)


def test_uchar_ct(tmp_path: Path) -> None:
    path = write_mhd(tmp_path, np.zeros((4, 5, 6), dtype=np.uint8))
    with pytest.raises(DataError, match="MET_UCHAR") as caught:
        load_ct(path)
    assert str(path) in str(caught.value)


def test_rgb_ct(tmp_path: Path) -> None:
    image = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), dtype=np.uint8), isVector=True)
    path = tmp_path / "rgb.mhd"
    sitk.WriteImage(image, str(path))
    with pytest.raises(DataError) as caught:
        load_ct(path)
    assert str(path) in str(caught.value)


def test_multichannel_short_ct(tmp_path: Path) -> None:
    image = sitk.GetImageFromArray(np.zeros((4, 5, 6, 2), dtype=np.int16), isVector=True)
    path = tmp_path / "two-channel.mhd"
    sitk.WriteImage(image, str(path))
    with pytest.raises(DataError, match="channel") as caught:
        load_ct(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("spacing", ["0 1 1", "1 -0.5 1", "1 1 nan", "1 1"])
def test_bad_spacing(good_mhd: Path, spacing: str) -> None:
    edit_header(good_mhd, "ElementSpacing", spacing)
    with pytest.raises(DataError, match="ElementSpacing") as caught:
        load_ct(good_mhd)
    assert str(good_mhd) in str(caught.value)


def test_singular_direction(good_mhd: Path) -> None:
    edit_header(good_mhd, "TransformMatrix", "1 0 0 1 0 0 0 0 1")
    with pytest.raises(DataError) as caught:
        load_ct(good_mhd)
    assert str(good_mhd) in str(caught.value)


def test_too_few_slices(tmp_path: Path) -> None:
    path = write_mhd(tmp_path, small_volume(shape=(1, 8, 10)))
    with pytest.raises(DataError, match=f"at least {MIN_SLICES}") as caught:
        load_ct(path)
    assert str(path) in str(caught.value)


def test_header_garbage(tmp_path: Path) -> None:
    path = tmp_path / "garbage.mhd"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe not a header at all")
    with pytest.raises(DataError) as caught:
        load_ct(path)
    assert str(path) in str(caught.value)


def test_huge_dimensions_do_not_overflow(good_mhd: Path) -> None:
    edit_header(good_mhd, "DimSize", "99999999999999999999 99999999999999999999 4")
    with pytest.raises(DataError) as caught:
        load_ct(good_mhd)
    assert str(good_mhd) in str(caught.value)


@pytest.mark.parametrize("key, value", [("HeaderSize", "lots"), ("ElementNumberOfChannels", "one")])
def test_non_numeric_optional_fields(good_mhd: Path, key: str, value: str) -> None:
    good_mhd.write_text(good_mhd.read_text().replace("ElementType", f"{key} = {value}\nElementType"))
    with pytest.raises(DataError, match=key) as caught:
        load_ct(good_mhd)
    assert str(good_mhd) in str(caught.value)


def test_missing_and_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_ct(tmp_path / "nothing.mhd")
    other = tmp_path / "scan.png"
    other.write_bytes(b"x")
    with pytest.raises(DataError, match="unknown format"):
        load_ct(other)


def test_series_are_found_flat_in_subsets_and_in_nested_subsets(tmp_path: Path) -> None:
    """Both lookups accept the same layouts; a UID with glob characters matches only itself."""
    volume = small_volume()
    flat = write_mhd(tmp_path, volume, name="1.1")
    (tmp_path / "subset3").mkdir()
    in_subset = write_mhd(tmp_path / "subset3", volume, name="1.2")
    (tmp_path / "subset0" / "subset0").mkdir(parents=True)
    nested = write_mhd(tmp_path / "subset0" / "subset0", volume, name="1.3")
    (tmp_path / "other").mkdir()
    write_mhd(tmp_path / "other", volume, name="1.4")
    expected = {"1.1": flat, "1.2": in_subset, "1.3": nested}
    assert list_series_on_disk(tmp_path) == expected
    assert {uid: find_series_path(tmp_path, uid) for uid in expected} == expected
    for missing in ("1.4", "1.*", "[1].1"):
        with pytest.raises(DataError, match="not found"):
            find_series_path(tmp_path, missing)


# ---------------------------------------------------------------------------
# Fuzzing: random headers give DataError, never another exception

HEADER_KEYS = ["ObjectType", "NDims", "DimSize", "ElementSpacing", "ElementSize", "ElementType",
               "ElementDataFile", "HeaderSize", "ElementNumberOfChannels", "CompressedData",
               "TransformMatrix", "Offset", "BinaryData", "BinaryDataByteOrderMSB"]
HEADER_TOKENS = st.one_of(
    st.integers(-3, 8).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["MET_SHORT", "MET_UCHAR", "MET_FLOAT", "MET_BOGUS", "True", "False", "LOCAL",
                     "data.raw", "LIST", "%03d.raw", "", "é", "\x00"]),
    st.text(max_size=6),
)
header_lines = st.tuples(st.sampled_from(HEADER_KEYS), st.lists(HEADER_TOKENS, max_size=9)).map(
    lambda item: f"{item[0]} = {' '.join(item[1])}")
VALID_HEADER = {"ObjectType": "Image", "NDims": "3", "BinaryData": "True", "BinaryDataByteOrderMSB": "False",
                "CompressedData": "False", "TransformMatrix": "1 0 0 0 1 0 0 0 1", "Offset": "0 0 0",
                "ElementSpacing": "1 1 1", "DimSize": "5 4 3", "ElementType": "MET_SHORT",
                "ElementDataFile": "data.raw"}


@st.composite
def mutated_headers(draw: st.DrawFn) -> bytes:
    """A valid header with a few fields replaced by random tokens or removed."""
    header = dict(VALID_HEADER)
    for key in draw(st.lists(st.sampled_from(HEADER_KEYS), max_size=3)):
        if draw(st.booleans()):
            header.pop(key, None)
        else:
            header[key] = " ".join(draw(st.lists(HEADER_TOKENS, min_size=1, max_size=9)))
    data_file = header.pop("ElementDataFile", None)
    if data_file is not None:
        header["ElementDataFile"] = data_file  # MetaIO reads up to this line
    text = "\n".join(f"{key} = {value}" for key, value in header.items())
    return text.encode("utf-8", "surrogatepass")


headers = st.one_of(
    mutated_headers(),
    st.lists(header_lines, max_size=14).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass")),
    st.text().map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.binary(max_size=300),
)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=headers, raw_size=st.integers(0, 700))
def test_fuzzed_headers_raise_only_data_error(tmp_path: Path, header: bytes, raw_size: int) -> None:
    folder = tmp_path / "fuzz"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / "data.raw").write_bytes(bytes(raw_size))
    path = folder / "ct.mhd"
    path.write_bytes(header)
    try:
        read_metaimage_header(path)
    except DataError:
        pass
    try:
        ct = load_ct(path)
    except DataError as error:
        assert str(path) in str(error) and "\n" not in str(error)
    else:
        assert ct.hu.ndim == 3 and ct.shape[0] >= MIN_SLICES
