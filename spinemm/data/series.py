"""A DICOM series in memory: the sorted float32 volume and its patient-space (LPS mm) geometry.

:func:`spinemm.data.read_series` builds it; :meth:`Series.voxel_to_patient` and
:meth:`Series.patient_to_voxel` map between a slice's pixels and patient space, and
:func:`map_point` carries a point from one series of a study into another (sagittal -> axial).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spinemm.errors import SpineDataError

__all__ = ["Series", "map_point", "series_files"]

NOMINAL_ORIENTATION = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


@dataclass(eq=False)  # array fields: identity comparison, not an ambiguous elementwise ==
class Series:
    """One series: slices in geometric order plus the geometry that maps voxels to patient space.

    Voxel coordinates are ``(x, y, k)`` = (column, row, slice index), all floats; patient
    coordinates are LPS millimetres, as in DICOM.
    """

    volume: np.ndarray  # float32 [S, H, W], physical intensities
    instance_numbers: np.ndarray  # int64 [S], InstanceNumber of each sorted slice
    instance_to_index: dict[int, int]
    positions: np.ndarray  # float64 [S, 3], ImagePositionPatient of each sorted slice
    orientation: np.ndarray  # float64 [2, 3], (row direction cosine, column direction cosine)
    normal: np.ndarray  # float64 [3], unit cross(row_cos, col_cos); slices ascend along it
    pixel_spacing: tuple[float, float]  # (row_mm, col_mm) = PixelSpacing
    slice_spacing: float  # median gap between slices along the normal, mm
    files: list[Path] = field(default_factory=list)  # in sorted order
    # False: ``volume`` holds physical intensities (read_series). True: it holds the series'
    # 0.5/99.5 percentile window mapped to [0, 1] as float16, the form every stage reads
    # (:class:`~spinemm.data.store.SeriesStore` keeps series this way).
    windowed: bool = False

    def _slice_origin(self, k: np.ndarray) -> np.ndarray:
        """Patient position of pixel (0, 0) at fractional slice index ``k`` [N] -> [N, 3].

        Linear interpolation between the actual slice positions (so non-uniform gaps are exact at
        every slice); beyond either end the end segment is extended.
        """
        if len(self.positions) == 1:
            return self.positions[0] + k[:, None] * self.slice_spacing * self.normal
        seg = np.clip(np.floor(k).astype(np.int64), 0, len(self.positions) - 2)
        t = (k - seg)[:, None]
        return self.positions[seg] + t * (self.positions[seg + 1] - self.positions[seg])

    def voxel_to_patient(self, points: np.ndarray) -> np.ndarray:
        """Map voxel points ``[N, 3]`` as (x=col, y=row, k=slice) to patient LPS mm ``[N, 3]``."""
        pts = _as_points(points)
        row_mm, col_mm = self.pixel_spacing
        # x walks along the row direction by the column spacing, y along the column direction.
        in_plane = pts[:, :1] * col_mm * self.orientation[0] + pts[:, 1:2] * row_mm * self.orientation[1]
        return self._slice_origin(pts[:, 2]) + in_plane

    def patient_to_voxel(self, points: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`voxel_to_patient`: patient LPS mm ``[N, 3]`` -> (x, y, k) floats ``[N, 3]``."""
        pts = _as_points(points)
        depth = pts @ self.normal  # [N] distance along the normal
        proj = self.positions @ self.normal  # [S], ascending by construction
        if len(proj) == 1:
            k = (depth - proj[0]) / self.slice_spacing
        else:
            seg = np.clip(np.searchsorted(proj, depth, side="right") - 1, 0, len(proj) - 2)
            gap = proj[seg + 1] - proj[seg]
            safe = np.where(gap == 0, 1.0, gap)  # duplicate positions: stay on the first of the two
            k = seg + np.where(gap == 0, 0.0, (depth - proj[seg]) / safe)
        delta = pts - self._slice_origin(k)
        row_mm, col_mm = self.pixel_spacing
        x = delta @ self.orientation[0] / col_mm
        y = delta @ self.orientation[1] / row_mm
        return np.stack([x, y, k], axis=1)


def map_point(src: Series, x: float, y: float, k: float, dst: Series) -> tuple[float, float, float]:
    """Map voxel ``(x, y, k)`` of ``src`` to the voxel ``(x, y, k)`` of ``dst`` at the same patient point.

    Both series must share a frame of reference (same study), e.g. a point picked on a sagittal slice
    lands on the axial slice (``round(k)``) that passes through it.
    """
    patient = src.voxel_to_patient(np.array([[x, y, k]], dtype=np.float64))
    mx, my, mk = dst.patient_to_voxel(patient)[0]
    return float(mx), float(my), float(mk)


def _as_points(points: np.ndarray) -> np.ndarray:
    pts = np.atleast_2d(np.asarray(points, dtype=np.float64))
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"points must have shape [N, 3], got {tuple(pts.shape)}")
    return pts


def series_files(series_dir: Path) -> list[Path]:
    """The DICOM files of a series folder, sorted by name: what ``read_series`` reads and the cache hashes.

    A file named ``*.dcm`` in any case is taken as DICOM (a broken one then fails loudly when read);
    any other file is taken when it carries the DICOM preamble (``DICM`` at byte 128), so slices named
    ``1.DCM`` or ``1`` are not lost. Other files and subfolders are left out with a warning naming them.
    """
    series_dir = Path(series_dir)
    if not series_dir.is_dir():
        raise SpineDataError(f"{series_dir}: not a series folder")
    files, ignored = [], []
    for path in sorted(series_dir.iterdir()):
        if path.is_file() and (path.suffix.lower() == ".dcm" or _has_dicom_preamble(path)):
            files.append(path)
        else:
            ignored.append(path.name)
    if not files:
        raise SpineDataError(f"{series_dir}: no DICOM files in series folder" + (f" (found {ignored[:5]})" if ignored else ""))
    if ignored:
        warnings.warn(
            f"{series_dir}: ignoring {len(ignored)} entries that are not DICOM files: {ignored[:5]}"
            f"{' ...' if len(ignored) > 5 else ''}",
            stacklevel=3,
        )
    return files


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"
