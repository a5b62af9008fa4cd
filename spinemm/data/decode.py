"""A slice's stored pixel values, decoded once: in place for native little-endian data, else
through pydicom's ``pixel_array`` after the compressed-input bounds (:mod:`spinemm.data.compressed`).
Used by :func:`~spinemm.data.dicom.read_series`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import get_decoder
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from spinemm.errors import SpineDataError

from .compressed import check_frame_header
from .dicom_tags import TAG, PixelModule

__all__ = ["decode_pixels"]


def decode_pixels(ds: pydicom.Dataset, module: PixelModule, path: Path) -> np.ndarray:
    """The slice's stored values [H, W]: ``ds.pixel_array``, or the same values read in place.

    A compressed frame's declared size is checked first (:func:`~spinemm.data.compressed.check_frame_header`);
    decoder and corruption failures become SpineDataError naming the file.
    """
    check_frame_header(ds, module.syntax, module.rows, module.columns, path)  # before a decoder allocates
    native = _native_pixels(ds, module, path)
    if native is not None:
        return native
    try:
        return ds.pixel_array
    except (KeyboardInterrupt, SystemExit):
        raise
    # pydicom raises many kinds; all mean "this file cannot be decoded". A Rust decoder's panic on a
    # garbled stream (pylibjpeg-rle: pyo3's PanicException) derives from BaseException, not Exception.
    except BaseException as exc:
        syntax = module.syntax
        if syntax is not None and syntax.is_compressed and not _decoder_available(syntax):
            raise SpineDataError(
                f"{path}: no decoder installed for {syntax.name} pixel data; "
                f'install one with: pip install "spinemm[dicom]"'
            ) from exc
        raise SpineDataError(f"{path}: cannot decode pixel data ({exc})") from exc


# Uncompressed little-endian pixel data needs no decoding: pydicom's pixel_array reinterprets the
# bytes too, but its option handling and defensive copy cost about 40% of reading a 512x512 slice
# (DESIGN §6 anchor). Other syntaxes and anything unusual go through pixel_array.
_NATIVE_LITTLE_ENDIAN = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def _native_pixels(ds: pydicom.Dataset, module: PixelModule, path: Path) -> np.ndarray | None:
    """The values ``ds.pixel_array`` would give, as a read-only view on the file's bytes; None when
    the data is not plain native little-endian (then pixel_array decodes it or reports the fault)."""
    if module.syntax not in _NATIVE_LITTLE_ENDIAN:
        return None
    rows, cols, bits, stored = module.rows, module.columns, module.bits_allocated, module.bits_stored
    data = ds.get_item(TAG["PixelData"]).value
    if not isinstance(data, bytes):
        return None
    dtype = np.dtype(f"<{'ui'[module.signed]}{bits // 8}")
    needed = rows * cols * dtype.itemsize
    if len(data) < needed:
        return None  # short data: let pixel_array raise its precise error
    if len(data) >= 2 * needed:  # trailing padding happens (pydicom's MR_small_padded); a whole frame more does not
        raise SpineDataError(f"{path}: PixelData (7FE00010) holds {len(data)} bytes, {len(data) // needed} frames "
                             f"of {rows} x {cols} x {dtype.itemsize} bytes, but NumberOfFrames says 1: hidden "
                             f"frames or a wrong Rows/Columns")
    pixels = np.frombuffer(data, dtype=dtype, count=rows * cols).reshape(rows, cols)
    if stored < bits:
        # Unused high bits carry no meaning (PS3.5 8.1.1); pydicom shifts them out. Do the same, but
        # only when some value lies outside the stored range, which is rare.
        lo, hi = (-(1 << (stored - 1)), (1 << (stored - 1)) - 1) if module.signed else (0, (1 << stored) - 1)
        if pixels.max() > hi or (module.signed and pixels.min() < lo):
            shift = bits - stored
            pixels = (pixels << shift) >> shift  # arithmetic right shift sign-extends signed dtypes
    return pixels


def _decoder_available(syntax: pydicom.uid.UID) -> bool:
    try:
        return get_decoder(syntax).is_available
    except NotImplementedError:  # pydicom has no decoder at all for this transfer syntax
        return False
