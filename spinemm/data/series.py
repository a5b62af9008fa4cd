"""A DICOM series in memory: the sorted float32 volume and its patient-space (LPS mm) geometry.

:func:`spinemm.data.read_series` builds it; :meth:`Series.voxel_to_patient` and
:meth:`Series.patient_to_voxel` map between a slice's pixels and patient space, and
:func:`map_point` carries a point from one series of a study into another (sagittal -> axial).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spinemm.errors import SpineDataError

__all__ = ["Series", "map_point", "map_points", "series_files", "geometric_plane", "GEOMETRIC_PLANES"]

NOMINAL_ORIENTATION = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
#: What a slice normal along each patient axis (LPS x, y, z) shows.
GEOMETRIC_PLANES: tuple[str, str, str] = ("sagittal", "coronal", "axial")


def geometric_plane(normal: np.ndarray) -> str:
    """``"sagittal"``, ``"coronal"`` or ``"axial"``: the plane a slice normal (LPS) is closest to,
    read from ImageOrientationPatient, never from a description."""
    return GEOMETRIC_PLANES[int(np.argmax(np.abs(np.asarray(normal, dtype=np.float64))))]


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
    # float64 [S, 2, 3]: each slice's own (row, column) cosines when the series has blocks of
    # differing orientation; None when every slice has ``orientation``.
    orientations: np.ndarray | None = None
    # False: ``volume`` holds physical intensities (read_series). True: it holds the series'
    # 0.5/99.5 percentile window mapped to [0, 1] as float16, the form every stage reads
    # (:class:`~spinemm.data.store.SeriesStore` keeps series this way).
    windowed: bool = False
    # int64 [S, 2]: each sorted slice's (rows, columns) as stored, when some slice had another size
    # than ``volume``'s and was resampled to it; None when every slice has the volume's size. Label
    # points are in the pixels of their own slice (:func:`spinemm.data.roi.label_point` maps them).
    source_shapes: np.ndarray | None = None
    # True: the files lack ImagePositionPatient / ImageOrientationPatient and the geometry is nominal.
    nominal: bool = False

    @property
    def plane(self) -> str | None:
        """The plane the slices lie in, from ImageOrientationPatient (:func:`geometric_plane`);
        None when the geometry is nominal (no orientation recorded)."""
        return None if self.nominal else geometric_plane(self.normal)

    def slice_shape(self, index: int) -> tuple[int, int]:
        """(rows, columns) of sorted slice ``index`` as stored in its file."""
        if self.source_shapes is None:
            return int(self.volume.shape[-2]), int(self.volume.shape[-1])
        rows, cols = self.source_shapes[index]
        return int(rows), int(cols)

    def to_slice_pixels(self, index: int, x: Any, y: Any) -> tuple[Any, Any]:
        """A point in the series' common grid (``volume``'s pixels, where every stage works) -> the
        pixels of sorted slice ``index`` as stored, where label coordinates and ``locations.csv``
        are; :meth:`to_grid_pixels` is the inverse. The identity unless that slice was resampled."""
        return resampled_point(x, y, tuple(self.volume.shape[-2:]), self.slice_shape(index))

    def to_grid_pixels(self, index: int, x: Any, y: Any) -> tuple[Any, Any]:
        """A point in the pixels of sorted slice ``index`` as stored -> the series' common grid."""
        return resampled_point(x, y, self.slice_shape(index), tuple(self.volume.shape[-2:]))

    def blocks(self) -> list[np.ndarray]:
        """Indices of each block of parallel slices, in order (one block unless ``orientations``)."""
        if self.orientations is None or len(self.orientations) < 2:
            return [np.arange(len(self.positions))]
        change = np.abs(np.diff(self.orientations.reshape(len(self.orientations), 6), axis=0)).max(axis=1) > 1e-6
        return np.split(np.arange(len(self.positions)), np.flatnonzero(change) + 1)

    def slice_orientations(self) -> np.ndarray:
        """float64 [S, 2, 3]: every slice's (row, column) cosines."""
        if self.orientations is not None:
            return self.orientations
        return np.broadcast_to(self.orientation, (len(self.positions), 2, 3))

    def voxel_to_patient(self, points: np.ndarray) -> np.ndarray:
        """Map voxel points ``[N, 3]`` as (x=col, y=row, k=slice) to patient LPS mm ``[N, 3]``.

        A fractional ``k`` lies between the two slices around it (linear in their positions) when
        both are of one block; otherwise on the nearest slice's plane, moved along its normal.
        """
        pts = _as_points(points)
        out = np.empty_like(pts)
        for block in self.blocks():
            first, last = int(block[0]), int(block[-1])
            k = pts[:, 2]
            near = np.clip(np.rint(k), 0, len(self.positions) - 1)
            mine = (near >= first) & (near <= last)
            if mine.any():
                out[mine] = self._block_to_patient(pts[mine], first, last)
        return out

    def patient_to_voxel(self, points: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`voxel_to_patient`: patient LPS mm ``[N, 3]`` -> (x, y, k) floats ``[N, 3]``.

        With several blocks, a point goes to the block whose extent along its own normal (half a gap
        beyond its end slices) holds it, nearest slice first; a point outside every block goes to
        the block with the nearest slice plane.
        """
        pts = _as_points(points)
        blocks = self.blocks()
        if len(blocks) == 1:
            return self._patient_to_block(pts, 0, len(self.positions) - 1)
        candidates = [self._patient_to_block(pts, int(b[0]), int(b[-1])) for b in blocks]
        # rank: outside the block's extent after every inside one, then by distance to the nearest slice
        ranks = np.stack([self._block_distance(pts, int(b[0]), int(b[-1])) for b in blocks])  # [B, N]
        best = np.argmin(ranks, axis=0)
        return np.stack([candidates[b][i] for i, b in enumerate(best)]) if len(pts) else pts.copy()

    # ------------------------------------------------------------------------- one block
    def _block_frame(self, first: int) -> tuple[np.ndarray, np.ndarray]:
        """(orientation [2, 3], unit normal [3]) of the block starting at slice ``first``."""
        orientation = self.slice_orientations()[first]
        if self.orientations is None:
            return orientation, self.normal
        normal = np.cross(orientation[0], orientation[1])
        return orientation, normal / np.linalg.norm(normal)

    def _block_gap(self, first: int, last: int, normal: np.ndarray) -> float:
        if last > first:
            gaps = np.diff(self.positions[first : last + 1] @ normal)
            if np.median(gaps) > 0:
                return float(np.median(gaps))
        return self.slice_spacing

    def _slice_origin(self, k: np.ndarray, first: int, last: int, normal: np.ndarray) -> np.ndarray:
        """Patient position of pixel (0, 0) at fractional slice index ``k`` [N] -> [N, 3] of the block.

        Linear interpolation between the actual slice positions (so non-uniform gaps are exact at
        every slice); beyond either end of the block the end segment is extended.
        """
        if last == first:
            return self.positions[first] + (k - first)[:, None] * self._block_gap(first, last, normal) * normal
        seg = np.clip(np.floor(k).astype(np.int64), first, last - 1)
        t = (k - seg)[:, None]
        return self.positions[seg] + t * (self.positions[seg + 1] - self.positions[seg])

    def _block_to_patient(self, pts: np.ndarray, first: int, last: int) -> np.ndarray:
        orientation, normal = self._block_frame(first)
        row_mm, col_mm = self.pixel_spacing
        # x walks along the row direction by the column spacing, y along the column direction.
        in_plane = pts[:, :1] * col_mm * orientation[0] + pts[:, 1:2] * row_mm * orientation[1]
        return self._slice_origin(pts[:, 2], first, last, normal) + in_plane

    def _patient_to_block(self, pts: np.ndarray, first: int, last: int) -> np.ndarray:
        orientation, normal = self._block_frame(first)
        depth = pts @ normal  # [N] distance along the normal
        proj = self.positions[first : last + 1] @ normal  # ascending by construction
        if len(proj) == 1:
            k = first + (depth - proj[0]) / self._block_gap(first, last, normal)
        else:
            seg = np.clip(np.searchsorted(proj, depth, side="right") - 1, 0, len(proj) - 2)
            gap = proj[seg + 1] - proj[seg]
            safe = np.where(gap == 0, 1.0, gap)  # duplicate positions: stay on the first of the two
            k = first + seg + np.where(gap == 0, 0.0, (depth - proj[seg]) / safe)
        delta = pts - self._slice_origin(k, first, last, normal)
        row_mm, col_mm = self.pixel_spacing
        x = delta @ orientation[0] / col_mm
        y = delta @ orientation[1] / row_mm
        return np.stack([x, y, k], axis=1)

    def _block_distance(self, pts: np.ndarray, first: int, last: int) -> np.ndarray:
        """[N] distance (mm) from each point to the block's nearest slice plane, plus a large
        penalty when the point lies beyond the block's extent along its normal."""
        _, normal = self._block_frame(first)
        depth = pts @ normal
        proj = self.positions[first : last + 1] @ normal
        half = self._block_gap(first, last, normal) / 2
        nearest = np.abs(depth[:, None] - proj[None, :]).min(axis=1)
        outside = (depth < proj.min() - half) | (depth > proj.max() + half)
        return nearest + np.where(outside, 1e6, 0.0)


def map_point(src: Series, x: float, y: float, k: float, dst: Series) -> tuple[float, float, float]:
    """Map voxel ``(x, y, k)`` of ``src`` to the voxel ``(x, y, k)`` of ``dst`` at the same patient point.

    Both series must share a frame of reference (same study), e.g. a point picked on a sagittal slice
    lands on the axial slice (``round(k)``) that passes through it.
    """
    mx, my, mk = map_points(src, np.array([[x, y, k]], dtype=np.float64), dst)[0]
    return float(mx), float(my), float(mk)


def map_points(src: Series, points: np.ndarray, dst: Series) -> np.ndarray:
    """:func:`map_point` for voxel points ``[N, 3]`` (x, y, k) at once -> ``[N, 3]``."""
    return dst.patient_to_voxel(src.voxel_to_patient(points))


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


def resampled_point(x: Any, y: Any, from_shape: tuple[int, int], to_shape: tuple[int, int]) -> tuple[Any, Any]:
    """A point (floats or arrays) in the pixels of an image of ``from_shape`` (rows, columns) ->
    the pixels of the same field of view at ``to_shape``, pixel centres aligned: ``(x + 0.5) * W /
    w - 0.5``. Its own inverse with the shapes swapped: a slice's pixels to the series' grid
    (:meth:`Series.to_grid_pixels`) and back (:meth:`Series.to_slice_pixels`). Unchanged when the shapes match."""
    if tuple(from_shape) == tuple(to_shape):
        return x, y
    (from_h, from_w), (to_h, to_w) = from_shape, to_shape
    return (x + 0.5) * to_w / from_w - 0.5, (y + 0.5) * to_h / from_h - 0.5
