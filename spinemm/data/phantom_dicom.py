"""The phantom's scanner: slice planning, acquisition effects and DICOM writing.

A :class:`SeriesPlan` holds the geometry of every slice of one series exactly as it is written to
DICOM (values are rounded to what the files store before anything is rendered), so label
coordinates projected with the plan match what a reader recovers from the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from .phantom_anatomy import Anatomy, curve_frame, finding_point, render, to_patient
from .phantom_scanner import Scanner, draw_scanner, encode, noise_scale, reconstruct

__all__ = ["SeriesPlan", "plan_sagittal", "plan_axial", "acquire", "locate", "write_series", "make_uid"]

_SEQUENCE = {"Sagittal T1": "T1", "Sagittal T2/STIR": "T2", "Axial T2": "T2"}
_TIMING = {"T1": (550.0, 10.0), "T2": (3500.0, 100.0)}  # (RepetitionTime, EchoTime) ms


@dataclass(frozen=True)
class SeriesPlan:
    """Geometry and numbering of one series. ``S`` slices of ``shape`` pixels (square ``size`` x
    ``size`` unless a :class:`~.phantom_scanner.Scanner` stores it on its own matrix)."""

    description: str
    positions: np.ndarray  # float64 [S, 3] ImagePositionPatient (centre of pixel (0, 0))
    orientation: np.ndarray  # float64 [2, 3] (row direction, column direction) cosines
    pixel_spacing: float  # mm, square pixels
    thickness: float  # SliceThickness, mm
    gap: float  # SpacingBetweenSlices, mm
    size: int
    instance_numbers: np.ndarray  # int64 [S]
    # float64 [S, 2, 3]: each slice's own cosines, for blocks angled per level; None: all ``orientation``
    orientations: np.ndarray | None = None
    scanner: Scanner | None = None  # the real set's variety; None: the plain phantom's square matrix

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of every slice."""
        return (self.scanner.rows, self.scanner.columns) if self.scanner else (self.size, self.size)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.orientation[0], self.orientation[1])

    def slice_orientations(self) -> np.ndarray:
        """float64 [S, 2, 3]: every slice's (row, column) cosines."""
        if self.orientations is not None:
            return self.orientations
        return np.broadcast_to(self.orientation, (len(self.positions), 2, 3))

    @property
    def sequence(self) -> str:
        return _SEQUENCE[self.description]


def _numbering(rng: np.random.Generator, order: np.ndarray) -> np.ndarray:
    """Instance numbers: slice ``order[r]`` gets ``start + r``, with a start that is never 1."""
    numbers = np.empty(len(order), dtype=np.int64)
    numbers[order] = int(rng.integers(2, 60)) + np.arange(len(order))
    return numbers


def _stack(centres: np.ndarray, orientation: np.ndarray, spacing: float, size: int,
           scanner: Scanner | None = None) -> np.ndarray:
    """ImagePositionPatient of slices whose image centres are ``centres [S, 3]``, rounded as stored."""
    if scanner is None:
        corner = centres - (size - 1) / 2 * spacing * (orientation[0] + orientation[1])
    else:
        corner = centres - spacing / 2 * ((scanner.columns - 1) * orientation[0] + (scanner.rows - 1) * orientation[1])
    return np.round(corner, 4)


def _matrix(rng: np.random.Generator, fov_mm: float, size: int,
            syntaxes: tuple[str, ...] | None) -> tuple[float, Scanner | None]:
    """Pixel spacing of a ``fov_mm`` wide image: on the square ``size`` matrix (``syntaxes`` None,
    the plain phantom), or on a matrix and vendor drawn as the real set's variety."""
    if syntaxes is None:
        return round(fov_mm / size, 6), None
    scanner, spacing = draw_scanner(rng, fov_mm, syntaxes)
    return spacing, scanner


def plan_sagittal(rng: np.random.Generator, anat: Anatomy, description: str, size: int,
                  syntaxes: tuple[str, ...] | None = None) -> SeriesPlan:
    """12-18 parasagittal slices covering both neural foramina; image rows run head to feet.

    ``syntaxes`` (the transfer syntaxes a variety phantom may write; None for the plain phantom)
    draws the real set's variety instead: 15-20 slices 3-4.5 mm apart on a scanner's own matrix."""
    kaggle = syntaxes is not None
    n = int(rng.integers(15, 21)) if kaggle else int(rng.integers(12, 19))
    # Wide enough that the outermost slices lie beyond the foramina.
    gap = rng.uniform(3.0, 4.5) if kaggle else rng.uniform(3.3, 4.4)
    gap = round(max(gap, 2 * (anat.foramen_w + 4 * anat.scale) / (n - 1)), 4)
    spacing, scanner = _matrix(rng, rng.uniform(230.0, 300.0), size, syntaxes)
    orientation = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0]])  # columns -> posterior, rows -> feet
    normal = np.cross(orientation[0], orientation[1])  # towards the patient's right
    centre = anat.p0 + np.array(
        [rng.uniform(-0.5, 0.5) * gap, 20 * anat.scale + rng.uniform(-15, 15), rng.uniform(-25, 15)]
    )
    offsets = (np.arange(n) - (n - 1) / 2) * gap
    order = np.arange(n) if rng.random() < 0.5 else np.arange(n)[::-1]
    return SeriesPlan(
        description=description,
        positions=_stack(centre + offsets[:, None] * normal, orientation, spacing, size, scanner),
        orientation=orientation,
        pixel_spacing=spacing,
        thickness=round(gap * rng.uniform(0.85, 1.0), 4),
        gap=gap,
        size=scanner.columns if scanner else size,
        instance_numbers=_numbering(rng, order),
        scanner=scanner,
    )


def plan_axial(rng: np.random.Generator, anat: Anatomy, size: int, oblique: bool = False,
               per_level: tuple[int, int] = (3, 5), syntaxes: tuple[str, ...] | None = None) -> SeriesPlan:
    """``per_level`` (fewest, most; 3-5 by default) parallel slices centred on the canal at each graded disc.

    ``oblique=False``: one orientation, perpendicular to the spine between L3/L4 and L4/L5 (tilted
    a few degrees), so every level's slices cut the canal at its disc. ``oblique=True``: each
    level's block is perpendicular to the spine at its own disc (as real protocols angle each
    block), so the series holds five orientations. Instance numbers follow the levels in a random
    order, so they are not in geometric order. ``syntaxes``: as for :func:`plan_sagittal`, the
    scanner's own matrix and vendor.
    """
    mid = 0.5 * (anat.disc_s[-3] + anat.disc_s[-2])
    beta = np.deg2rad(rng.uniform(-4.0, 4.0))
    gap = round(rng.uniform(3.0, 4.0), 4)
    spacing, scanner = _matrix(rng, rng.uniform(150.0, 200.0), size, syntaxes)
    shift = (10 * anat.scale + rng.uniform(-8, 8), rng.uniform(-8, 8))  # image centre off the canal
    # per level: (orientation, centre of the image plane through the origin, depth of the canal)
    frames = []
    for level in range(5):
        s_level = anat.disc_s[-5 + level] if oblique else mid
        tangent, posterior = curve_frame(anat, s_level)
        col = np.cos(beta) * posterior + np.sin(beta) * tangent
        orientation = np.round(np.stack([np.array([1.0, 0.0, 0.0]), col]), 6)
        normal = np.cross(orientation[0], orientation[1])  # towards the head
        origin = to_patient(anat, s_level, *shift)
        frames.append((orientation, origin - (origin @ normal) * normal, finding_point(anat, 0, level) @ normal))

    centres, per_slice, blocks = [], [], []
    for orientation, in_plane, target in frames:
        normal = np.cross(orientation[0], orientation[1])
        m = int(rng.integers(per_level[0], per_level[1] + 1))
        depth = target + (np.arange(m)[::-1] - (m - 1) / 2) * gap  # head first
        centres.append(in_plane + depth[:, None] * normal)
        per_slice += [orientation] * m
        blocks.append(m)
    starts = np.cumsum([0, *blocks])
    direction = 1 if rng.random() < 0.5 else -1
    order = np.concatenate([np.arange(starts[b], starts[b + 1])[::direction] for b in rng.permutation(5)])
    orientations = np.stack(per_slice)
    positions = np.concatenate(
        [_stack(c, o, spacing, size, scanner) for c, o in zip(centres, (f[0] for f in frames), strict=True)]
    )
    return SeriesPlan(
        description="Axial T2",
        positions=positions,
        orientation=orientations[0],
        pixel_spacing=spacing,
        thickness=round(gap * rng.uniform(0.85, 1.0), 4),
        gap=gap,
        size=scanner.columns if scanner else size,
        instance_numbers=_numbering(rng, order),
        orientations=orientations if oblique else None,
        scanner=scanner,
    )


def _pixel_points(plan: SeriesPlan, shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patient coordinates (x, y, z), each float32 ``[S, H, W]``, of every pixel centre; on a
    coarser ``shape`` grid over the same field of view when given (the acquired matrix)."""
    if shape is None:
        idx = np.arange(plan.size, dtype=np.float32) * np.float32(plan.pixel_spacing)
        rows, cols = idx[None, :, None], idx[None, None, :]
    else:
        (height, width), (h, w) = plan.shape, shape
        rows = (np.arange(h) * (height * plan.pixel_spacing / h)).astype(np.float32)[None, :, None]
        cols = (np.arange(w) * (width * plan.pixel_spacing / w)).astype(np.float32)[None, None, :]
    cosines = plan.slice_orientations().astype(np.float32)[:, :, :, None, None]  # [S, 2, 3, 1, 1]
    out = []
    for d in range(3):
        origin = plan.positions[:, d].astype(np.float32)[:, None, None]
        out.append(origin + cols * cosines[:, 0, d] + rows * cosines[:, 1, d])
    return out[0], out[1], out[2]


def _blur(image: np.ndarray) -> np.ndarray:
    """[1, 2, 1] / 4 binomial blur along both image axes of ``[S, H, W]``: a simple point-spread."""
    padded = np.pad(image, ((0, 0), (1, 1), (0, 0)), mode="edge")
    image = 0.25 * padded[:, :-2] + 0.5 * padded[:, 1:-1] + 0.25 * padded[:, 2:]
    padded = np.pad(image, ((0, 0), (0, 0), (1, 1)), mode="edge")
    return 0.25 * padded[:, :, :-2] + 0.5 * padded[:, :, 1:-1] + 0.25 * padded[:, :, 2:]


def acquire(rng: np.random.Generator, anat: Anatomy, plan: SeriesPlan) -> tuple[np.ndarray, float, float]:
    """Scan ``plan``: render, blur, bias field, gain, Rician noise, then store as uint16.

    Returns ``(stored uint16 [S, H, W], RescaleSlope, RescaleIntercept)``; physical intensity is
    ``stored * slope + intercept``. A plan with a scanner is rendered on its acquired matrix, with
    noise scaled to that matrix's pixels, zero-filled to the stored matrix and stored as its vendor
    does (:mod:`.phantom_scanner`).
    """
    scanner = plan.scanner
    x, y, z = _pixel_points(plan, scanner.acquired if scanner else None)
    image = _blur(render(anat, x, y, z, plan.sequence))
    # Smooth multiplicative bias (coil sensitivity), defined in patient space around the spine.
    coef = rng.normal(0.0, 0.15, size=5).astype(np.float32)
    px, py, pz = ((v - np.float32(c)) / np.float32(150.0) for v, c in zip((x, y, z), anat.p0, strict=True))
    image *= np.exp(coef[0] * px + coef[1] * py + coef[2] * pz + coef[3] * py * pz + coef[4] * pz * pz)
    sigma = np.float32(rng.uniform(0.015, 0.04))
    if scanner is not None:
        height, width = plan.shape
        acquired_mm = (height * plan.pixel_spacing / scanner.acquired[0], width * plan.pixel_spacing / scanner.acquired[1])
        sigma *= np.float32(noise_scale(acquired_mm))
    real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    if scanner is not None:
        magnitude = reconstruct(real + 1j * imag, *plan.shape)
        return encode(magnitude * np.float32(rng.uniform(400.0, 2500.0)), scanner, rng)
    physical = np.hypot(real, imag) * np.float32(rng.uniform(400.0, 2500.0))
    if rng.random() < 0.5:
        slope, intercept = round(rng.uniform(0.5, 3.0), 6), round(rng.uniform(-20.0, 0.0), 3)
    else:
        slope, intercept = 1.0, 0.0
    stored = np.clip(np.rint((physical - intercept) / slope), 0, 65535).astype(np.uint16)
    return stored, slope, intercept


def locate(plan: SeriesPlan, point: np.ndarray) -> tuple[int, float, float]:
    """The slice nearest ``point`` (patient mm) and its (x = column, y = row) in that slice's pixels.

    Distances are to each slice's own plane, among the slices whose image holds the point's
    projection (the planes of other levels' blocks extend far beyond their images)."""
    cosines = plan.slice_orientations()
    delta = point - plan.positions  # [S, 3]
    normals = np.cross(cosines[:, 0], cosines[:, 1])
    x = np.einsum("sd,sd->s", delta, cosines[:, 0]) / plan.pixel_spacing
    y = np.einsum("sd,sd->s", delta, cosines[:, 1]) / plan.pixel_spacing
    height, width = plan.shape
    inside = (x >= -0.5) & (x <= width - 0.5) & (y >= -0.5) & (y <= height - 0.5)
    distance = np.abs(np.einsum("sd,sd->s", delta, normals)) + np.where(inside, 0.0, 1e6)
    k = int(np.argmin(distance))
    return k, float(x[k]), float(y[k])


def make_uid(*parts: object) -> str:
    """A DICOM UID derived deterministically from ``parts``."""
    return str(generate_uid(entropy_srcs=["spinemm-phantom", *map(str, parts)]))


def _ds(values: np.ndarray) -> list[str]:
    """Decimal strings for a DS element; "%.10g" never exceeds DS's 16 characters."""
    return [f"{v:.10g}" for v in np.asarray(values, dtype=np.float64).ravel()]


def _series_header(plan: SeriesPlan, rescale: tuple[float, float], ids: dict) -> Dataset:
    """The elements every slice of the series shares."""
    tr, te = _TIMING[plan.sequence]
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.StudyInstanceUID = ids["study_uid"]
    ds.SeriesInstanceUID = ids["series_uid"]
    ds.FrameOfReferenceUID = ids["frame_uid"]
    ds.Modality = "MR"
    ds.PatientID = str(ids["study_id"])
    ds.StudyID = str(ids["study_id"])
    ds.StudyDate = "20240101"
    ds.BodyPartExamined = "LSPINE"
    ds.PatientPosition = "HFS"
    ds.SeriesDescription = plan.description
    ds.SeriesNumber = int(ids["series_number"])
    ds.ScanningSequence = "SE"
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime = _ds([tr])[0]
    ds.EchoTime = _ds([te])[0]
    ds.MagneticFieldStrength = "1.5"
    ds.ImageOrientationPatient = _ds(plan.orientation)
    ds.SliceThickness = _ds([plan.thickness])[0]
    ds.SpacingBetweenSlices = _ds([plan.gap])[0]
    ds.PixelSpacing = _ds([plan.pixel_spacing, plan.pixel_spacing])
    ds.Rows, ds.Columns = plan.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if plan.scanner and plan.scanner.monochrome1 else "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = plan.scanner.bits_stored if plan.scanner else 16
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope = _ds([rescale[0]])[0]
    ds.RescaleIntercept = _ds([rescale[1]])[0]
    ds.RescaleType = "US"
    return ds


def write_series(
    directory: Path,
    plan: SeriesPlan,
    stored: np.ndarray,
    rescale: tuple[float, float],
    ids: dict,
    rng: np.random.Generator,
) -> None:
    """Write one ``{instance_number}.dcm`` per slice into ``directory``, in a shuffled order.

    ``ids`` holds ``study_id``, ``series_id``, ``series_number``, ``study_uid``, ``series_uid`` and
    ``frame_uid``; SOPInstanceUIDs derive from the series UID and the instance number.
    """
    directory.mkdir(parents=True, exist_ok=True)
    header = _series_header(plan, rescale, ids)
    normal = plan.normal
    for k in rng.permutation(len(plan.positions)):
        instance = int(plan.instance_numbers[k])
        sop_uid = make_uid(ids["series_uid"], instance)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        path = directory / f"{instance}.dcm"
        # A new element dict per file; the shared header elements are only read when writing.
        ds = FileDataset(path, {elem.tag: elem for elem in header}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = instance
        ds.ImagePositionPatient = _ds(plan.positions[k])
        if plan.orientations is not None:
            ds.ImageOrientationPatient = _ds(plan.orientations[k])
            normal = np.cross(plan.orientations[k][0], plan.orientations[k][1])
        ds.SliceLocation = _ds([plan.positions[k] @ normal])[0]
        syntax = plan.scanner.transfer_syntax if plan.scanner else ExplicitVRLittleEndian
        if syntax == ExplicitVRLittleEndian:
            ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        else:  # lossless: the reader must recover these exact stored values
            ds.compress(syntax, np.ascontiguousarray(stored[k]))
        dcmwrite(path, ds, enforce_file_format=True)
