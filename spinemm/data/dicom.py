"""Read one DICOM series folder into a float32 volume with its patient-space geometry.

A series folder holds one ``{instance_number}.dcm`` file per slice (RSNA 2024 layout); files named
otherwise are read too when they are DICOM (see :func:`~spinemm.data.series.series_files`). InstanceNumber
is not a reliable geometric order, so slices are sorted by the projection of ImagePositionPatient on
the slice normal (``cross(row_cos, col_cos)``), and the InstanceNumber -> sorted index map is kept
because labels are keyed by instance number.

Intensities are "denormalised" to physical values: the modality LUT f (RescaleSlope/Intercept, or a
ModalityLUTSequence) is applied, and MONOCHROME1 slices are mirrored within the range their stored
bits can hold (``f(lo) + f(hi) - f(raw)``), so every slice reads "bright = high" through one mapping
that does not depend on the slice's content.

Policy for awkward series (each case warns or raises; nothing is silently dropped):

- slices of differing size: resampled (bilinear, same field of view) to the most common shape, with a
  warning naming the files; their geometry is taken as that of the common grid, and each slice's own
  size is kept (``Series.source_shapes``) so a label in its pixels is checked against that size and
  then mapped into the common grid (:func:`spinemm.data.roi.label_point`);
- slices with differing orientation (axial blocks angled per disc): grouped into blocks of one
  orientation, sorted within a block along its own normal and the blocks along the body axis; the
  Series keeps each slice's orientation (``Series.orientations``) and maps points through each
  slice's own plane. Blocks more than 60 degrees apart (e.g. sagittal and axial slices in one
  series) raise SpineDataError;
- a file without ImagePositionPatient / ImageOrientationPatient: the whole series falls back to
  InstanceNumber order with nominal geometry (origin 0, axial orientation), with a warning;
- slices whose PixelSpacing differs: the first slice's spacing is used, with a warning naming the files;
- multi-frame, colour, non-DICOM, truncated, empty or pixel-less files, duplicate instance numbers
  and empty folders raise :class:`~spinemm.errors.SpineDataError` naming the path;
- so does an inconsistent pixel module (checked before decoding, naming the tag): an empty or
  unreadable Rows / Columns / SamplesPerPixel / BitsAllocated / BitsStored / PixelRepresentation,
  BitsStored outside 1..BitsAllocated, an unknown TransferSyntaxUID, PixelSpacing of 0 or below, a
  compressed frame whose stream declares another size than Rows x Columns, a deflated dataset that
  inflates beyond a bound (:mod:`spinemm.data.compressed`), or
  a modality LUT that maps a storable value outside float32 (it would read as inf); any other failure
  inside pydicom (e.g. a header element of unknown VR, converted lazily) is a SpineDataError too;
- a compressed file whose decoder is missing raises SpineDataError saying ``pip install "spinemm[dicom]"``.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

from spinemm.errors import SpineDataError

from .compressed import HEAD_BYTES, check_deflated, may_be_deflated
from .decode import decode_pixels
from .dicom_tags import (
    FLOAT32_MAX,
    PIXEL_SPACING_RANGE_MM,
    TAG,
    check_pixel_module,
    integer,
    number,
    numbers,
    pixel_tag,
    tokens,
)
from .pixels import physical_slice, physical_volume, unit_volume
from .series import NOMINAL_ORIENTATION, Series, map_point, series_files

__all__ = ["Series", "read_series", "read_slice", "map_point"]

@dataclass
class _Slice:
    """What one file contributes before sorting: raw pixels plus the tags that place and scale them."""

    path: Path
    pixels: np.ndarray  # [H, W] as stored (any integer or float dtype)
    instance: int
    position: np.ndarray | None
    orientation: np.ndarray | None
    spacing: tuple[float, float]
    spacing_recorded: bool  # False: the file has no PixelSpacing and ``spacing`` is the 1 mm default
    thickness: float  # SpacingBetweenSlices, else SliceThickness, else 1 mm: the gap of a lone slice
    slope: float
    intercept: float
    mirror: float | None  # MONOCHROME1: f(lo) + f(hi), f = modality LUT, [lo, hi] = stored-value range
    lut_dataset: pydicom.Dataset | None  # kept only when a ModalityLUTSequence must be applied


def read_series(series_dir: str | os.PathLike, windowed: bool = False) -> Series:
    """Read every DICOM file of ``series_dir`` into a :class:`Series` (policy: module docstring).

    Each file is read once by ``dcmread``; uncompressed little-endian pixels are used in place,
    anything else goes through ``pixel_array``. The float32 volume of physical intensities is
    allocated once and filled in sorted order; ``windowed=True`` gives instead the float16 volume
    in [0, 1] every pipeline stage reads (``Series.windowed``; :func:`~spinemm.data.pixels.unit_volume`),
    made in the same pass. Raises SpineDataError naming the file or folder at fault.
    """
    series_dir = Path(series_dir)
    slices = [_read_slice(path) for path in series_files(series_dir)]
    _check_unique_instances(slices, series_dir)
    _check_common_spacing(slices, series_dir)
    unmeasured = [s.path.name for s in slices if not s.spacing_recorded]
    if unmeasured:
        warnings.warn(f"{series_dir}: no PixelSpacing (00280030) in {unmeasured[:3]}"
                      f"{' ...' if len(unmeasured) > 3 else ''}; read as 1.0 mm, so millimetre crops and "
                      f"distances in this series are only as right as that guess", stacklevel=2)

    geometric = all(s.position is not None and s.orientation is not None for s in slices)
    orientations = None
    if geometric:
        slices, orientations, gaps = _geometric_order(slices, series_dir)
        orientation = slices[0].orientation
        normal = _unit_normal(orientation, slices[0].path)
        positions = np.stack([s.position for s in slices])
    else:
        missing = [s.path.name for s in slices if s.position is None or s.orientation is None]
        warnings.warn(
            f"{series_dir}: ImagePositionPatient/ImageOrientationPatient missing in {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}; slices ordered by InstanceNumber, geometry is nominal",
            stacklevel=2,
        )
        slices.sort(key=lambda s: s.instance)
        orientation = NOMINAL_ORIENTATION.copy()
        normal = np.array([0.0, 0.0, 1.0])
        positions, gaps = None, np.empty(0)

    slice_spacing = float(np.median(gaps)) if len(gaps) else 0.0
    if slice_spacing <= 0:  # one slice, all at one position, or no geometry: fall back to the tags
        slice_spacing = slices[0].thickness
    if positions is None:
        positions = np.arange(len(slices))[:, None] * slice_spacing * normal

    volume = unit_volume(slices, series_dir) if windowed else physical_volume(slices, series_dir)
    instances = np.array([s.instance for s in slices], dtype=np.int64)
    shapes = np.array([s.pixels.shape for s in slices], dtype=np.int64)
    resampled = bool((shapes != np.array(volume.shape[1:])).any())  # labels stay in their slice's pixels
    return Series(
        volume=volume,
        instance_numbers=instances,
        instance_to_index={int(n): i for i, n in enumerate(instances)},
        positions=positions,
        orientation=np.asarray(orientation, dtype=np.float64),
        normal=normal,
        pixel_spacing=slices[0].spacing,
        slice_spacing=slice_spacing,
        files=[s.path for s in slices],
        orientations=orientations,
        windowed=windowed,
        source_shapes=shapes if resampled else None,
        nominal=not geometric,
    )


#: Blocks whose slice normals differ by more than this are not per-level oblique planes of one
#: series (lumbar discs differ by up to ~40 degrees of lordosis; sagittal vs axial is 90).
_MAX_BLOCK_ANGLE = 60.0


def read_slice(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, float] | None]:
    """One greyscale DICOM file, read with :func:`read_series`'s checks and decoders: ``(float32
    [H, W] physical intensities (modality LUT applied, MONOCHROME1 mirrored), (row mm, column mm)
    PixelSpacing or None when the file records none)``. A bad file raises SpineDataError naming it."""
    s = _read_slice(Path(path), in_series=False)
    out = np.empty(s.pixels.shape, dtype=np.float32)
    physical_slice(s, s.pixels.shape, out)
    return out, s.spacing if s.spacing_recorded else None


def _geometric_order(slices: list[_Slice], series_dir: Path) -> tuple[list[_Slice], np.ndarray | None, np.ndarray]:
    """Sort slices into blocks of one orientation each: within a block along its own normal
    (InstanceNumber breaks ties of repeated positions), blocks along the body axis (the mean of
    their normals). Returns (sorted slices, per-slice orientations [S, 2, 3] or None when there is
    one block, gaps between neighbouring slices of each block). A series whose blocks lie more than
    ``_MAX_BLOCK_ANGLE`` apart raises SpineDataError."""
    groups: list[list[_Slice]] = []
    for s in slices:
        group = next((g for g in groups if _same_orientation(g[0].orientation, s.orientation)), None)
        if group is None:
            groups.append([s])
        else:
            group.append(s)
    normals = [_unit_normal(g[0].orientation, g[0].path) for g in groups]
    for group, normal in zip(groups, normals, strict=True):
        angle = math.degrees(math.acos(min(1.0, abs(float(normal @ normals[0])))))
        if angle > _MAX_BLOCK_ANGLE:
            raise SpineDataError(
                f"{series_dir}: slice {group[0].path.name} lies in a plane {angle:.0f} degrees from "
                f"{groups[0][0].path.name}'s; the series is not a set of parallel or per-level oblique planes"
            )
    axis = sum(n * np.sign(float(n @ normals[0]) or 1.0) for n in normals)
    axis = axis / np.linalg.norm(axis)
    gaps = []
    for group, normal in zip(groups, normals, strict=True):
        # Depth rounded to 1 µm so float noise does not outrank the tie-break.
        group.sort(key=lambda s, n=normal: (round(float(s.position @ n), 3), s.instance))
        gaps.append(np.diff([float(s.position @ normal) for s in group]))
    order = np.argsort([np.mean([s.position @ axis for s in g]) for g in groups], kind="stable")
    ordered = [s for b in order for s in groups[b]]
    if len(groups) == 1:
        return ordered, None, gaps[0]
    # Each slice carries its block's orientation exactly, so the blocks are unambiguous downstream.
    orientations = np.stack([groups[b][0].orientation for b in order for _ in groups[b]]).astype(np.float64)
    return ordered, orientations, np.concatenate(gaps)


def _same_orientation(a: np.ndarray, b: np.ndarray) -> bool:
    """``np.allclose(a, b, atol=1e-4)``, at a tenth of its cost (it runs once per file)."""
    return bool((np.abs(a - b) <= 1e-4 + 1e-5 * np.abs(b)).all())


def _read_slice(path: Path, in_series: bool = True) -> _Slice:
    """Open ``path`` once and pull out its pixels and placing tags; bad files raise SpineDataError.
    ``in_series=False``: a lone slice, which needs no InstanceNumber (0 when it has none)."""
    try:
        with open(path, "rb") as fh:  # one open: the bounds' peek at the file meta, then dcmread
            if may_be_deflated(fh.read(HEAD_BYTES)):
                check_deflated(path)  # before pydicom inflates the whole dataset, unbounded
            fh.seek(0)
            ds = pydicom.dcmread(fh)
    except SpineDataError:
        raise
    except InvalidDicomError as exc:
        raise SpineDataError(f"{path}: not a DICOM file ({exc})") from exc
    except Exception as exc:  # truncated headers and garbage raise many kinds inside pydicom
        raise SpineDataError(f"{path}: cannot parse DICOM file ({type(exc).__name__}: {exc})") from exc
    try:
        return _parse_slice(ds, path, in_series)
    except SpineDataError:
        raise
    except Exception as exc:  # pydicom converts elements lazily: a malformed one fails only when read
        raise SpineDataError(f"{path}: malformed DICOM header ({type(exc).__name__}: {exc})") from exc


def _parse_slice(ds: pydicom.Dataset, path: Path, in_series: bool = True) -> _Slice:
    if TAG["PixelData"] not in ds:
        raise SpineDataError(f"{path}: DICOM file has no pixel data")
    frames = integer(ds, "NumberOfFrames", path) or 1
    if frames > 1:
        raise SpineDataError(f"{path}: multi-frame DICOM ({frames} frames) is not supported; expected one slice per file")
    photometric = (tokens(ds, "PhotometricInterpretation") or ["MONOCHROME2"])[0].upper()
    if pixel_tag(ds, "SamplesPerPixel", path, 1) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise SpineDataError(f"{path}: colour DICOM ({photometric}) is not supported; expected greyscale MRI")
    module = check_pixel_module(ds, path)
    bits_stored, signed = module.bits_stored, module.signed
    pixels = decode_pixels(ds, module, path)
    if pixels.ndim != 2:
        raise SpineDataError(f"{path}: expected a 2-D greyscale slice, got pixel array of shape {pixels.shape}")

    slope = number(ds, "RescaleSlope", path)
    if slope == 0:  # every pixel would map to the intercept: a broken header, not a flat image
        raise SpineDataError(f"{path}: RescaleSlope (00281053) is 0; a modality rescale needs a non-zero slope")
    slope = 1.0 if slope is None else slope
    intercept = number(ds, "RescaleIntercept", path) or 0.0
    lut_dataset = ds if TAG["ModalityLUTSequence"] in ds else None
    # The ends of the storable range, mapped: the LUT is monotonic in practice and linear when it is
    # a rescale, so finite ends mean every pixel maps to a finite float32 (checked without a pass).
    ends = np.array([-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1] if signed else [0, (1 << bits_stored) - 1])
    mapped = ends * slope + intercept if lut_dataset is None else apply_modality_lut(ends, lut_dataset)
    if not np.all(np.abs(mapped) < FLOAT32_MAX):
        raise SpineDataError(
            f"{path}: modality LUT (RescaleSlope {slope}, RescaleIntercept {intercept}) maps stored values "
            f"{ends.tolist()} to {np.asarray(mapped).tolist()}, outside float32: intensities would be inf"
        )
    mirror = float(np.sum(mapped)) if photometric == "MONOCHROME1" else None
    orientation = numbers(ds, "ImageOrientationPatient", 6, path)
    if orientation is not None:
        _check_orientation(np.array(orientation).reshape(2, 3), path)
    recorded = numbers(ds, "PixelSpacing", 2, path)
    spacing = recorded or (1.0, 1.0)
    if min(spacing) <= 0:
        raise SpineDataError(f"{path}: PixelSpacing {list(spacing)} must be positive (mm per pixel)")
    low, high = PIXEL_SPACING_RANGE_MM
    if not all(low <= v <= high for v in spacing):
        raise SpineDataError(f"{path}: PixelSpacing (00280030) {list(spacing)} mm lies outside {low}-{high} mm, "
                             f"the range of an MR slice (spinemm.data.dicom_tags.PIXEL_SPACING_RANGE_MM)")
    thickness = number(ds, "SpacingBetweenSlices", path) or number(ds, "SliceThickness", path) or 1.0
    position = numbers(ds, "ImagePositionPatient", 3, path)
    return _Slice(
        path=path,
        pixels=pixels,
        instance=_instance_number(ds, path) if in_series else integer(ds, "InstanceNumber", path) or 0,
        position=None if position is None else np.array(position),
        orientation=None if orientation is None else np.array(orientation).reshape(2, 3),
        spacing=(spacing[0], spacing[1]),
        spacing_recorded=recorded is not None,
        thickness=thickness if thickness > 0 else 1.0,
        slope=slope,
        intercept=intercept,
        mirror=mirror,
        lut_dataset=lut_dataset,
    )


def _instance_number(ds: pydicom.Dataset, path: Path) -> int:
    """InstanceNumber tag, else the file stem when it is a plain integer (RSNA names files by it)."""
    instance = integer(ds, "InstanceNumber", path)
    if instance is None and re.fullmatch(r"[0-9]+", path.stem):
        instance = int(path.stem)
    if instance is None:
        raise SpineDataError(f"{path}: no InstanceNumber tag and the file name is not an integer")
    if not -(1 << 31) <= instance < (1 << 31):  # the range of an IS value; labels key on it as int64
        raise SpineDataError(f"{path}: InstanceNumber {instance} is outside the range of a DICOM IS value")
    return instance


def _check_orientation(orientation: np.ndarray, path: Path) -> None:
    """Row and column cosines must be unit vectors at right angles (to 1%): anything else places
    every pixel wrongly in patient space, silently."""
    lengths = np.linalg.norm(orientation, axis=1)
    angle = float(np.dot(orientation[0], orientation[1]))
    if not (np.allclose(lengths, 1.0, atol=0.01) and abs(angle) < 0.01):
        raise SpineDataError(f"{path}: ImageOrientationPatient (00200037) {orientation.reshape(-1).tolist()} is not "
                             f"two unit vectors at right angles (lengths {np.round(lengths, 3).tolist()}, "
                             f"cosine between them {angle:.3f})")


def _unit_normal(orientation: np.ndarray, path: Path) -> np.ndarray:
    normal = np.cross(orientation[0], orientation[1])
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        raise SpineDataError(f"{path}: ImageOrientationPatient rows and columns are parallel")
    return normal / norm


def _check_common_spacing(slices: list[_Slice], series_dir: Path) -> None:
    # The Series has one PixelSpacing; a slice that differs would be measured with the wrong one.
    spacings = np.array([s.spacing for s in slices])
    spacing = spacings[0]
    # np.allclose(s.spacing, spacing, rtol=1e-3) for every slice at once (it cost 25 us a call)
    close = (np.abs(spacings - spacing) <= 1e-8 + 1e-3 * np.abs(spacing)).all(axis=1)
    odd = [s.path.name for s, ok in zip(slices, close, strict=True) if not ok]
    if odd:
        warnings.warn(
            f"{series_dir}: slices {odd[:5]}{' ...' if len(odd) > 5 else ''} have a PixelSpacing other than "
            f"{slices[0].path.name}'s {spacing.tolist()}; the series uses {spacing.tolist()} mm",
            stacklevel=3,
        )


def _check_unique_instances(slices: list[_Slice], series_dir: Path) -> None:
    # Labels are keyed by instance number: a duplicate would make the map ambiguous.
    seen: dict[int, str] = {}
    for s in slices:
        if seen.setdefault(s.instance, s.path.name) != s.path.name:
            raise SpineDataError(
                f"{series_dir}: InstanceNumber {s.instance} appears in several files {[seen[s.instance], s.path.name]}"
            )
