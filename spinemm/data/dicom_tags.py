"""Reading DICOM header elements for :mod:`spinemm.data.dicom`: fast text tags and the checked pixel module.

Every malformed value raises :class:`~spinemm.errors.SpineDataError` naming the file and the tag.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement

from spinemm.errors import SpineDataError

# Tags read on every file. Their values are parsed from the raw bytes (below) because pydicom's
# validating conversion costs ~10 us per tag: as much as 20% of decoding a 512x512 slice.
TAG = {
    keyword: tag_for_keyword(keyword)
    for keyword in (
        "PixelData", "ModalityLUTSequence", "NumberOfFrames", "PhotometricInterpretation", "InstanceNumber",
        "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SpacingBetweenSlices",
        "SliceThickness", "RescaleSlope", "RescaleIntercept",
    )
}


def tokens(ds: pydicom.Dataset, keyword: str) -> list[str] | None:
    """The backslash-separated values of a text element (CS, DS, IS), None when absent or empty.

    These VRs are ASCII in every transfer syntax, so the raw bytes can be split directly.
    """
    elem = ds.get_item(TAG[keyword])
    value = None if elem is None else elem.value
    if value is None:
        return None
    if isinstance(value, bytes):  # still raw: the common case straight after dcmread
        text = value.decode("ascii", "replace")
    elif isinstance(value, str | int | float):
        text = str(value)
    else:  # already converted to a MultiValue
        text = "\\".join(str(v) for v in value)
    parts = [t.strip(" \0") for t in text.split("\\")]
    return None if parts == [""] else parts


def numbers(ds: pydicom.Dataset, keyword: str, count: int, path: Path) -> list[float] | None:
    """A numeric text element as ``count`` finite floats, None if absent; malformed values raise."""
    text = tokens(ds, keyword)
    if text is None:
        return None
    try:
        values = [float(t) for t in text]
    except ValueError as exc:
        raise SpineDataError(f"{path}: {keyword} is not numeric ({text!r})") from exc
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise SpineDataError(f"{path}: {keyword} must hold {count} finite numbers, got {text!r}")
    return values


def number(ds: pydicom.Dataset, keyword: str, path: Path) -> float | None:
    """A single-valued numeric text element, None if absent."""
    value = numbers(ds, keyword, 1, path)
    return None if value is None else value[0]


def integer(ds: pydicom.Dataset, keyword: str, path: Path) -> int | None:
    """A single-valued integer text element (IS), None if absent."""
    value = number(ds, keyword, path)
    if value is not None and not value.is_integer():
        raise SpineDataError(f"{path}: {keyword} must be an integer, got {value}")
    return None if value is None else int(value)


FLOAT32_MAX = float(np.finfo(np.float32).max)
#: Largest Rows or Columns read. MR scanners write matrices of up to 1024 (the RSNA set: 256-1024);
#: 4096 leaves room for interpolated reconstructions, and a 4096² slice is 64 MiB as float32. A
#: larger claim is a corrupt header, refused before anything is decoded or allocated.
MAX_MATRIX_SIDE = 4096
#: PixelSpacing (mm) outside this range is refused. Finer than 0.05 mm is microscopy, not an MR
#: slice of the spine (real lumbar series: about 0.3-0.9 mm); coarser than 20 mm is a 300 mm field
#: of view in 15 pixels, no image at all (the smallest test phantoms use 12.5 mm). Within it, the
#: grade stage's 60 mm crop spans 3 to 1,200 pixels, so no crop runs away with the memory.
PIXEL_SPACING_RANGE_MM = (0.05, 20.0)


def pixel_tag(ds: pydicom.Dataset, keyword: str, path: Path, default: int | None = None) -> int:
    """One integer (US) element of the pixel module: ``default`` when absent; empty, multi-valued
    or unreadable (e.g. an unknown VR, which pydicom only trips over on conversion) raises."""
    elem = ds.get_item(tag_for_keyword(keyword))
    if elem is None:
        if default is None:
            raise SpineDataError(f"{path}: {keyword} ({tag_for_keyword(keyword):08X}) is missing")
        return default
    # The common case, straight after dcmread: one little-endian US value, still raw bytes (VR US,
    # or None under implicit VR, where the dictionary says US). Read it without pydicom's
    # conversion, which costs ~40 us a tag; anything else takes the checked path below.
    raw = getattr(elem, "value", None)
    if isinstance(elem, RawDataElement) and elem.is_little_endian and elem.VR in ("US", None) \
            and isinstance(raw, bytes) and len(raw) == 2:
        return int.from_bytes(raw, "little")
    try:
        value = ds[keyword].value
    except Exception as exc:
        raise SpineDataError(f"{path}: cannot read {keyword} ({type(exc).__name__}: {exc})") from exc
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpineDataError(f"{path}: {keyword} must be one integer, got {value!r}")
    return value


class PixelModule(NamedTuple):
    """The checked tags that say how to read a slice's pixel bytes."""

    syntax: pydicom.uid.UID | None  # TransferSyntaxUID (None: absent from the file meta)
    rows: int
    columns: int
    bits_allocated: int
    bits_stored: int
    signed: bool


def check_pixel_module(ds: pydicom.Dataset, path: Path) -> PixelModule:
    """Validate the tags that say how to read the pixel bytes, before decoding, and return them.
    pydicom would otherwise fail with raw errors or decode silently wrong."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is not None and not pydicom.uid.UID(syntax).is_transfer_syntax:
        raise SpineDataError(f"{path}: TransferSyntaxUID {str(syntax)!r} is not a known transfer syntax")
    rows, columns = pixel_tag(ds, "Rows", path), pixel_tag(ds, "Columns", path)
    for keyword, value in (("Rows", rows), ("Columns", columns)):
        if value < 1:
            raise SpineDataError(f"{path}: {keyword} must be at least 1, got {ds[keyword].value}")
        if value > MAX_MATRIX_SIDE:
            raise SpineDataError(f"{path}: {keyword} ({tag_for_keyword(keyword):08X}) is {value}, over the "
                                 f"{MAX_MATRIX_SIDE} a slice may have (spinemm.data.dicom_tags.MAX_MATRIX_SIDE)")
    allocated = pixel_tag(ds, "BitsAllocated", path)
    if allocated not in (8, 16, 32):
        raise SpineDataError(f"{path}: BitsAllocated {allocated} is not supported; expected 8, 16 or 32")
    stored = pixel_tag(ds, "BitsStored", path, allocated)
    if not 1 <= stored <= allocated:
        raise SpineDataError(f"{path}: BitsStored {stored} must lie in 1..BitsAllocated ({allocated})")
    representation = pixel_tag(ds, "PixelRepresentation", path, 0)
    if representation not in (0, 1):
        raise SpineDataError(f"{path}: PixelRepresentation {representation} must be 0 (unsigned) or 1 (signed)")
    return PixelModule(syntax, rows, columns, allocated, stored, representation == 1)
