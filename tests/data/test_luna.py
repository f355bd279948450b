"""Tests for p2ch_luna.data.luna: CSV parsing, the candidate table and the train/validation split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2ch_luna.data.luna import (
    TABLE_COLUMNS,
    attach_malignancy,
    build_candidate_table,
    find_candidates_file,
    read_annotations,
    read_candidate_table,
    read_candidates,
    read_csv_checked,
    read_malignancy,
    split_by_series,
)
from p2ch_luna.errors import DataError

UID_A = "1.2.3.100"
UID_B = "1.2.3.200"
ANNOTATIONS_HEADER = "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
CANDIDATES_HEADER = "seriesuid,coordX,coordY,coordZ,class\n"
MALIGNANCY_HEADER = "seriesuid,coordX,coordY,coordZ,diameter_mm,mal_bool\n"


# ---------------------------------------------------------------------------
# The real LUNA16 CSVs


@pytest.fixture(scope="module")
def real_annotations(luna16_dir: Path) -> pd.DataFrame:
    return read_annotations(luna16_dir / "annotations.csv")


def test_real_annotations(real_annotations: pd.DataFrame) -> None:
    assert len(real_annotations) == 1186
    assert real_annotations["series_uid"].nunique() == 601
    assert list(real_annotations.columns) == ["series_uid", "center_x", "center_y", "center_z", "diameter_mm"]
    assert (real_annotations["diameter_mm"] >= 3).all()


def test_real_malignancy_attaches_to_nearly_every_nodule(luna16_dir: Path, real_annotations: pd.DataFrame) -> None:
    malignancy = read_malignancy(luna16_dir / "annotations_with_malignancy.csv")
    assert len(malignancy) == 1182
    attached = attach_malignancy(real_annotations, malignancy)
    assert attached.dtype == "boolean" and len(attached) == len(real_annotations)
    assert attached.isna().sum() <= 10
    malignant, benign = int((attached == True).sum()), int((attached == False).sum())  # noqa: E712
    assert malignant + benign + int(attached.isna().sum()) == len(real_annotations)
    assert 300 < malignant < benign
    assert malignant <= int(malignancy["is_malignant"].sum())


# ---------------------------------------------------------------------------
# The candidate table from handmade frames


def annotations_frame() -> pd.DataFrame:
    return pd.DataFrame({"series_uid": [UID_A, UID_A, UID_B], "center_x": [0.0, 50.0, 10.0],
                         "center_y": [0.0, 50.0, 10.0], "center_z": [0.0, 50.0, 10.0],
                         "diameter_mm": [8.0, 4.0, 6.0]})


def candidates_frame() -> pd.DataFrame:
    rows = [
        (UID_A, 1.9, -1.9, 2.0, True),     # within 8/4 = 2 mm on every axis: takes 8 mm
        (UID_A, 2.1, 0.0, 0.0, True),      # just outside on x: no diameter
        (UID_A, 51.0, 49.0, 50.0, False),  # class 0 within 4/4 = 1 mm of the second nodule
        (UID_A, 200.0, 200.0, 200.0, False),
        (UID_B, 10.0, 10.0, 10.0, True),   # nodule in a series without malignancy rows
    ]
    return pd.DataFrame(rows, columns=["series_uid", "center_x", "center_y", "center_z", "is_nodule"])


def malignancy_frame() -> pd.DataFrame:
    return pd.DataFrame({"series_uid": [UID_A, UID_A], "center_x": [0.5, 50.0], "center_y": [0.0, 50.0],
                         "center_z": [0.0, 50.0], "diameter_mm": [8.0, 4.0], "is_malignant": [True, False]})


def candidate_rows(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["source"] == "candidate"].set_index(["series_uid", "center_x"])


def test_candidate_table_columns_and_types() -> None:
    table = build_candidate_table(candidates_frame(), annotations_frame(), malignancy_frame())
    assert list(table.columns) == TABLE_COLUMNS
    assert len(table) == 3 + 5
    assert table["is_malignant"].dtype == "boolean"
    assert table["is_nodule"].dtype == bool and table["has_annotation"].dtype == bool
    assert (table["source"] == "annotation").sum() == 3


def test_diameter_rule() -> None:
    rows = candidate_rows(build_candidate_table(candidates_frame(), annotations_frame(), malignancy_frame()))
    assert rows.loc[(UID_A, 1.9), "diameter_mm"] == 8.0
    assert rows.loc[(UID_A, 1.9), "has_annotation"]
    assert rows.loc[(UID_A, 2.1), "diameter_mm"] == 0.0
    assert not rows.loc[(UID_A, 2.1), "has_annotation"]
    assert rows.loc[(UID_A, 51.0), "diameter_mm"] == 4.0
    assert rows.loc[(UID_A, 200.0), "diameter_mm"] == 0.0


def test_malignancy_values() -> None:
    table = build_candidate_table(candidates_frame(), annotations_frame(), malignancy_frame())
    rows = candidate_rows(table)
    assert rows.loc[(UID_A, 1.9), "is_malignant"] == True  # noqa: E712  matched malignant nodule
    assert rows.loc[(UID_A, 2.1), "is_malignant"] is pd.NA  # nodule, no matching annotation
    assert rows.loc[(UID_A, 51.0), "is_malignant"] == False  # noqa: E712  class 0 is never malignant
    assert rows.loc[(UID_A, 200.0), "is_malignant"] == False  # noqa: E712
    assert rows.loc[(UID_B, 10.0), "is_malignant"] is pd.NA  # no malignancy row for this nodule
    annotations = table[table["source"] == "annotation"].set_index("center_x")
    assert annotations.loc[0.0, "is_malignant"] == True  # noqa: E712
    assert annotations.loc[50.0, "is_malignant"] == False  # noqa: E712
    assert annotations.loc[10.0, "is_malignant"] is pd.NA


def test_without_malignancy_file_everything_nodule_is_unknown() -> None:
    table = build_candidate_table(candidates_frame(), annotations_frame(), None)
    nodules = table[table["is_nodule"]]
    assert nodules["is_malignant"].isna().all()
    assert (table.loc[~table["is_nodule"], "is_malignant"] == False).all()  # noqa: E712


def test_table_is_sorted_largest_nodules_first() -> None:
    table = build_candidate_table(candidates_frame(), annotations_frame(), malignancy_frame())
    nodules = table[table["is_nodule"]]
    assert nodules["diameter_mm"].is_monotonic_decreasing
    assert not table["is_nodule"].iloc[-1]


# ---------------------------------------------------------------------------
# Split


def test_split_is_every_tenth_sorted_uid_and_deterministic() -> None:
    rng = np.random.default_rng(0)
    uids = [f"1.2.{n}" for n in rng.permutation(95)]
    train, validation = split_by_series(uids + uids[:10])  # duplicates are ignored
    assert validation == sorted(uids)[::10]
    assert set(train).isdisjoint(validation)
    assert sorted(train + validation) == sorted(uids)
    assert split_by_series(reversed(uids)) == (train, validation)
    assert len(split_by_series(uids, val_stride=5)[1]) == 19
    with pytest.raises(ValueError):
        split_by_series(uids, val_stride=1)


# ---------------------------------------------------------------------------
# read_candidate_table on a data root


def write_series(folder: Path, uid: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 4), dtype=np.int16)), str(folder / f"{uid}.mhd"))


def write_csvs(root: Path) -> None:
    (root / "annotations.csv").write_text(ANNOTATIONS_HEADER + f"{UID_A},0,0,0,8\n{UID_B},10,10,10,6\n")
    (root / "candidates.csv").write_text(
        CANDIDATES_HEADER + f"{UID_A},1,1,1,1\n{UID_A},90,90,90,0\n{UID_B},10,10,10,1\n1.2.3.300,5,5,5,0\n")


def test_read_candidate_table_keeps_series_on_disk(tmp_path: Path) -> None:
    write_csvs(tmp_path)
    write_series(tmp_path / "subset0", UID_A)
    write_series(tmp_path / "subset1", UID_B)
    table = read_candidate_table(tmp_path)
    assert set(table["series_uid"]) == {UID_A, UID_B}
    assert len(table) == 2 + 3
    assert table["is_malignant"][table["is_nodule"]].isna().all()  # no malignancy file
    everything = read_candidate_table(tmp_path, require_on_disk=False)
    assert set(everything["series_uid"]) == {UID_A, UID_B, "1.2.3.300"}
    (tmp_path / "subset1" / f"{UID_B}.mhd").unlink()
    assert set(read_candidate_table(tmp_path)["series_uid"]) == {UID_A}


def test_read_candidate_table_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_candidate_table(tmp_path / "nowhere")
    (tmp_path / "annotations.csv").write_text(ANNOTATIONS_HEADER)
    with pytest.raises(DataError, match="candidates"):
        read_candidate_table(tmp_path)


def test_candidates_file_is_v2_then_v2_folder_then_v1(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no candidates_V2.csv or .* in"):
        find_candidates_file(tmp_path)
    (tmp_path / "candidates.csv").write_text(CANDIDATES_HEADER)
    assert find_candidates_file(tmp_path) == tmp_path / "candidates.csv"
    (tmp_path / "candidates_V2").mkdir()
    (tmp_path / "candidates_V2" / "candidates_V2.csv").write_text(CANDIDATES_HEADER)
    assert find_candidates_file(tmp_path) == tmp_path / "candidates_V2" / "candidates_V2.csv"
    (tmp_path / "candidates_V2.csv").write_text(CANDIDATES_HEADER)
    assert find_candidates_file(tmp_path) == tmp_path / "candidates_V2.csv"


def test_tiny_dataset_table(tiny_dataset: Path) -> None:
    table = read_candidate_table(tiny_dataset)
    assert list(table.columns) == TABLE_COLUMNS
    assert 1 <= table["series_uid"].nunique() <= 5
    assert table["is_nodule"].any() and (~table["is_nodule"]).any()


# ---------------------------------------------------------------------------
# Bad CSVs


def write(tmp_path: Path, text: str, name: str = "file.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_missing_column(tmp_path: Path) -> None:
    path = write(tmp_path, "seriesuid,coordX,coordY,diameter_mm\n1.2,0,0,5\n")
    with pytest.raises(DataError, match="coordZ") as caught:
        read_annotations(path)
    assert str(path) in str(caught.value)


def test_non_numeric_value_names_the_row(tmp_path: Path) -> None:
    path = write(tmp_path, ANNOTATIONS_HEADER + "1.2,0,0,0,5\n1.2,1,1,1,5\n1.2,0,abc,0,5\n")
    with pytest.raises(DataError, match=r"row 4: coordY = 'abc'") as caught:
        read_annotations(path)
    assert str(path) in str(caught.value)


def test_blank_lines_and_duplicates(tmp_path: Path) -> None:
    path = write(tmp_path, ANNOTATIONS_HEADER + "\n1.2,0,0,0,5\n\n1.2,0,0,0,5\n1.3, 1 ,1,1,6\n\n")
    frame = read_annotations(path)
    assert len(frame) == 2
    assert frame["center_x"].tolist() == [0.0, 1.0]


@pytest.mark.parametrize("value", ["2", "-1", "0.5"])
def test_class_must_be_0_or_1(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, CANDIDATES_HEADER + f"1.2,0,0,0,1\n1.2,1,1,1,{value}\n")
    with pytest.raises(DataError, match="row 3: class") as caught:
        read_candidates(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("value", ["-4", "0"])
def test_diameter_must_be_positive(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, ANNOTATIONS_HEADER + f"1.2,0,0,0,{value}\n")
    with pytest.raises(DataError, match="row 2: diameter_mm"):
        read_annotations(path)


def test_bad_malignancy_flag(tmp_path: Path) -> None:
    path = write(tmp_path, MALIGNANCY_HEADER + "1.2,0,0,0,5,maybe\n")
    with pytest.raises(DataError, match="mal_bool"):
        read_malignancy(path)


@pytest.mark.parametrize("row", ["1.2,0,0,0,5,extra\n", ",,,,,\n"])
def test_a_first_row_longer_than_the_header_is_refused(tmp_path: Path, row: str) -> None:
    """pandas would take the extra leading field for the index and shift every column by one."""
    path = write(tmp_path, ANNOTATIONS_HEADER + row + "1.3,1,1,1,6\n")
    with pytest.raises(DataError, match="first data row has more fields than the header's 5 columns") as caught:
        read_annotations(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("text", ["", "\n\n", "seriesuid,coordX\n1.2,\"unclosed\n", "\xff\xfe\x00bad"])
def test_unparsable_files(tmp_path: Path, text: str) -> None:
    path = tmp_path / "file.csv"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError) as caught:
        read_annotations(path)
    assert str(path) in str(caught.value)


CSV_PIECES = st.one_of(st.sampled_from([",", "\n", "\r\n", "\"", "'", " ", "nan", "inf", "1e400", "-", "#",
                                        "seriesuid", "coordX", "coordY", "coordZ", "diameter_mm", "\x00"]),
                       st.text(max_size=5), st.integers().map(str), st.floats().map(str))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(CSV_PIECES, max_size=40), binary=st.binary(max_size=80), use_binary=st.booleans())
def test_fuzzed_csv_raises_only_data_error(tmp_path: Path, pieces: list[str], binary: bytes,
                                           use_binary: bool) -> None:
    path = tmp_path / "fuzz.csv"
    header = "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
    data = binary if use_binary else (header + "".join(pieces)).encode("utf-8", "surrogatepass")
    path.write_bytes(data)
    for reader in (read_annotations, lambda p: read_csv_checked(p, ["seriesuid", "coordX"], ["coordX"])):
        try:
            frame = reader(path)
        except DataError as error:
            assert str(path) in str(error)
        else:
            assert isinstance(frame, pd.DataFrame)
