"""Bounds on compressed DICOM input, checked before anything is inflated or decoded.

A compressed file is small; what it claims to hold need not be. Two claims are checked before any
decoder allocates for them (issue 28: a 6 KB JPEG-LS file whose stream declares 20000 x 20000
pixels, a 1.75 MB deflated file that inflates to 1.8 GB):

- :func:`check_frame_header`: the size a JPEG, JPEG-LS or JPEG 2000 frame declares in its own
  stream header (the SOF / SOF55 segment, the SIZ marker) must equal Rows x Columns, which
  :func:`~spinemm.data.dicom_tags.check_pixel_module` has already bounded by ``MAX_MATRIX_SIDE``.
  The decoders size their output from the stream, not from the DICOM header, so an unchecked stream
  would allocate what it declares (and a C++ decoder aborts the whole process when that fails).
  RLE streams declare no size: pydicom sizes their output from Rows x Columns.
- :func:`check_deflated`: a Deflated Explicit VR Little Endian file (1.2.840.10008.1.2.1.99) is
  inflated by pydicom whole, at read time, with no limit. It is first inflated here a chunk at a
  time, keeping nothing, and refused once it passes :data:`MAX_INFLATED_BYTES`.

Both raise :class:`~spinemm.errors.SpineDataError` naming the file and the tag at fault.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pydicom
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from spinemm.errors import SpineDataError

from .dicom_tags import MAX_MATRIX_SIDE

__all__ = ["HEAD_BYTES", "MAX_INFLATED_BYTES", "check_deflated", "check_frame_header", "may_be_deflated"]

#: Most bytes a deflated dataset may inflate to: the largest slice spinemm reads (``MAX_MATRIX_SIDE``
#: squared, 32 bits a pixel: 64 MiB) plus 16 MiB of header, far beyond any real MR header.
MAX_INFLATED_BYTES = 4 * MAX_MATRIX_SIDE**2 + (16 << 20)
_CHUNK = 1 << 20  # inflated a MiB at a time: the check holds one chunk, never the whole
HEAD_BYTES = 1024  # the file meta (with its TransferSyntaxUID) lies in a file's first bytes
_DEFLATED_UID = str(DeflatedExplicitVRLittleEndian).encode()
_JPEG_SYNTAXES = frozenset(JPEGTransferSyntaxes) | frozenset(JPEGLSTransferSyntaxes)
_J2K_SYNTAXES = frozenset(JPEG2000TransferSyntaxes)
# Start-of-frame markers: SOF0..SOF15 but DHT (C4), JPG (C8) and DAC (CC); SOF55 (F7) is JPEG-LS's.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
_HEADER_SCAN = 1 << 16  # a frame's size is declared in its first bytes; scan no further


def may_be_deflated(head: bytes) -> bool:
    """Whether a file's first bytes (``HEAD_BYTES`` of them: where the file meta is) hold the deflated
    syntax's UID: a test cheap enough for every file, so only such files pay for :func:`check_deflated`."""
    return _DEFLATED_UID in head


def check_deflated(path: Path, limit: int = MAX_INFLATED_BYTES) -> None:
    """Refuse a deflated file whose dataset inflates beyond ``limit`` bytes, before pydicom
    inflates it whole; a file of another transfer syntax passes. Memory: one chunk."""
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception as exc:  # a broken meta: dcmread reports it, naming the file
        raise SpineDataError(f"{path}: cannot read the DICOM file meta ({type(exc).__name__}: {exc})") from exc
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return
    with open(path, "rb") as fh:
        head = fh.read(144)
        # preamble, "DICM", then (0002,0000) UL 4 <group length>: the deflated stream follows the group
        if len(head) < 144 or head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
            raise SpineDataError(f"{path}: deflated file without a FileMetaInformationGroupLength (00020000) "
                                 f"first in its file meta; cannot find where the deflated dataset starts")
        fh.seek(144 + struct.unpack_from("<I", head, 140)[0])
        inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
        while not inflater.eof:
            data = inflater.unconsumed_tail or fh.read(_CHUNK)
            if not data:
                break
            try:
                total += len(inflater.decompress(data, _CHUNK))
            except zlib.error as exc:
                raise SpineDataError(f"{path}: the deflated dataset (TransferSyntaxUID 00020010 "
                                     f"{DeflatedExplicitVRLittleEndian}) is corrupt ({exc})") from exc
            if total > limit:
                raise SpineDataError(
                    f"{path}: the deflated dataset (TransferSyntaxUID 00020010 {DeflatedExplicitVRLittleEndian}) "
                    f"inflates to more than {limit / 2**20:.0f} MiB, more than a {MAX_MATRIX_SIDE}² slice and its "
                    f"header need (spinemm.data.compressed.MAX_INFLATED_BYTES); refused before inflating it")


def check_frame_header(ds: pydicom.Dataset, syntax: pydicom.uid.UID | None, rows: int, columns: int,
                       path: Path) -> None:
    """The size a compressed frame's own stream header declares must be Rows x Columns (module
    docstring); streams of other syntaxes, and streams whose header cannot be found, pass (the
    decoder reports those)."""
    if syntax not in _JPEG_SYNTAXES and syntax not in _J2K_SYNTAXES:
        return
    value = ds.get_item(pydicom.datadict.tag_for_keyword("PixelData")).value
    if not isinstance(value, bytes):
        return
    fragment = _first_fragment(value)
    declared = _jpeg_size(fragment) if syntax in _JPEG_SYNTAXES else _j2k_size(fragment)
    if declared is not None and declared != (rows, columns):
        raise SpineDataError(
            f"{path}: the {syntax.name} frame in PixelData (7FE00010) declares {declared[0]} x {declared[1]} "
            f"pixels, but Rows (00280010) x Columns (00280011) are {rows} x {columns}; refused before decoding")


def _first_fragment(data: bytes) -> bytes:
    """The start of the first fragment after the Basic Offset Table of encapsulated pixel data."""
    pos, item = 0, 0
    while pos + 8 <= len(data):
        tag, length = struct.unpack_from("<II", data, pos)
        if tag != 0xE000FFFE or length == 0xFFFFFFFF:  # not an item (FFFE,E000) of defined length
            return b""
        pos += 8
        if item == 1:
            return data[pos:pos + min(length, _HEADER_SCAN)]
        item, pos = item + 1, pos + length
    return b""


def _jpeg_size(stream: bytes) -> tuple[int, int] | None:
    """(lines, samples per line) of a JPEG / JPEG-LS stream's start-of-frame segment; None when
    there is none before the scan, or it leaves the lines to a later DNL segment (0)."""
    if not stream.startswith(b"\xff\xd8"):
        return None
    pos = 2
    while pos + 4 <= len(stream):
        if stream[pos] != 0xFF:
            return None
        marker = stream[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = struct.unpack_from(">H", stream, pos + 2)[0]
        if marker in _SOF and pos + 9 <= len(stream):
            lines, samples = struct.unpack_from(">HH", stream, pos + 5)
            return (lines, samples) if lines else None
        if marker == 0xDA:  # start of scan: no frame header before it
            return None
        pos += 2 + length
    return None


def _j2k_size(stream: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG 2000 codestream's SIZ marker (a JP2 wrapper's boxes are skipped by
    searching for SOC + SIZ); None when there is none."""
    start = stream.find(b"\xff\x4f\xff\x51")
    if start < 0 or start + 24 > len(stream):
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", stream, start + 8)
    return ysiz - yosiz, xsiz - xosiz
