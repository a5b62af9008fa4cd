"""Tests of spinemm.data.tables: merging the RSNA tables and rejecting malformed ones."""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spinemm.constants import (
    CONDITION_NAMES,
    CONDITION_PLANE,
    LABEL_COLUMNS,
    LEVEL_NAMES,
    PLANES,
    SEVERITIES,
    condition_key,
    target_index,
)
from spinemm.data.tables import (
    FRAME_COLUMNS,
    load_series_descriptions,
    load_tables,
    series_path,
    to_hf_dataset,
)
from spinemm.errors import SpineDataError

SAG_T1, SAG_T2, AX_T2 = PLANES
SEVERITY_CYCLE = ["Normal/Mild", "Moderate", "Severe"]


def make_tables() -> dict[str, pd.DataFrame]:
    """Valid tables for three studies, all cells strings so tests can write anything into them.

    - 101: Sag T1 11, Sag T2 12, Axial T2 13 and 14; all 25 labels; coordinates for every target,
      subarticular L4/L5 and L5/S1 labelled on the higher axial series 14.
    - 202: Sag T1 21, Axial T2 22, no Sagittal T2/STIR; two empty label cells; spinal coordinates absent.
    - 303: Sag T2 33, Sag T1 32 and 31 (listed out of order); Axial T2 absent; only spinal coordinates.
    Study ids in train.csv are listed out of order (303 first) to check the sort.
    """
    series = pd.DataFrame(
        [
            ("101", "11", SAG_T1),
            ("101", "12", SAG_T2),
            ("101", "14", AX_T2),
            ("101", "13", AX_T2),
            ("202", "21", SAG_T1),
            ("202", "22", AX_T2),
            ("303", "33", SAG_T2),
            ("303", "32", SAG_T1),
            ("303", "31", SAG_T1),
        ],
        columns=["study_id", "series_id", "series_description"],
    )
    train = pd.DataFrame({"study_id": ["303", "101", "202"]})
    for t, column in enumerate(LABEL_COLUMNS):
        train[column] = [SEVERITY_CYCLE[(t + s) % 3] for s in range(3)]
    train.loc[2, "spinal_canal_stenosis_l1_l2"] = ""
    train.loc[2, "right_subarticular_stenosis_l5_s1"] = ""

    rows = []
    plane_series = {
        "101": {SAG_T1: "11", SAG_T2: "12", AX_T2: "13"},
        "202": {SAG_T1: "21", AX_T2: "22"},
        "303": {SAG_T2: "33"},
    }
    for study, planes in plane_series.items():
        for condition in CONDITION_NAMES:
            plane = CONDITION_PLANE[condition_key(condition)]
            if plane not in planes:
                continue
            for k, level in enumerate(LEVEL_NAMES):
                series_id = planes[plane]
                if study == "101" and plane == AX_T2 and level in ("L4/L5", "L5/S1"):
                    series_id = "14"
                t = target_index(condition, level)
                rows.append(
                    (study, series_id, str(100 + t), condition, level, f"{10.5 + t}", f"{200.25 + k}")
                )
    coords = pd.DataFrame(
        rows, columns=["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
    )
    return {
        "train.csv": train,
        "train_label_coordinates.csv": coords,
        "train_series_descriptions.csv": series,
    }


def write_tables(root: Path, tables: dict[str, pd.DataFrame]) -> Path:
    """Write each table (a DataFrame, or raw text) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        if isinstance(table, str):
            (root / name).write_text(table)
        else:
            table.to_csv(root / name, index=False)
    return root


@pytest.fixture
def tables() -> dict[str, pd.DataFrame]:
    return make_tables()


@pytest.fixture
def frame(tmp_path, tables) -> pd.DataFrame:
    return load_tables(write_tables(tmp_path, tables))


def row(frame: pd.DataFrame, study: int, column: str) -> pd.Series:
    hit = frame[(frame.study_id == study) & (frame.column == column)]
    assert len(hit) == 1
    return hit.iloc[0]


# --- the merged frame -------------------------------------------------------------------------


def test_shape_order_and_dtypes(frame):
    assert tuple(frame.columns) == FRAME_COLUMNS
    assert len(frame) == 3 * 25
    assert frame.study_id.tolist() == [101] * 25 + [202] * 25 + [303] * 25
    assert frame.target.tolist() == list(range(25)) * 3
    assert frame.column.tolist()[:25] == list(LABEL_COLUMNS)
    for name in ("study_id", "target", "label", "series_id"):
        assert frame[name].dtype == np.int64, name
    for name in ("instance_number", "x", "y"):
        assert frame[name].dtype == np.float64, name
    r = row(frame, 101, "left_neural_foraminal_narrowing_l3_l4")
    assert (r.condition, r.level, r.plane) == ("left_neural_foraminal_narrowing", "l3_l4", SAG_T1)
    assert row(frame, 101, "spinal_canal_stenosis_l1_l2").plane == SAG_T2
    assert row(frame, 101, "right_subarticular_stenosis_l5_s1").plane == AX_T2


def test_labels_follow_train_csv(frame, tables):
    train = tables["train.csv"].set_index("study_id")
    for study in (101, 202, 303):
        got = frame[frame.study_id == study]
        expected = [train.loc[str(study), c] for c in LABEL_COLUMNS]
        assert got.severity.tolist() == [s if s else None for s in expected]
        assert got.label.tolist() == [SEVERITIES.index(s) if s else -1 for s in expected]
    assert set(frame.label) == {-1, 0, 1, 2}


def test_empty_cells_give_missing_label(frame):
    for column in ("spinal_canal_stenosis_l1_l2", "right_subarticular_stenosis_l5_s1"):
        r = row(frame, 202, column)
        assert r.severity is None and r.label == -1
    assert (frame.label == -1).sum() == 2


def test_coordinates_land_on_their_rows(frame):
    t = target_index("Left Subarticular Stenosis", "L5/S1")
    r = row(frame, 101, LABEL_COLUMNS[t])
    assert (r.instance_number, r.x, r.y) == (100 + t, 10.5 + t, 204.25)
    t = target_index("Spinal Canal Stenosis", "L2/L3")
    r = row(frame, 303, LABEL_COLUMNS[t])
    assert (r.series_id, r.instance_number, r.x, r.y) == (33, 100 + t, 10.5 + t, 201.25)
    # 101 has all 25, 202 all but 5 spinal, 303 only the 5 spinal.
    assert frame.groupby("study_id").x.count().tolist() == [25, 20, 5]
    assert math.isnan(row(frame, 202, "spinal_canal_stenosis_l3_l4").x)
    assert math.isnan(row(frame, 303, "left_neural_foraminal_narrowing_l1_l2").instance_number)


def test_series_choice(frame):
    # Labelled series wins, even when it is not the lowest id of the plane.
    assert row(frame, 101, "left_subarticular_stenosis_l4_l5").series_id == 14
    assert row(frame, 101, "left_subarticular_stenosis_l3_l4").series_id == 13
    # No coordinate: the lowest series id of the plane (31 < 32, though listed after it).
    assert row(frame, 303, "right_neural_foraminal_narrowing_l1_l2").series_id == 31
    # No series of the plane: -1 and no candidates.
    r = row(frame, 202, "spinal_canal_stenosis_l1_l2")
    assert r.series_id == -1 and r.candidate_series == ()
    assert (frame[(frame.study_id == 303) & (frame.plane == AX_T2)].series_id == -1).all()


def test_two_axial_series_are_both_candidates(frame):
    for column in ("left_subarticular_stenosis_l1_l2", "right_subarticular_stenosis_l5_s1"):
        assert row(frame, 101, column).candidate_series == (13, 14)
    assert row(frame, 303, "left_neural_foraminal_narrowing_l2_l3").candidate_series == (31, 32)
    assert row(frame, 101, "spinal_canal_stenosis_l2_l3").candidate_series == (12,)
    assert all(type(s) is int for c in frame.candidate_series for s in c)


def test_whitespace_is_stripped(tmp_path, tables):
    tables["train.csv"].loc[0, "spinal_canal_stenosis_l1_l2"] = " Severe "
    tables["train_label_coordinates.csv"].loc[5, "condition"] = "  Left Neural Foraminal Narrowing"
    tables["train_label_coordinates.csv"].loc[5, "level"] = "L1/L2\t"
    tables["train_series_descriptions.csv"].loc[0, "series_description"] = "Sagittal T1 "
    tables["train_series_descriptions.csv"].loc[0, "study_id"] = " 101"
    frame = load_tables(write_tables(tmp_path, tables))
    assert row(frame, 303, "spinal_canal_stenosis_l1_l2").label == 2
    r = row(frame, 101, "left_neural_foraminal_narrowing_l1_l2")
    assert (r.series_id, r.x) == (11, 15.5)


def test_test_split_has_no_labels(tmp_path, tables):
    series = tables["train_series_descriptions.csv"]
    write_tables(tmp_path, {"test_series_descriptions.csv": series[series.study_id != "202"]})
    frame = load_tables(tmp_path, split="test")
    assert tuple(frame.columns) == FRAME_COLUMNS
    assert frame.study_id.tolist() == [101] * 25 + [303] * 25
    assert (frame.label == -1).all() and frame.severity.isna().all()
    assert frame[["instance_number", "x", "y"]].isna().all().all()
    assert row(frame, 101, "left_subarticular_stenosis_l4_l5").series_id == 13  # lowest: no labels
    assert row(frame, 101, "left_subarticular_stenosis_l4_l5").candidate_series == (13, 14)
    assert row(frame, 303, "left_subarticular_stenosis_l4_l5").series_id == -1


def test_study_without_series_warns(tmp_path, tables):
    series = tables["train_series_descriptions.csv"]
    coords = tables["train_label_coordinates.csv"]
    tables["train_series_descriptions.csv"] = series[series.study_id != "202"]
    tables["train_label_coordinates.csv"] = coords[coords.study_id != "202"]
    with pytest.warns(UserWarning, match=r"without series descriptions.*202"):
        frame = load_tables(write_tables(tmp_path, tables))
    got = frame[frame.study_id == 202]
    assert len(got) == 25 and (got.series_id == -1).all()
    assert (got.label >= 0).sum() == 23


def test_described_study_missing_from_train_csv_is_ignored(tmp_path, tables):
    series = tables["train_series_descriptions.csv"]
    extra = pd.DataFrame([["404", "41", AX_T2]], columns=series.columns)
    tables["train_series_descriptions.csv"] = pd.concat([series, extra], ignore_index=True)
    with pytest.warns(UserWarning, match=r"not in train.csv are ignored \(1\): 404"):
        frame = load_tables(write_tables(tmp_path, tables))
    assert 404 not in set(frame.study_id) and len(frame) == 75


def test_header_only_tables_give_an_empty_frame(tmp_path, tables):
    tables = {name: table.iloc[:0] for name, table in tables.items()}
    frame = load_tables(write_tables(tmp_path, tables))
    assert tuple(frame.columns) == FRAME_COLUMNS and len(frame) == 0


def test_valid_tables_do_not_warn(tmp_path, tables):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_tables(write_tables(tmp_path, tables))


def test_load_series_descriptions(tmp_path, tables):
    series = load_series_descriptions(write_tables(tmp_path, tables), "train")
    assert list(series.columns) == ["study_id", "series_id", "series_description"]
    assert series.series_id.tolist() == [11, 12, 13, 14, 21, 22, 31, 32, 33]
    assert series.study_id.dtype == np.int64


def test_to_hf_dataset_round_trip(frame):
    ds = to_hf_dataset(frame)
    assert len(ds) == len(frame) and set(ds.column_names) == set(FRAME_COLUMNS)
    assert ds.features["candidate_series"].feature.dtype == "int64"
    first = ds[0]
    assert first["candidate_series"] == [12] and first["study_id"] == 101
    back = ds.to_pandas()
    back["candidate_series"] = [tuple(c) for c in back["candidate_series"]]
    back["severity"] = back["severity"].astype(object).where(back["severity"].notna(), None)
    pd.testing.assert_frame_equal(back[list(FRAME_COLUMNS)], frame, check_dtype=False)
    assert back.label.tolist() == frame.label.tolist()


def test_to_hf_dataset_with_only_empty_candidates(tmp_path, tables):
    series = tables["train_series_descriptions.csv"]
    write_tables(tmp_path, {"test_series_descriptions.csv": series[series.study_id == "202"]})
    frame = load_tables(tmp_path, split="test")
    ds = to_hf_dataset(frame[frame.plane == SAG_T2])  # every row: candidate_series == ()
    assert ds.features["candidate_series"].feature.dtype == "int64"
    assert ds["candidate_series"] == [[]] * 5


# --- series_path ------------------------------------------------------------------------------


def test_series_path(tmp_path):
    assert series_path(tmp_path, "train", 101, np.int64(12)) == tmp_path / "train_images" / "101" / "12"
    assert series_path(str(tmp_path), "test", 0, 3) == tmp_path / "test_images" / "0" / "3"


@pytest.mark.parametrize(
    ("split", "study", "series", "fragment"),
    [
        ("valid", 1, 2, "split must be 'train' or 'test'"),
        ("../train", 1, 2, "split must be"),
        ("train", "101", 2, "study_id must be a non-negative integer"),
        ("train", "../../etc", 2, "study_id must be"),
        ("train", 1, -2, "series_id must be a non-negative integer, got -2"),
        ("train", 1, 2.0, "series_id must be"),
        ("train", True, 2, "study_id must be"),
    ],
)
def test_series_path_rejects(tmp_path, split, study, series, fragment):
    with pytest.raises(SpineDataError, match=fragment):
        series_path(tmp_path, split, study, series)


# --- validation -------------------------------------------------------------------------------

TRAIN, COORDS, SERIES = "train.csv", "train_label_coordinates.csv", "train_series_descriptions.csv"


def set_cell(name, index, column, value):
    def mutate(t):
        t[name].loc[index, column] = value

    return mutate


def drop_file(name):
    return lambda t: t.pop(name)


def drop_column(name, column):
    return lambda t: t.__setitem__(name, t[name].drop(columns=column))


def duplicate_row(name, index):
    return lambda t: t.__setitem__(name, pd.concat([t[name], t[name].iloc[[index]]], ignore_index=True))


def set_text(name, text):
    return lambda t: t.__setitem__(name, text)


# (mutation, file at fault, fragments expected in the message). Row r of a table is index r - 1.
BAD_INPUTS = {
    "missing train.csv": (drop_file(TRAIN), TRAIN, ["missing file: expected"]),
    "missing coordinates": (drop_file(COORDS), COORDS, ["missing file: expected"]),
    "missing series descriptions": (drop_file(SERIES), SERIES, ["missing file: expected"]),
    "empty file": (set_text(SERIES, ""), SERIES, ["file is empty"]),
    "surplus fields": (
        set_text(SERIES, "study_id,series_id,series_description\n1,2,Axial T2,extra,x\n"),
        SERIES,
        ["more fields than the header"],
    ),
    "ragged row": (
        set_text(SERIES, "study_id,series_id,series_description\n1,2,Axial T2\n1,3,Axial T2,x\n"),
        SERIES,
        ["cannot parse", "line 3"],
    ),
    "missing label column": (
        drop_column(TRAIN, "left_subarticular_stenosis_l2_l3"),
        TRAIN,
        ["missing column 'left_subarticular_stenosis_l2_l3'"],
    ),
    "missing coordinate column": (drop_column(COORDS, "x"), COORDS, ["missing column 'x'"]),
    "missing series column": (
        drop_column(SERIES, "series_description"),
        SERIES,
        ["missing column 'series_description'"],
    ),
    "unknown severity": (
        set_cell(TRAIN, 1, "left_subarticular_stenosis_l2_l3", "Mild"),
        TRAIN,
        ["row 2 (line 3), column 'left_subarticular_stenosis_l2_l3'", "unknown severity 'Mild'"],
    ),
    "lowercase severity": (
        set_cell(TRAIN, 2, "spinal_canal_stenosis_l5_s1", "severe"),
        TRAIN,
        ["row 3 (line 4)", "'severe'"],
    ),
    "non-integer study_id": (
        set_cell(TRAIN, 0, "study_id", "abc"),
        TRAIN,
        ["row 1 (line 2), column 'study_id'", "'abc' is not a non-negative integer"],
    ),
    "empty study_id": (
        set_cell(TRAIN, 1, "study_id", ""),
        TRAIN,
        ["row 2", "'' is not a non-negative integer"],
    ),
    "huge study_id": (set_cell(TRAIN, 1, "study_id", "9" * 30), TRAIN, ["row 2", "too large"]),
    "duplicate study_id": (
        set_cell(TRAIN, 2, "study_id", "303"),
        TRAIN,
        ["row 3 (line 4), column 'study_id'", "duplicate '303', already given in row 1"],
    ),
    "negative series_id": (
        set_cell(SERIES, 4, "series_id", "-21"),
        SERIES,
        ["row 5 (line 6), column 'series_id'", "'-21' is not a non-negative integer"],
    ),
    "unknown series_description": (
        set_cell(SERIES, 3, "series_description", "Axial T1"),
        SERIES,
        ["row 4 (line 5), column 'series_description'", "unknown value 'Axial T1'"],
    ),
    "duplicate series": (
        duplicate_row(SERIES, 1),
        SERIES,
        [
            "row 10 (line 11), columns 'study_id', 'series_id'",
            "duplicate ('101', '12')",
            "already given in row 2",
        ],
    ),
    "fractional instance_number": (
        set_cell(COORDS, 6, "instance_number", "3.5"),
        COORDS,
        ["row 7 (line 8), column 'instance_number'", "'3.5' is not a non-negative integer"],
    ),
    "negative instance_number": (set_cell(COORDS, 0, "instance_number", "-1"), COORDS, ["row 1", "'-1'"]),
    "unknown condition": (
        set_cell(COORDS, 2, "condition", "Spinal Stenosis"),
        COORDS,
        ["row 3 (line 4), column 'condition'", "unknown value 'Spinal Stenosis'"],
    ),
    "unknown level": (
        set_cell(COORDS, 3, "level", "L6/S1"),
        COORDS,
        ["row 4 (line 5), column 'level'", "unknown value 'L6/S1'"],
    ),
    "non-numeric x": (
        set_cell(COORDS, 4, "x", "abc"),
        COORDS,
        ["row 5 (line 6), column 'x'", "'abc' is not a finite number"],
    ),
    "empty x": (set_cell(COORDS, 5, "x", ""), COORDS, ["row 6", "column 'x'", "not a finite number"]),
    "infinite y": (set_cell(COORDS, 8, "y", "inf"), COORDS, ["row 9 (line 10), column 'y'", "'inf'"]),
    "nan y": (set_cell(COORDS, 8, "y", "nan"), COORDS, ["row 9", "column 'y'", "'nan' is not a finite"]),
    "duplicate coordinate": (
        duplicate_row(COORDS, 2),
        COORDS,
        ["columns 'study_id', 'condition', 'level'", "already given in row 3"],
    ),
    "coordinate study not in train.csv": (
        set_cell(COORDS, 0, "study_id", "999"),
        COORDS,
        ["row 1 (line 2), column 'study_id'", "study '999' is not in"],
    ),
    "coordinate series not in study": (
        set_cell(COORDS, 1, "series_id", "21"),
        COORDS,
        ["row 2 (line 3), columns 'study_id', 'series_id'", "series ('101', '21') is not listed"],
    ),
    "coordinate on wrong plane": (
        set_cell(COORDS, 0, "series_id", "13"),
        COORDS,
        ["row 1 (line 2), columns 'condition', 'series_id'", "'Axial T2'", "is read on 'Sagittal T2/STIR'"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_rejected(tmp_path, tables, case):
    mutate, filename, fragments = BAD_INPUTS[case]
    mutate(tables)
    root = write_tables(tmp_path, tables)
    with pytest.raises(SpineDataError) as info:
        load_tables(root)
    message = str(info.value)
    assert str(root / filename) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_helper_row_order(tables):
    # The row numbers in BAD_INPUTS rely on the helper's coordinate order.
    assert tables[COORDS].loc[0].tolist()[:5] == ["101", "12", "100", "Spinal Canal Stenosis", "L1/L2"]
    assert tables[COORDS].loc[1, "series_id"] == "12"


def test_blank_lines_are_skipped_and_counted(tmp_path, tables):
    write_tables(tmp_path, tables)
    text = (tmp_path / SERIES).read_text().splitlines()
    text.insert(2, "")
    text[5] = text[5].replace("Axial T2", "Axial T3")  # data row 4 before the blank line was added
    (tmp_path / SERIES).write_text("\n".join(text) + "\n")
    with pytest.raises(SpineDataError, match=r"row 5 \(line 6\), column 'series_description'"):
        load_tables(tmp_path)
    text[5] = text[5].replace("Axial T3", "Axial T2")
    (tmp_path / SERIES).write_text("\n".join(text) + "\n")
    assert len(load_tables(tmp_path)) == 75


def test_test_split_needs_its_series_file(tmp_path, tables):
    write_tables(tmp_path, tables)
    with pytest.raises(SpineDataError, match="test_series_descriptions.csv"):
        load_tables(tmp_path, split="test")
    with pytest.raises(SpineDataError, match="split must be"):
        load_tables(tmp_path, split="val")


# --- scale and the phantom --------------------------------------------------------------------


def test_real_size_is_fast(tmp_path):
    """1,975 studies, ~6k series, ~49k coordinates (the real data's size) load in well under seconds."""
    rng = np.random.default_rng(0)
    n = 1975
    studies = rng.permutation(n).astype(np.int64) * 2_000_003 + 4_003_253  # real ids reach ~4.3e9
    train = pd.DataFrame({"study_id": studies})
    for column in LABEL_COLUMNS:
        train[column] = rng.choice([*SEVERITIES, ""], size=n, p=[0.7, 0.18, 0.1, 0.02])
    # Series ids 3 * i + {0, 1, 2} per study, one per plane; a quarter also get a second Axial T2.
    base = np.repeat(np.arange(n) * 4, 3) + np.tile([0, 1, 2], n)
    series = pd.DataFrame(
        {"study_id": np.repeat(studies, 3), "series_id": base, "series_description": np.tile(PLANES, n)}
    )
    extra = np.arange(0, n, 4)
    series = pd.concat(
        [
            series,
            pd.DataFrame(
                {"study_id": studies[extra], "series_id": extra * 4 + 3, "series_description": AX_T2}
            ),
        ]
    )
    conditions = np.repeat(CONDITION_NAMES, 5)
    levels = np.tile(LEVEL_NAMES, 5)
    plane_offset = np.array(
        [1 if c.startswith("Spinal") else 0 if "Foraminal" in c else 2 for c in conditions]
    )
    coords = pd.DataFrame(
        {
            "study_id": np.repeat(studies, 25),
            "series_id": np.repeat(np.arange(n) * 4, 25) + np.tile(plane_offset, n),
            "instance_number": rng.integers(1, 60, size=25 * n),
            "condition": np.tile(conditions, n),
            "level": np.tile(levels, n),
            "x": rng.uniform(0, 512, 25 * n),
            "y": rng.uniform(0, 512, 25 * n),
        }
    ).sample(frac=0.985, random_state=0)
    write_tables(tmp_path, {TRAIN: train, COORDS: coords, SERIES: series})

    start = time.perf_counter()
    frame = load_tables(tmp_path)
    seconds = time.perf_counter() - start
    assert len(frame) == 25 * n and frame.x.notna().sum() == len(coords)
    assert frame.groupby("study_id").size().eq(25).all()
    two_axial = frame[(frame.study_id == studies[0]) & (frame.plane == AX_T2)].candidate_series
    assert (two_axial == (2, 3)).all()
    assert seconds < 5.0, f"load_tables took {seconds:.2f} s"  # ~0.3 s measured; slack for a busy box


def test_phantom_tables(phantom_root):
    frame = load_tables(phantom_root)
    assert frame.groupby("study_id").size().eq(25).all()
    assert set(frame.label.unique()) <= {-1, 0, 1, 2}
    assert (frame.label >= 0).mean() > 0.5
    test = load_tables(phantom_root, split="test")
    assert test.groupby("study_id").size().eq(25).all() and (test.label == -1).all()
    assert set(test.study_id).isdisjoint(frame.study_id)
