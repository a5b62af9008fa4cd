"""read_series: decoding across transfer syntaxes, geometric order, intensities, geometry, bad input."""

from __future__ import annotations

import importlib.util
import random
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    generate_uid,
)

from spinemm.data.dicom import Series, map_point, read_series
from spinemm.errors import SpineDataError

SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # rows run posterior (+y), columns run inferior (-z)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

MR_SMALL_VARIANTS = [
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_padded.dcm",
]
# download=False: only the files bundled with the installed pydicom, never the network.
PRESENT = [name for name in MR_SMALL_VARIANTS if get_testdata_file(name, download=False)]


def _testdata(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not bundled with pydicom {pydicom.__version__}"
    return Path(path)


def write_slice(
    path: Path,
    pixels: np.ndarray,
    *,
    instance: int | None,
    position: tuple[float, float, float] | None,
    orientation: tuple[float, ...] | None = AXIAL,
    spacing: tuple[float, float] = (0.5, 0.5),
    photometric: str = "MONOCHROME2",
    bits_stored: int = 16,
    slope: float | None = None,
    intercept: float | None = None,
    signed: bool = False,
) -> None:
    """Write one uncompressed 16-bit MR slice (int16 when ``signed``) with the given geometry tags
    (None = tag absent)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.PixelSpacing = list(spacing)
    if instance is not None:
        ds.InstanceNumber = instance
    if position is not None:
        ds.ImagePositionPatient = list(position)
    if orientation is not None:
        ds.ImageOrientationPatient = list(orientation)
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_series(folder: Path, positions, orientation, instances, *, shape=(32, 32), spacing=(0.5, 0.5), seed=0):
    """Write one file per slice in shuffled order; slice i is filled with the value 100 + i."""
    folder.mkdir(parents=True, exist_ok=True)
    order = list(range(len(positions)))
    random.Random(seed).shuffle(order)
    for i in order:
        pixels = np.full(shape, 100 + i, dtype=np.uint16)
        write_slice(folder / f"{instances[i]}.dcm", pixels, instance=instances[i], position=positions[i],
                    orientation=orientation, spacing=spacing)


# --- decoding -------------------------------------------------------------------------------------


def test_variants_are_bundled():
    # The parametrised test below must not silently shrink to nothing on another pydicom.
    assert "MR_small.dcm" in PRESENT and len(PRESENT) >= 6, PRESENT


@pytest.mark.parametrize("name", PRESENT)
def test_mr_small_variants_decode_like_reference(tmp_path, name):
    reference = pydicom.dcmread(_testdata("MR_small.dcm")).pixel_array.astype(np.float32)
    shutil.copy(_testdata(name), tmp_path / "7.dcm")
    series = read_series(tmp_path)
    assert series.volume.dtype == np.float32 and series.volume.shape == (1, 64, 64)
    np.testing.assert_array_equal(series.volume[0], reference)
    assert series.instance_numbers.tolist() == [1]  # the tag wins over the file name
    assert series.instance_to_index == {1: 0}
    assert series.files == [tmp_path / "7.dcm"]
    np.testing.assert_allclose(series.positions[0], [-83.9063, -91.2, 6.6406])
    assert series.pixel_spacing == (0.3125, 0.3125)


NATIVE_CASES = {
    # name: (dtype stored in the file, BitsAllocated, BitsStored, PixelRepresentation, shape)
    "u16 12-bit, junk in unused bits": (np.uint16, 16, 12, 0, (6, 7)),
    "s16 12-bit, not sign-extended": (np.uint16, 16, 12, 1, (6, 7)),
    "s16 full": (np.int16, 16, 16, 1, (6, 7)),
    "u8 odd length": (np.uint8, 8, 8, 0, (3, 5)),
    "u32 full": (np.uint32, 32, 32, 0, (4, 4)),
}


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian], ids=["explicit", "implicit"])
@pytest.mark.parametrize("case", list(NATIVE_CASES))
def test_uncompressed_read_matches_pixel_array(tmp_path, case, syntax):
    # read_series reads uncompressed little-endian data in place instead of via pixel_array.
    dtype, bits, stored, signed, shape = NATIVE_CASES[case]
    high = min(np.iinfo(dtype).max, 1 << 24)  # float32 holds integers exactly up to 2**24
    raw = np.random.default_rng(3).integers(np.iinfo(dtype).min, high, size=shape, endpoint=True).astype(dtype)
    write_slice(tmp_path / "1.dcm", np.zeros((2, 2)), instance=1, position=(0, 0, 0))
    ds = pydicom.dcmread(tmp_path / "1.dcm")
    ds.file_meta.TransferSyntaxUID = syntax
    ds.Rows, ds.Columns = shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, stored, stored - 1, signed
    ds.PixelData = raw.tobytes() + b"\0" * (raw.nbytes % 2)
    ds.save_as(tmp_path / "1.dcm", enforce_file_format=True)

    expected = pydicom.dcmread(tmp_path / "1.dcm").pixel_array
    if stored < bits:  # the case is only meaningful if pydicom had to correct the unused bits
        assert not np.array_equal(expected, raw.view(expected.dtype))
    np.testing.assert_array_equal(read_series(tmp_path).volume[0], expected.astype(np.float32))


def test_uncompressed_read_skips_pixel_array(tmp_path, monkeypatch):
    def refuse(self):
        raise AssertionError("pixel_array should not be needed for uncompressed little-endian data")

    monkeypatch.setattr(Dataset, "pixel_array", property(refuse))
    write_slice(tmp_path / "1.dcm", np.arange(12).reshape(3, 4), instance=1, position=(0, 0, 0))
    np.testing.assert_array_equal(read_series(tmp_path).volume[0], np.arange(12).reshape(3, 4))


def test_missing_decoder_names_file_and_extra(tmp_path, monkeypatch):
    shutil.copy(_testdata("MR_small_jp2klossless.dcm"), tmp_path / "3.dcm")
    decoder = pydicom.pixels.get_decoder(JPEG2000Lossless)
    monkeypatch.setattr(decoder, "_available", {})  # as if no JPEG 2000 plugin were installed
    with pytest.raises(SpineDataError, match=r'pip install "spinemm\[dicom\]"') as info:
        read_series(tmp_path)
    assert str(tmp_path / "3.dcm") in str(info.value)


# --- bad input ------------------------------------------------------------------------------------


def test_truncated_file_raises_with_path(tmp_path):
    shutil.copy(_testdata("MR_truncated.dcm"), tmp_path / "1.dcm")
    with pytest.raises(SpineDataError, match="1.dcm"):
        read_series(tmp_path)


@pytest.mark.parametrize("content", [b"", b"not a dicom file at all\n" * 20, b"\0" * 128 + b"DICM\x02\x00"])
def test_non_dicom_files_raise_with_path(tmp_path, content):
    write_slice(tmp_path / "1.dcm", np.zeros((4, 4)), instance=1, position=(0, 0, 0))
    (tmp_path / "2.dcm").write_bytes(content)
    with pytest.raises(SpineDataError) as info:
        read_series(tmp_path)
    assert str(tmp_path / "2.dcm") in str(info.value)


def test_empty_and_missing_folders_raise_with_path(tmp_path):
    with pytest.raises(SpineDataError, match=str(tmp_path)):
        read_series(tmp_path)
    (tmp_path / "notes.txt").write_text("no dicom here")
    with pytest.raises(SpineDataError, match=r"no DICOM files.*notes\.txt"):
        read_series(tmp_path)
    with pytest.raises(SpineDataError, match="not a series folder"):
        read_series(tmp_path / "absent")


def test_pixel_less_file_raises(tmp_path):
    write_slice(tmp_path / "1.dcm", np.zeros((4, 4)), instance=1, position=(0, 0, 0))
    ds = pydicom.dcmread(tmp_path / "1.dcm")
    del ds.PixelData
    ds.save_as(tmp_path / "1.dcm")
    with pytest.raises(SpineDataError, match=r"1\.dcm: DICOM file has no pixel data"):
        read_series(tmp_path)


@pytest.mark.parametrize("kind", ["multiframe", "rgb"])
def test_multiframe_and_colour_are_refused(tmp_path, kind):
    write_slice(tmp_path / "5.dcm", np.zeros((4, 4)), instance=5, position=(0, 0, 0))
    ds = pydicom.dcmread(tmp_path / "5.dcm")
    if kind == "multiframe":
        ds.NumberOfFrames = 2
        ds.Rows = 2  # two 2x4 frames in the same bytes
        expected = "multi-frame"
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.Rows = ds.Columns = 2  # 2x2x3 bytes would need 12 bytes; 32 bytes present
        expected = "colour"
    ds.save_as(tmp_path / "5.dcm")
    with pytest.raises(SpineDataError, match=expected) as info:
        read_series(tmp_path)
    assert "5.dcm" in str(info.value)


def test_duplicate_instance_numbers_raise(tmp_path):
    shutil.copy(_testdata("MR_small.dcm"), tmp_path / "7.dcm")
    shutil.copy(_testdata("MR_small.dcm"), tmp_path / "8.dcm")
    with pytest.raises(SpineDataError, match="InstanceNumber 1 appears in several files"):
        read_series(tmp_path)


# --- ordering and instance map --------------------------------------------------------------------


@pytest.mark.parametrize("plane", ["sagittal", "axial"])
def test_series_comes_back_in_geometric_order(tmp_path, plane):
    # Instance numbers start at 101 and are scrambled relative to position.
    instances = [104, 101, 106, 103, 105, 102]
    depths = [4.0, -8.0, 12.0, 0.0, 8.0, -4.0]  # 4 mm apart, listed out of order
    if plane == "sagittal":  # normal = cross(+y, -z) = -x: ascending depth means descending x
        positions = [(-d, -20.0, 40.0) for d in depths]
        series = read_series(_written(tmp_path, positions, SAGITTAL, instances))
        np.testing.assert_allclose(series.normal, [-1, 0, 0])
    else:
        positions = [(-30.0, -25.0, d) for d in depths]
        series = read_series(_written(tmp_path, positions, AXIAL, instances))
        np.testing.assert_allclose(series.normal, [0, 0, 1])

    order = np.argsort(depths)  # slice i was filled with 100 + i
    assert series.instance_numbers.tolist() == [instances[i] for i in order] == [101, 102, 103, 104, 105, 106]
    assert series.instance_to_index == {101: 0, 102: 1, 103: 2, 104: 3, 105: 4, 106: 5}
    np.testing.assert_array_equal(series.volume[:, 0, 0], 100 + order)
    np.testing.assert_allclose(series.positions, np.asarray(positions)[order])
    assert [f.name for f in series.files] == [f"{instances[i]}.dcm" for i in order]
    assert series.slice_spacing == pytest.approx(4.0)
    assert series.instance_numbers.dtype == np.int64


def _written(folder: Path, positions, orientation, instances, **kwargs) -> Path:
    write_series(folder, positions, orientation, instances, **kwargs)
    return folder


def test_missing_positions_fall_back_to_instance_order(tmp_path):
    for stem, instance in [(30, 3), (10, 1), (20, None)]:  # 20.dcm has no InstanceNumber tag
        position = None if stem == 30 else (0.0, 0.0, float(-stem))
        write_slice(tmp_path / f"{stem}.dcm", np.full((8, 8), stem), instance=instance, position=position)
    with pytest.warns(UserWarning, match=r"missing in \['30.dcm'\].*ordered by InstanceNumber"):
        series = read_series(tmp_path)
    assert series.instance_numbers.tolist() == [1, 3, 20]  # the stem stands in for the absent tag
    np.testing.assert_array_equal(series.volume[:, 0, 0], [10, 30, 20])


# --- intensities ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("photometric", "slope", "intercept", "expected"),
    [
        ("MONOCHROME2", 2.0, -100.0, lambda raw: 2.0 * raw - 100.0),
        ("MONOCHROME1", None, None, lambda raw: 4095.0 - raw),  # mirrored within 12 stored bits
        ("MONOCHROME1", 2.0, -100.0, lambda raw: 2.0 * (4095.0 - raw) - 100.0),
    ],
)
def test_modality_lut_and_monochrome1(tmp_path, photometric, slope, intercept, expected):
    raw = np.random.default_rng(0).integers(0, 4096, size=(16, 24)).astype(np.uint16)
    write_slice(tmp_path / "1.dcm", raw, instance=1, position=(0, 0, 0), photometric=photometric,
                bits_stored=12, slope=slope, intercept=intercept)
    volume = read_series(tmp_path).volume
    assert volume.dtype == np.float32
    np.testing.assert_array_equal(volume[0], expected(raw.astype(np.float64)).astype(np.float32))


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_modality_lut_sequence(tmp_path, photometric):
    raw = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], dtype=np.uint16)
    write_slice(tmp_path / "1.dcm", raw, instance=1, position=(0, 0, 0), photometric=photometric, bits_stored=12)
    ds = pydicom.dcmread(tmp_path / "1.dcm")
    item = Dataset()
    item.LUTDescriptor, item.ModalityLUTType = [4, 0, 16], "US"
    item.add_new("LUTData", "US", [10, 20, 40, 80])  # 4 entries, first maps stored value 0
    ds.ModalityLUTSequence = [item]
    ds.save_as(tmp_path / "1.dcm")
    lut = np.array([10.0, 20.0, 40.0, 80.0])[raw]
    # Mirror range: f(0) = 10 and f(4095) = 80 (inputs past the table take its last entry).
    expected = lut if photometric == "MONOCHROME2" else 90.0 - lut
    np.testing.assert_array_equal(read_series(tmp_path).volume[0], expected)


def test_differing_slice_sizes_are_resampled_with_warning(tmp_path):
    for i in range(3):
        write_slice(tmp_path / f"{i + 1}.dcm", np.full((32, 32), 7), instance=i + 1, position=(0, 0, float(i)))
    ramp = np.tile(np.arange(16) * 2, (16, 1))  # 16x16, value = 2 * column
    write_slice(tmp_path / "4.dcm", ramp, instance=4, position=(0, 0, 3.0))
    with pytest.warns(UserWarning, match=r"\['4.dcm'\] differ from the common size \(32, 32\)"):
        series = read_series(tmp_path)
    assert series.volume.shape == (4, 32, 32)
    np.testing.assert_array_equal(series.volume[:3], 7)
    # Pixel centres aligned over the same field of view: output column j samples input column (j+0.5)/2-0.5.
    expected = 2 * np.clip((np.arange(32) + 0.5) / 2 - 0.5, 0, 15)
    np.testing.assert_allclose(series.volume[3], np.tile(expected, (32, 1)), atol=1e-5)


@pytest.mark.parametrize("case", ["rescaled", "mirrored", "negative slope", "signed", "slopes differ", "lut",
                                  "odd size", "constant"])
def test_windowed_read_is_bit_identical_to_windowing_the_physical_volume(tmp_path, monkeypatch, case):
    """read_series(windowed=True) windows a slice at a time without a float32 volume, and finds
    the window from a histogram of the stored integers where one rescale maps them all; the
    store's cache and every stage rely on it giving exactly what windowing the physical volume gives."""
    from spinemm.data.store import windowed

    rng = np.random.default_rng(3)
    size = 32 if case in ("lut", "odd size") else 256  # 256 px x 10 slices: the percentile grid is strided
    slopes = {"rescaled": 1.7, "mirrored": 1.7, "negative slope": -0.8, "slopes differ": 1.7}
    for i in range(10):
        raw = rng.integers(0, 4096, size=(size, size)) if case != "constant" else np.full((size, size), 9)
        if case == "signed":
            raw = raw - 2048
        if case == "odd size" and i == 4:
            raw = raw[:16, :16]
        slope = 2.3 if case == "slopes differ" and i == 6 else slopes.get(case)
        write_slice(tmp_path / f"{i + 1}.dcm", raw, instance=i + 1, position=(0, 0, float(i)), bits_stored=12,
                    photometric="MONOCHROME1" if case == "mirrored" else "MONOCHROME2",
                    slope=slope, intercept=-30.5, signed=case == "signed")
    if case == "lut":
        ds = pydicom.dcmread(tmp_path / "3.dcm")
        item = Dataset()
        item.LUTDescriptor, item.ModalityLUTType = [4096, 0, 16], "US"
        item.add_new("LUTData", "US", list(np.arange(4096) // 3))
        ds.ModalityLUTSequence = [item]
        ds.save_as(tmp_path / "3.dcm")
    if case not in ("slopes differ", "lut", "odd size"):  # these need the float path; the rest, the histogram
        from spinemm.data import pixels

        monkeypatch.setattr(pixels, "_window_from_physical", lambda *args: pytest.fail("float path taken"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the odd size's warning is tested above
        physical, unit = read_series(tmp_path), read_series(tmp_path, windowed=True)
    assert unit.windowed and unit.volume.dtype == np.float16 and unit.volume.shape == physical.volume.shape
    np.testing.assert_array_equal(unit.volume, windowed(physical).volume)
    assert unit.volume.max() == (0 if case == "constant" else 1) and unit.volume.min() == 0


@pytest.mark.parametrize("n", [1, 2, 3, 200, 4097])
def test_sample_percentiles_match_numpy(n):
    from spinemm.data.transforms import sample_percentiles

    rng = np.random.default_rng(n)
    for sample in (rng.normal(size=n).astype(np.float32), rng.integers(0, 9, size=n).astype(np.float32)):
        for q in ((0.5, 99.5), (0.0, 100.0), (50.0,), (12.5, 37.0, 99.9)):
            np.testing.assert_allclose(sample_percentiles(sample, q), np.percentile(sample, q), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="empty"):
        sample_percentiles(np.zeros(0), (50.0,))


# --- geometry -------------------------------------------------------------------------------------


def _sagittal(tmp_path: Path) -> Series:
    # Non-uniform gaps (3, 4, 5 mm) and unequal pixel spacing catch row/column or spacing mix-ups.
    xs = [6.0, 3.0, -1.0, -6.0]
    positions = [(x, -64.0, 100.0) for x in xs]
    return read_series(_written(tmp_path / "sag", positions, SAGITTAL, [11, 13, 10, 12], shape=(128, 96),
                                spacing=(1.0, 1.5)))


def test_voxel_to_patient_matches_definition(tmp_path):
    series = _sagittal(tmp_path)
    np.testing.assert_allclose(series.pixel_spacing, (1.0, 1.5))
    # x=10 columns * 1.5 mm along +y; y=20 rows * 1.0 mm along -z; slice 2 sits at x=-1.
    np.testing.assert_allclose(series.voxel_to_patient(np.array([[10.0, 20.0, 2.0]])), [[-1.0, -49.0, 80.0]])
    # Halfway between slices 2 (x=-1) and 3 (x=-6): interpolated, not median-spaced.
    np.testing.assert_allclose(series.voxel_to_patient(np.array([0.0, 0.0, 2.5])), [[-3.5, -64.0, 100.0]])
    # Past the last slice the end gap (5 mm) continues.
    np.testing.assert_allclose(series.voxel_to_patient(np.array([0.0, 0.0, 4.0])), [[-11.0, -64.0, 100.0]])


def test_voxel_patient_round_trip(tmp_path):
    series = _sagittal(tmp_path)
    rng = np.random.default_rng(1)
    voxels = np.column_stack([rng.uniform(-5, 100, 50), rng.uniform(-5, 130, 50), rng.uniform(-1, 4.5, 50)])
    np.testing.assert_allclose(series.patient_to_voxel(series.voxel_to_patient(voxels)), voxels, atol=1e-9)
    patients = rng.uniform(-50, 50, size=(50, 3))
    np.testing.assert_allclose(series.voxel_to_patient(series.patient_to_voxel(patients)), patients, atol=1e-9)


def test_sagittal_point_maps_to_axial_slice(tmp_path):
    sagittal = _sagittal(tmp_path)
    axial_z = [30.0, 10.0, 50.0, 20.0, 40.0]  # written out of order; sorted they are 10..50 mm
    axial = read_series(_written(tmp_path / "ax", [(-64.0, -64.0, z) for z in axial_z], AXIAL,
                                 [204, 202, 201, 205, 203], shape=(128, 128), spacing=(1.0, 1.0)))
    # Sagittal slice 1 is at x=3; column 40 -> y = -64 + 40*1.5 = -4; row 70 -> z = 100 - 70 = 30.
    x, y, k = map_point(sagittal, 40.0, 70.0, 1.0, axial)
    assert (x, y, k) == pytest.approx((67.0, 60.0, 2.0))
    assert axial.instance_numbers[round(k)] == 204  # the axial file written at z=30
    # Row 65 -> z = 35, halfway between the 30 mm and 40 mm axial slices.
    assert map_point(sagittal, 40.0, 65.0, 1.0, axial)[2] == pytest.approx(2.5)


# --- benchmark script -----------------------------------------------------------------------------


@pytest.mark.slow
def test_decode_benchmark_runs_on_existing_data(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "data_pipeline", Path(__file__).parents[1] / "benchmarks" / "data_pipeline.py"
    )
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "data_pipeline", bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    bench.write_synthetic(tmp_path, n_series=2, image_size=16, seed=0, n_slices=3)
    assert bench.main(["--root", str(tmp_path), "--series", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "(existing data); 2 series, 6 files" in out
    assert "| pydicom dcmread + pixel_array loop | 6 |" in out and "| spinemm read_series" in out
