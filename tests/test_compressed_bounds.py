"""Issue 28, "no size limit before allocating": a compressed frame's declared size and a deflated
dataset's inflated size are checked before any decoder or inflater allocates for them."""

from __future__ import annotations

import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian
from test_dicom import AXIAL, write_series

from spinemm.data import compressed
from spinemm.data.dicom import read_series
from spinemm.errors import SpineDataError


def declare_size(path: Path, rows: int, columns: int) -> None:
    """Patch the size a JPEG / JPEG-LS (SOF) or JPEG 2000 (SIZ) frame declares in its own stream,
    leaving Rows and Columns and every other byte as they are."""
    data = bytearray(path.read_bytes())
    siz = data.find(b"\xff\x4f\xff\x51")
    if siz >= 0:
        xo, yo = struct.unpack_from(">II", data, siz + 16)
        data[siz + 8:siz + 16] = struct.pack(">II", columns + xo, rows + yo)
    else:
        sof = next(i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC1, 0xC3, 0xF7))
        data[sof + 5:sof + 9] = struct.pack(">HH", rows, columns)
    path.write_bytes(bytes(data))


def deflate_bomb(path: Path, inflated_bytes: int) -> None:
    """A deflated DICOM file whose dataset inflates to ``inflated_bytes``: a small valid slice's file
    meta, then an OB element of zeros (about 1,000:1, so 1.8 GB fit in 1.8 MB), made in chunks."""
    folder = path.parent / "_bomb_source"
    write_series(folder, [(0.0, 0.0, 0.0)], AXIAL, [1])
    ds = pydicom.dcmread(folder / "1.dcm")
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    meta_end = 144 + struct.unpack_from("<I", raw, 140)[0]
    body = struct.pack("<HH2sHI", 0x0009, 0x0010, b"OB", 0, inflated_bytes)  # private OB, explicit length
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(1 << 24)
    with open(path, "wb") as fh:
        fh.write(raw[:meta_end])
        fh.write(deflater.compress(body))
        left = inflated_bytes
        while left:
            fh.write(deflater.compress(zeros[:min(left, len(zeros))]))
            left -= min(left, len(zeros))
        fh.write(deflater.flush())
    shutil.rmtree(folder)


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"])
def test_a_frame_declaring_20000_squared_is_refused_before_decoding(tmp_path, name):
    """The issue's case: a small compressed file whose stream claims 20000 x 20000 (Rows and Columns
    say 64 x 64). Unchecked, JPEG-LS decoded for 45 s to 2.5 GB before failing."""
    source = get_testdata_file(name, download=False)
    assert source is not None, f"{name} is no longer bundled with pydicom: the test needs another source file"
    path = tmp_path / "1.dcm"
    shutil.copy(source, path)
    declare_size(path, 20000, 20000)
    assert path.stat().st_size < 10_000
    start = time.perf_counter()
    with pytest.raises(SpineDataError, match=rf"{path}: the .* frame in PixelData \(7FE00010\) declares 20000 x 20000 "
                                             r"pixels, but Rows \(00280010\) x Columns \(00280011\) are 64 x 64"):
        read_series(tmp_path)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm"])
def test_a_frame_declaring_its_true_size_reads(tmp_path, name):
    source = get_testdata_file(name, download=False)
    assert source is not None, f"{name} is no longer bundled with pydicom: the test needs another source file"
    shutil.copy(source, tmp_path / "1.dcm")
    reference = pydicom.dcmread(get_testdata_file("MR_small.dcm", download=False)).pixel_array
    np.testing.assert_array_equal(read_series(tmp_path).volume[0], reference)


def test_a_deflate_bomb_is_refused_before_pydicom_inflates_it(tmp_path, monkeypatch):
    """The issue's case, scaled to the default suite: a ~100 KB deflated file that inflates to
    96 MiB, past the 80 MiB bound (the long fuzz tier runs the 1.8 GB case under a 2 GiB limit)."""
    folder = tmp_path / "series"
    folder.mkdir()
    path = folder / "1.dcm"
    deflate_bomb(path, 96 << 20)
    assert path.stat().st_size < 200_000 and (96 << 20) > compressed.MAX_INFLATED_BYTES == 80 << 20
    calls = []
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: calls.append(a))  # must never be reached
    with pytest.raises(SpineDataError, match=rf"{path}: the deflated dataset \(TransferSyntaxUID 00020010 "
                                             r"1\.2\.840\.10008\.1\.2\.1\.99\) inflates to more than 80 MiB"):
        read_series(folder)
    assert calls == []


def test_a_deflated_series_within_the_bound_reads_as_the_plain_one(tmp_path):
    plain, deflated = tmp_path / "plain", tmp_path / "deflated"
    write_series(plain, [(0.0, 0.0, float(i)) for i in range(3)], AXIAL, [1, 2, 3])
    deflated.mkdir()
    for path in plain.iterdir():
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(deflated / path.name, enforce_file_format=True)
    assert pydicom.dcmread(deflated / "1.dcm").file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    np.testing.assert_array_equal(read_series(deflated).volume, read_series(plain).volume)
    with pytest.raises(SpineDataError, match=r"1\.dcm: the deflated dataset .* inflates to more than 0 MiB"):
        compressed.check_deflated(deflated / "1.dcm", limit=100)


def test_a_corrupt_deflated_stream_is_named(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    path = folder / "1.dcm"
    deflate_bomb(path, 1 << 20)
    data = bytearray(path.read_bytes())
    data[-40:-20] = b"\xff" * 20
    path.write_bytes(bytes(data))
    with pytest.raises(SpineDataError, match=rf"{path}: "):
        read_series(folder)
