"""Bad input that once gave a raw exception or a silently wrong result (issue 14), one test per class.

Each DICOM case writes a valid 3-slice series (``test_dicom.write_series``), breaks the middle
slice and expects either :class:`SpineDataError` naming that file (and tag) or a warning naming it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from test_dicom import AXIAL, write_series
from test_tables import make_tables, write_tables

from spinemm.data.dicom import read_series
from spinemm.errors import SpineDataError

# --- DICOM: the pixel module and other header faults -------------------------------------------------


def _series(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "series"
    write_series(folder, [(0.0, 0.0, float(i)) for i in range(3)], AXIAL, [1, 2, 3])
    return folder, folder / "2.dcm"


def _edit(path: Path, change: Callable[[pydicom.Dataset], None]) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def _patch_bytes(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert data.count(old) == 1, f"{old!r} must occur once in {path}"
    path.write_bytes(data.replace(old, new))


def _set(keyword: str, value: object) -> Callable[[pydicom.Dataset], None]:
    def change(ds: pydicom.Dataset) -> None:
        ds[keyword].value = value

    return change


def _rescale(slope: str, intercept: str) -> Callable[[pydicom.Dataset], None]:
    def change(ds: pydicom.Dataset) -> None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept

    return change


HEADER_FAULTS = {
    # (edit of the middle slice, words the error must contain besides the file)
    "empty SamplesPerPixel": (_set("SamplesPerPixel", None), "SamplesPerPixel"),
    "empty BitsAllocated": (_set("BitsAllocated", None), "BitsAllocated"),
    "empty BitsStored": (_set("BitsStored", None), "BitsStored"),
    "empty PixelRepresentation": (_set("PixelRepresentation", None), "PixelRepresentation"),
    "empty Rows": (_set("Rows", None), "Rows"),
    "BitsStored > BitsAllocated": (_set("BitsStored", 20), "BitsStored 20"),
    "BitsAllocated 12": (_set("BitsAllocated", 12), "BitsAllocated 12"),
    "PixelRepresentation 2": (_set("PixelRepresentation", 2), "PixelRepresentation 2"),
    "modality LUT overflows float32": (_rescale("1e38", "0"), "RescaleSlope"),
    "intercept overflows float32": (_rescale("1", "-3.5e38"), "RescaleIntercept"),
    "PixelSpacing 0": (_set("PixelSpacing", [0, 0.5]), "PixelSpacing"),
    "PixelSpacing negative": (_set("PixelSpacing", [0.5, -0.5]), "PixelSpacing"),
    # bounds before allocation (issue 28): a 60,000 px wide crop, a 20000 x 20000 slice
    "PixelSpacing 0.001": (_set("PixelSpacing", [0.001, 0.001]), "PixelSpacing (00280030) [0.001, 0.001] mm"),
    "PixelSpacing 50": (_set("PixelSpacing", [0.5, 50]), "PixelSpacing (00280030)"),
    "Rows 20000": (_set("Rows", 20000), "Rows (00280010) is 20000"),
    "Columns 65535": (_set("Columns", 65535), "Columns (00280011) is 65535"),
    "three frames without NumberOfFrames": (lambda ds: setattr(ds, "PixelData", ds.PixelData * 3),
                                            "3 frames"),
    "RescaleSlope 0": (_rescale("0", "0"), "RescaleSlope (00281053) is 0"),
    "ImageOrientationPatient not unit": (_set("ImageOrientationPatient", [2, 0, 0, 0, 1, 0]),
                                         "ImageOrientationPatient (00200037)"),
    "ImageOrientationPatient not orthogonal": (_set("ImageOrientationPatient", [1, 0, 0, 0.6, 0.8, 0]),
                                               "not two unit vectors at right angles"),
    # found by the fuzz (tests/test_fuzz.py): an int64 overflow while ordering the slices
    "InstanceNumber past int64": (_set("InstanceNumber", "1e38"), "InstanceNumber"),
}


@pytest.mark.parametrize("case", list(HEADER_FAULTS))
def test_bad_pixel_module_names_file_and_tag(tmp_path, case):
    change, words = HEADER_FAULTS[case]
    folder, broken = _series(tmp_path)
    _edit(broken, change)
    with pytest.raises(SpineDataError) as err:
        read_series(folder)
    assert str(broken) in str(err.value) and words in str(err.value)


BYTE_FAULTS = {
    # (bytes in the written file, replacement of the same length, words of the error)
    "unknown transfer syntax": (b"1.2.840.10008.1.2.1\0", b"1.2.840.10008.1.2.9\0", "TransferSyntaxUID"),
    "malformed transfer syntax": (b"1.2.840.10008.1.2.1\0", b"1.2.840.1x008.1.2.1\0", "TransferSyntaxUID"),
    # An unknown VR is kept raw by dcmread and only fails when the element is converted.
    "unknown VR in BitsStored": (b"\x28\x00\x01\x01US", b"\x28\x00\x01\x01ZZ", "BitsStored"),
    "unknown VR in Rows": (b"\x28\x00\x10\x00US", b"\x28\x00\x10\x00ZZ", "Rows"),
}


@pytest.mark.parametrize("case", list(BYTE_FAULTS))
def test_corrupt_header_bytes_name_file_and_tag(tmp_path, case):
    old, new, words = BYTE_FAULTS[case]
    folder, broken = _series(tmp_path)
    _patch_bytes(broken, old, new)
    with pytest.raises(SpineDataError) as err:
        read_series(folder)
    assert str(broken) in str(err.value) and words in str(err.value)


def test_modality_lut_within_float32_is_read(tmp_path):
    folder, broken = _series(tmp_path)
    _edit(broken, _rescale("1e30", "0"))  # 65535e30 fits float32: large but finite
    series = read_series(folder)
    assert np.isfinite(series.volume).all() and series.volume.max() > 1e31


@pytest.mark.parametrize("name", ["2.DCM", "2.Dcm", "2"])
def test_dicom_files_named_otherwise_are_read(tmp_path, name):
    folder, middle = _series(tmp_path)
    middle.rename(folder / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        series = read_series(folder)
    assert series.instance_numbers.tolist() == [1, 2, 3]
    assert series.files[1].name == name


def test_non_dicom_extras_are_ignored_with_a_warning(tmp_path):
    folder, _ = _series(tmp_path)
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub").mkdir()
    with pytest.warns(UserWarning, match=r"notes\.txt.*sub|sub.*notes\.txt") as record:
        series = read_series(folder)
    assert len(series.files) == 3 and str(folder) in str(record[0].message)


def test_a_misnamed_non_dicom_only_folder_names_what_it_found(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "scan.jpg").write_bytes(b"\xff\xd8\xff" + bytes(200))
    with pytest.raises(SpineDataError, match=r"no DICOM files.*scan\.jpg"):
        read_series(folder)


def test_differing_pixel_spacing_warns_naming_the_file(tmp_path):
    folder, broken = _series(tmp_path)
    _edit(broken, _set("PixelSpacing", [0.8, 0.8]))
    with pytest.warns(UserWarning, match=r"2\.dcm.*PixelSpacing"):
        series = read_series(folder)
    assert series.pixel_spacing == (0.5, 0.5)


def test_missing_pixel_spacing_warns_naming_the_series(tmp_path):
    folder, _ = _series(tmp_path)
    for path in folder.glob("*.dcm"):
        _edit(path, lambda ds: delattr(ds, "PixelSpacing"))
    with pytest.warns(UserWarning, match=rf"{folder}: no PixelSpacing \(00280030\).*read as 1.0 mm"):
        series = read_series(folder)
    assert series.pixel_spacing == (1.0, 1.0)


@pytest.mark.parametrize(("row", "column", "warns"), [(0.5004, 0.5, False), (0.5, 0.4996, False), (0.5, 0.5006, True)])
def test_pixel_spacing_within_a_thousandth_is_the_same(tmp_path, row, column, warns):
    folder, broken = _series(tmp_path)
    _edit(broken, _set("PixelSpacing", [row, column]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_series(folder)
    assert any("PixelSpacing" in str(w.message) for w in caught) == warns


# --- tables ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("column", ["x", "study_id"])
def test_duplicated_header_column_is_refused(tmp_path, column):
    tables = make_tables()
    root = write_tables(tmp_path, tables)
    path = root / "train_label_coordinates.csv"
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    lines = [f"{line},{line.split(',')[header.index(column)]}" for line in lines]  # the column, twice
    path.write_text("\n".join(lines) + "\n")
    from spinemm.data.tables import load_tables

    with pytest.raises(SpineDataError, match=rf"{path.name}: line 1 \(header\) repeats column '{column}'"):
        load_tables(root)


def test_header_repeated_after_stripping_is_refused(tmp_path):
    tables = make_tables()
    tables["train.csv"]["spinal_canal_stenosis_l1_l2 "] = tables["train.csv"]["spinal_canal_stenosis_l1_l2"]
    root = write_tables(tmp_path, tables)
    from spinemm.data.tables import load_tables

    with pytest.raises(SpineDataError, match=r"train\.csv: line 1 \(header\) repeats column 'spinal_canal"):
        load_tables(root)


# --- one label check for every reader of label coordinates (issue 28) ------------------------------


@pytest.mark.parametrize("reader", ["SpineDataset", "ROIWindows", "LevelSlices"])
@pytest.mark.parametrize("point", [{"x": 1e6}, {"x": -30.0}, {"y": "height + 0.6"}])
def test_every_reader_refuses_a_label_off_its_slice(phantom_root, reader, point):
    from spinemm.data import SpineDataset, load_tables
    from spinemm.data.level_slices import LevelSlices
    from spinemm.data.roi import ROIWindows

    frame = load_tables(phantom_root, "train")
    study = int(frame.study_id.iloc[0])
    frame = frame[frame.study_id == study].copy()
    row = frame.index[(frame.condition == "spinal_canal_stenosis") & frame.instance_number.notna()][0]
    (key, value), = point.items()
    if value == "height + 0.6":
        folder = Path(phantom_root, "train_images", str(study), str(int(frame.at[row, "series_id"])))
        value = read_series(folder).volume.shape[-2] + 0.6
    frame.loc[row, key] = value
    with pytest.raises(SpineDataError, match=rf"{study}.*\((x|label point)|lies outside|not a finite"):
        if reader == "SpineDataset":
            SpineDataset(phantom_root, frame=frame, num_slices=4, image_size=32, on_bad_series="raise")[0]
        elif reader == "ROIWindows":
            ROIWindows(phantom_root, frame, [study], side_mm=60, size=16, progress=False)
        else:
            LevelSlices(phantom_root, frame, [study], size=32, progress=False)
