"""Issue 28 items 5 and 6: labels read in the pixels of the slice they name, and each series' plane
read from its ImageOrientationPatient rather than from its description."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from spinemm.data import SpineDataset, load_tables
from spinemm.data.dicom import read_series
from spinemm.data.level_slices import LevelSlices
from spinemm.data.planes import assign_by_geometry
from spinemm.data.roi import ROIWindows, label_point
from spinemm.errors import SpineDataError

READERS = ["SpineDataset", "ROIWindows", "LevelSlices"]


def _resize_file(path: Path, factor: float) -> None:
    """Rewrite one slice at ``factor`` times its matrix over the same field of view (PixelSpacing
    divided by ``factor``): 2 repeats each pixel 2x2, 0.5 keeps every other one."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    if factor >= 1:
        pixels = np.kron(pixels, np.ones((int(factor), int(factor)), dtype=pixels.dtype))
    else:
        pixels = np.ascontiguousarray(pixels[:: int(1 / factor), :: int(1 / factor)])
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [float(v) / factor for v in ds.PixelSpacing]
    ds.PixelData = pixels.tobytes()
    ds.save_as(path)


def _canal_slice(frame: pd.DataFrame) -> tuple[int, int, int, pd.Index]:
    """(study, series, instance, frame rows) of the first study's labelled spinal canal slice."""
    study = int(frame.study_id.iloc[0])
    rows = frame[(frame.study_id == study) & (frame.condition == "spinal_canal_stenosis") & frame.x.notna()]
    series, instance = int(rows.series_id.iloc[0]), int(rows.instance_number.iloc[0])
    on_slice = rows.index[(rows.series_id == series) & (rows.instance_number == instance)]
    return study, series, instance, on_slice


def _read(reader: str, root: Path, frame: pd.DataFrame, study: int):
    """What each reader makes of the study's labels: location targets, crops, locator points."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the resampling and PixelSpacing warnings of an odd slice
        if reader == "SpineDataset":
            sample = SpineDataset(root, frame=frame, study_ids=[study], num_slices=4, image_size=32,
                                  on_bad_series="raise")[0]
            return sample["location"].numpy()[sample["location_mask"].numpy()]
        if reader == "ROIWindows":
            return ROIWindows(root, frame, [study], side_mm=60, size=16, progress=False).windows.float().numpy()
        return LevelSlices(root, frame, [study], size=32, progress=False).points.numpy()


@pytest.fixture(scope="module")
def odd_roots(phantom_root, tmp_path_factory):
    """Copies of the phantom whose labelled canal slice is stored at 2x (128 px in a 64 px series)
    and at 0.5x (32 px): ``{factor: root}``, and the study, series, instance and label rows."""
    frame = load_tables(phantom_root, "train")
    study, series, instance, rows = _canal_slice(frame)
    roots = {}
    for factor in (2, 0.5):
        root = tmp_path_factory.mktemp(f"odd{factor}")
        shutil.copytree(phantom_root, root, dirs_exist_ok=True)
        _resize_file(root / "train_images" / str(study) / str(series) / f"{instance}.dcm", factor)
        roots[factor] = root
    return roots, study, rows


def test_label_point_maps_a_slice_of_another_size_into_the_grid():
    # pixel centres aligned: pixel 0 of a 2x slice spans grid -0.25..0.25, its last pixel 127 -> 63.25
    assert label_point(127.0, 0.0, (128, 128), (64, 64)) == ((63.25, -0.25), None)
    assert label_point(10.0, 20.0, (64, 64), (64, 64)) == ((10.0, 20.0), None)
    point, problem = label_point(40.0, 5.0, (32, 32), (64, 64))
    assert point is None and "outside the 32x32 image" in problem


@pytest.mark.parametrize("reader", READERS)
def test_a_label_on_a_larger_slice_is_read_in_its_own_pixels(phantom_root, odd_roots, reader):
    """The issue's case: one 128 px slice in a 64 px series, labelled in its own pixels (y up to
    102), was refused as outside the 64 px image. It now reads exactly as the 64 px original."""
    roots, study, rows = odd_roots
    frame = load_tables(phantom_root, "train")
    expected = _read(reader, phantom_root, frame, study)
    own = frame.copy()
    own.loc[rows, ["x", "y"]] = 2 * own.loc[rows, ["x", "y"]] + 0.5  # the same points in the 2x slice's pixels
    assert (own.loc[rows, "y"] > 64).any()  # some lie beyond the common grid: the case of the issue
    got = _read(reader, roots[2], own, study)
    np.testing.assert_allclose(got, expected, atol=1e-3)


@pytest.mark.parametrize("reader", READERS)
def test_a_label_off_its_smaller_slice_is_refused_though_inside_the_grid(odd_roots, reader):
    """A 32 px slice in a 64 px series: a label at y > 32 lies inside the common grid but off the
    slice it names, and every reader refuses it naming the study and the slice's own size."""
    roots, study, rows = odd_roots
    frame = load_tables(roots[0.5], "train")
    assert (frame.loc[rows, "y"] > 32).any()
    with pytest.raises(SpineDataError, match=rf"(?=.*{study})(?=.*outside the 32x32 image)"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _read(reader, roots[0.5], frame, study)


def test_a_cached_stack_keeps_each_slice_size(odd_roots, tmp_path):
    roots, study, rows = odd_roots
    frame = load_tables(roots[2], "train")
    series = int(frame.loc[rows[0], "series_id"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cold = SpineDataset(roots[2], frame=frame, study_ids=[study], num_slices=4, image_size=32,
                            cache_dir=tmp_path).load_series(study, series)
        warm = SpineDataset(roots[2], frame=frame, study_ids=[study], num_slices=4, image_size=32,
                            cache_dir=tmp_path).load_series(study, series)
    assert cold.source_shapes is not None and (cold.source_shapes == [128, 128]).all(axis=1).sum() == 1
    np.testing.assert_array_equal(warm.source_shapes, cold.source_shapes)
    assert warm.plane == cold.plane == "sagittal"


def test_predicted_points_are_written_in_the_pixels_of_their_own_slice(phantom_root, odd_roots, monkeypatch):
    """The inverse of the labels' map: a point the pipeline places on the 2x slice (in the series'
    64 px grid, where every stage works) is written to locations.csv in that slice's own 128 px
    pixels, as its label is; location_errors reads both back to the same place (0 mm)."""
    import torch

    import spinemm
    from spinemm.models.config import LocatorConfig
    from spinemm.pipeline import LocateStage, SpinePipeline, StageOutput
    from spinemm.pipeline.location_errors import location_errors

    roots, study, rows = odd_roots
    grid = load_tables(phantom_root, "train").loc[rows[0]]  # the label in the 64 px original's pixels
    torch.manual_seed(0)
    pipeline = SpinePipeline(spinemm.create_model("spine-tiny", num_slices=4, **{"vision.image_size": 32}),
                             LocateStage(LocatorConfig(size=32, channels=(8, 16, 16)))).eval()
    locate = pipeline.locate.run

    def placed(inputs):  # the locate stage, with the labelled finding put on the odd slice
        out = locate(inputs)
        row = (out.findings.study_id == study) & (out.findings.target == int(grid.target))
        findings = out.findings.replace(row, series_id=int(grid.series_id), instance_number=int(grid.instance_number),
                                        x=float(grid.x), y=float(grid.y))
        return StageOutput(findings, out.probs, out.extras)

    monkeypatch.setattr(pipeline.locate, "run", placed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the resampling warning of the odd slice
        result = spinemm.predict(pipeline, roots[2], "train", study_ids=[study], progress=False)
    locations = result.locations()
    written = locations.set_index(["condition", "level"]).loc[(grid.condition, grid.level)]
    assert (written.x, written.y) == pytest.approx((2 * grid.x + 0.5, 2 * grid.y + 0.5))
    assert result.findings.x[result.findings.target == int(grid.target)][0] == pytest.approx(grid.x)  # stages: grid
    same = result.findings.located & (result.findings.instance_number != int(grid.instance_number))
    assert same.any()
    np.testing.assert_array_equal(locations.x.to_numpy()[same], result.findings.x[same])  # grid-sized slices: as is
    own = load_tables(phantom_root, "train")
    own.loc[rows, ["x", "y"]] = 2 * own.loc[rows, ["x", "y"]] + 0.5  # the label in the odd slice's pixels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        errors = location_errors(roots[2], "train", result.locations(), own[own.study_id == study])
    hit = errors[(errors.condition == grid.condition) & (errors.level == grid.level)]
    assert hit.error_mm.iloc[0] == pytest.approx(0.0, abs=1e-6)


# --- item 6: the plane from the geometry -----------------------------------------------------------


def _descriptions(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "test_series_descriptions.csv")


def _test_copy(phantom_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(phantom_root, root)
    return root


def _series_ids(root: Path) -> list[int]:
    dataset = SpineDataset(root, "test", num_slices=4, image_size=32)
    return dataset[0]["meta"]["series_ids"], dataset.study_ids[0]


def test_swapped_descriptions_are_named_and_the_geometry_is_trusted(phantom_root, tmp_path):
    """The issue's case: "Axial T2" and "Sagittal T2/STIR" swapped between two series of a study.
    Each is named in a warning, and each is still read as the plane its slices lie in."""
    expected, study = _series_ids(phantom_root)
    root = _test_copy(phantom_root, tmp_path)
    table = _descriptions(root)
    mine = table.study_id == study
    axial = mine & (table.series_description == "Axial T2")
    stir = mine & (table.series_description == "Sagittal T2/STIR")
    table.loc[axial, "series_description"], table.loc[stir, "series_description"] = "Sagittal T2/STIR", "Axial T2"
    table.to_csv(root / "test_series_descriptions.csv", index=False)
    with pytest.warns(UserWarning) as caught:
        got, _ = _series_ids(root)
    assert got == expected
    named = [str(w.message) for w in caught if "ImageOrientationPatient" in str(w.message)]
    for series, shown in ((int(table.series_id[axial].iloc[0]), "axial"), (int(table.series_id[stir].iloc[0]), "sagittal")):
        assert any(f"study {study} series {series}:" in m and f"in the {shown} plane" in m for m in named), named


def test_a_sagittal_series_described_axial_is_used_as_sagittal(phantom_root, tmp_path):
    """Only an "Axial T2" whose slices are sagittal (the true axial series left undescribed): it is
    not read as axial, and fills the sagittal slot its description left empty."""
    expected, study = _series_ids(phantom_root)
    root = _test_copy(phantom_root, tmp_path)
    table = _descriptions(root)
    mine = table.study_id == study
    table = table[~(mine & (table.series_description == "Axial T2"))]
    t1 = (table.study_id == study) & (table.series_description == "Sagittal T1")
    table.loc[t1, "series_description"] = "Axial T2"
    table.to_csv(root / "test_series_descriptions.csv", index=False)
    with pytest.warns(UserWarning, match=rf"study {study} series {expected[0]}: described as 'Axial T2'.*sagittal"):
        got, _ = _series_ids(root)
    assert got == [expected[0], expected[1], -1]


def test_assign_by_geometry_keeps_agreeing_and_unknown_planes():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # agreement and unknown geometry: no warning
        assert assign_by_geometry(1, [10, 11, 12], {10: "sagittal", 11: None, 12: "axial"}) == [10, 11, 12]
    with pytest.warns(UserWarning, match=r"study 1 series 12: .*coronal"):
        assert assign_by_geometry(1, [10, 11, 12], {10: "sagittal", 11: "sagittal", 12: "coronal"}) == [10, 11, -1]


def test_a_series_mixing_sagittal_and_axial_slices_is_refused_naming_it(phantom_root, tmp_path):
    """The issue's other case: one axial slice among a sagittal series' files. read_series refuses
    the series naming its folder; predict's reader treats it as missing with that message, and
    reads the study's other series."""
    expected, study = _series_ids(phantom_root)
    root = _test_copy(phantom_root, tmp_path)
    folder = root / "test_images" / str(study) / str(expected[1])
    path = sorted(folder.iterdir())[1]
    ds = pydicom.dcmread(path)
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # axial, in a sagittal series
    ds.save_as(path)
    with pytest.raises(SpineDataError, match=rf"{folder}: slice .* 90 degrees .*not a set of parallel"):
        read_series(folder)
    with pytest.warns(UserWarning, match=rf"series {expected[1]} of study {study} is unreadable.*90 degrees"):
        got, _ = _series_ids(root)
    assert got == [expected[0], -1, expected[2]]
