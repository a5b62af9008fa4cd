"""Regions of interest cut from the ORIGINAL slices: the second stage's input.

The fusion model sees every series resampled to a few slices at a low resolution, which is enough
to find each finding but not to grade it: a canal that narrows by a few millimetres, or a foramen
that sits between two of the resampled slices, is lost. The ROI grader (``spinemm.models.grader``)
instead reads a 2.5D crop of the original slices (the finding's slice and its neighbours) centred
on the finding, with a side fixed in millimetres so every scanner's crop covers the same anatomy.

- :func:`normalized_volume`: a series' volume windowed to [0, 1] exactly as ``preprocess_series``.
- :func:`crop_roi` / :func:`crop_rois`: crops ``[slices, size, size]`` at (slice, x, y) in original
  pixels, one or many of a series at once.
- :class:`ROIWindows`: every labelled point of some studies, cut once with a margin in space and
  slices, so training draws shifted crops (the jitter that makes the grader tolerate the first
  stage's location errors) without decoding a DICOM again.
- :func:`labelled_volumes` / :func:`label_location`: the labelled series of some studies, taken from
  a :class:`~spinemm.data.store.SeriesStore`, and a label's slice and point in one (for ``ROIWindows``
  and the locator's ``LevelSlices``); :func:`label_point`: the one label check, in the pixels of the
  slice a label names, shared with ``SpineDataset``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import SpineDataError
from ..text import finding_texts
from .series import Series, resampled_point
from .sides import folded_targets, mirror_crops
from .store import SeriesStore, windowed

__all__ = ["normalized_volume", "crop_roi", "crop_rois", "ROIWindows", "labelled_volumes", "label_slice",
           "label_location", "label_point", "point_outside"]


def normalized_volume(series: Series) -> torch.Tensor:
    """float16 ``[S, H, W]`` in [0, 1]: the series' 0.5/99.5 percentile window, as every stage sees
    it (a :class:`~spinemm.data.store.SeriesStore` series is already windowed: no copy)."""
    return torch.from_numpy(windowed(series).volume)


def crop_roi(volume: torch.Tensor, pixel_spacing: Sequence[float], index: int, x: float, y: float,
             side_mm: float, size: int, slice_offsets: Sequence[int] = (-1, 0, 1)) -> torch.Tensor:
    """A square crop of side ``side_mm`` centred on pixel (x, y) of slice ``index``, resampled to ``size``.

    ``volume [S, H, W]``; ``pixel_spacing`` is DICOM's (row mm, column mm); ``x, y`` are column and
    row in pixels (pixel centres at integers, as in ``train_label_coordinates.csv``). One output
    channel per entry of ``slice_offsets``, clamped to the stack; outside the image is zero.
    Returns ``[len(slice_offsets), size, size]`` float32. :func:`crop_rois` cuts many at once.
    """
    return crop_rois(volume, pixel_spacing, [index], [x], [y], side_mm, size, slice_offsets)[0]


def crop_rois(volume: torch.Tensor, pixel_spacing: Sequence[float], indices: Sequence[int], xs: Sequence[float],
              ys: Sequence[float], side_mm: float, size: int, slice_offsets: Sequence[int] = (-1, 0, 1)) -> torch.Tensor:
    """:func:`crop_roi` at N points of one series in one resampling call: ``[N, C, size, size]``."""
    depth, height, width = volume.shape
    offsets = np.asarray(slice_offsets, dtype=np.int64)
    slices = np.clip(np.asarray(indices, dtype=np.int64)[:, None] + offsets[None], 0, depth - 1)  # [N, C]
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    row_mm, col_mm = (float(v) for v in pixel_spacing)
    side_x, side_y = side_mm / col_mm, side_mm / row_mm  # the crop's side in pixels
    # Shrinking by k or more whole pixels per output pixel (a 60 mm crop of a 0.3 mm, 1024 px
    # slice is 200 px cut to 32), average k x k blocks first: bilinear sampling alone would read 4
    # of every k^2 pixels, aliasing detail and keeping the noise of one pixel. A crop that is not
    # shrunk (k = 1) is sampled as before.
    kx, ky = max(1, int(side_x // size)), max(1, int(side_y // size))
    # Resample from a window around each crop, not from whole slices: a 60 mm crop of a 512 px
    # slice touches a tenth of it. The window holds every (block of) pixels bilinear sampling can
    # reach (the crop's extent, floored, plus a block each side) and zeros outside the image, so the
    # result is what sampling the whole slice with zero padding gives.
    x0 = np.floor(xs - side_x / 2).astype(np.int64) - kx
    y0 = np.floor(ys - side_y / 2).astype(np.int64) - ky
    win_w, win_h = _multiple(math.ceil(side_x) + 2 * kx + 2, kx), _multiple(math.ceil(side_y) + 2 * ky + 2, ky)
    images = _windows(volume, slices, x0, y0, win_w, win_h).float()  # [N, C, win_h, win_w]
    if kx > 1 or ky > 1:
        # a block spans the same extent of the window in grid_sample's [-1, 1] coordinates, so
        # the affine below holds for the averaged window too
        images = F.avg_pool2d(images, (ky, kx))
    n = len(slices)
    theta = torch.zeros(n, 2, 3)
    # affine_grid maps output [-1, 1] onto input [-1, 1]; align_corners=False puts pixel i's centre
    # at (2 i + 1) / n - 1.
    theta[:, 0, 0] = side_x / win_w
    theta[:, 1, 1] = side_y / win_h
    # centres in float64, then cast: float32 arithmetic here would move a 512 px crop by ~1e-4 px
    theta[:, 0, 2] = torch.from_numpy((2 * (xs - x0) + 1) / win_w - 1)
    theta[:, 1, 2] = torch.from_numpy((2 * (ys - y0) + 1) / win_h - 1)
    grid = F.affine_grid(theta, [n, len(offsets), size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _multiple(n: int, k: int) -> int:
    """``n`` rounded up to a multiple of ``k``."""
    return -(-n // k) * k


def _windows(volume: torch.Tensor, slices: np.ndarray, x0: np.ndarray, y0: np.ndarray, win_w: int,
             win_h: int) -> torch.Tensor:
    """``[N, C, win_h, win_w]`` windows of ``volume [S, H, W]`` at slices ``[N, C]`` with top-left
    pixels (x0, y0); pixels outside the image are 0."""
    # numpy, not torch: a window is one small copy, and torch's indexing costs 3-4x more per crop
    source = volume.detach().cpu().numpy()
    _, height, width = source.shape
    out = np.zeros((len(slices), slices.shape[1], win_h, win_w), dtype=source.dtype)
    for i, (left, top) in enumerate(zip(x0.tolist(), y0.tolist(), strict=True)):
        cols = slice(max(left, 0), min(left + win_w, width))
        rows = slice(max(top, 0), min(top + win_h, height))
        if cols.start < cols.stop and rows.start < rows.stop:
            out[i, :, rows.start - top:rows.stop - top, cols.start - left:cols.stop - left] = source[slices[i], rows, cols]
    return torch.from_numpy(out).to(volume.device)


class ROIWindows:
    """Every labelled (study, condition, level) point of ``study_ids``, cut once with a margin.

    Each window is ``[1 + 2 * (context + slice_jitter), W, W]`` float16: the label's slice with
    ``context + slice_jitter`` neighbours on each side, and a side of ``side_mm * (1 + 2 * shift)``
    at the crop's resolution (``W = size + 2 * pad``). :meth:`crops` draws ``[N, 1 + 2 * context,
    size, size]`` crops from them, shifted by up to ``pad`` pixels and ``slice_jitter`` slices.

    Rows without a coordinate or label are left out (there is nothing to crop), and counted in
    :attr:`skipped`. Series paths come from validated integer ids, never from CSV text.
    """

    def __init__(self, root: str | Path, frame: pd.DataFrame, study_ids: Sequence[int], *, side_mm: float,
                 size: int, context: int = 1, shift: float = 0.1, slice_jitter: int = 1, split: str = "train",
                 progress: bool = True, store: SeriesStore | None = None, fold_sides: bool = False) -> None:
        self.size, self.context, self.slice_jitter = int(size), int(context), int(slice_jitter)
        self.pad = int(round(shift * self.size))
        rows = frame[frame["study_id"].isin([int(s) for s in study_ids])]
        usable = rows["instance_number"].notna() & (rows["label"] >= 0)
        self.skipped = int((~usable).sum())
        rows = rows[usable].sort_values(["study_id", "series_id", "target"])
        reach = self.context + self.slice_jitter
        offsets = range(-reach, reach + 1)
        outer = self.size + 2 * self.pad
        windows, targets, labels, studies, texts = [], [], [], [], []
        store = store if store is not None else SeriesStore(root, split)
        for study_id, path, series, volume, group in labelled_volumes(store, rows, "ROI windows", progress):
            located = [label_location(series, path, row.instance_number, study_id, row.column, row.x, row.y)
                       for row in group.itertuples(index=False)]
            index, xs, ys = (list(v) for v in zip(*located, strict=True))
            windows.append(crop_rois(volume, series.pixel_spacing, index, xs, ys,
                                     side_mm * outer / self.size, outer, offsets).to(torch.float16))
            targets += group["target"].astype(int).tolist()
            texts += finding_texts(series, folded_targets(group["target"].to_numpy())[0] if fold_sides
                                   else group["target"].to_numpy())
            labels += group["label"].astype(int).tolist()
            studies += [int(study_id)] * len(group)
        self.windows = torch.cat(windows) if windows else torch.zeros(0, len(offsets), outer, outer, dtype=torch.float16)
        if fold_sides:  # each right-sided window mirrored and read as its left twin (spinemm.data.sides)
            self.windows = mirror_crops(self.windows, targets)
            targets = folded_targets(targets)[0].tolist()
        self.targets = torch.tensor(targets, dtype=torch.long)
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.study_ids = np.asarray(studies, dtype=np.int64)
        self.texts = texts  # each row's spinemm.text.finding_text (its series' acquisition)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def draw_shifts(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``[n, 3]`` random (dx, dy, dk) window positions for :meth:`crops`."""
        dx, dy = (torch.randint(0, 2 * self.pad + 1, (n,), generator=generator) for _ in range(2))
        dk = torch.randint(0, 2 * self.slice_jitter + 1, (n,), generator=generator)
        return torch.stack([dx, dy, dk], dim=1)

    def crops(self, index: torch.Tensor, generator: torch.Generator | None = None,
              shifts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Crops ``[N, 1 + 2 * context, size, size]`` of windows ``index`` and the label point's
        offset from each crop's centre ``[N, 3]``: x, y as fractions of the crop side, and slices.
        At ``shifts`` (:meth:`draw_shifts`) when given, else random shifts when a ``generator`` is
        given, else the centre (offset 0)."""
        n, channels = len(index), 1 + 2 * self.context
        if shifts is None:
            shifts = self.draw_shifts(n, generator) if generator is not None else \
                torch.tensor([self.pad, self.pad, self.slice_jitter]).expand(n, 3)
        dx, dy, dk = shifts.unbind(1)
        span, side = torch.arange(channels), torch.arange(self.size)
        # one gather: [N, 1, 1, 1] windows x [N, C, 1, 1] slices x [N, 1, S, 1] rows x [N, 1, 1, S] columns
        crops = self.windows[index[:, None, None, None], (dk[:, None] + span)[:, :, None, None],
                             (dy[:, None] + side)[:, None, :, None], (dx[:, None] + side)[:, None, None, :]].float()
        xy = torch.stack([self.pad - dx, self.pad - dy], dim=-1).float() / self.size
        return crops, torch.cat([xy, (self.slice_jitter - dk).float()[:, None]], dim=-1)


def labelled_volumes(store: SeriesStore, rows: pd.DataFrame, desc: str,
                     progress: bool = True) -> Iterator[tuple[int, Path, Series, torch.Tensor, pd.DataFrame]]:
    """``(study_id, path, series, normalized volume, rows of that series)`` for each (study, series)
    of the label ``rows``, in sorted order, taken from ``store`` (each series decoded once per run)."""
    groups = rows.groupby(["study_id", "series_id"], sort=True)
    for (study_id, series_id), group in tqdm(groups, desc=desc, unit="series", disable=not progress):
        series = store.get(int(study_id), int(series_id))
        yield int(study_id), store.path(study_id, series_id), series, normalized_volume(series), group


def point_outside(x: float, y: float, width: int, height: int) -> str | None:
    """Why a label point (x = column, y = row, in the pixels of its slice) cannot be on a ``width`` x
    ``height`` slice, or None when it can: the one label check of every reader of label coordinates."""
    if not (np.isfinite(x) and np.isfinite(y)):
        return f"(x={x}, y={y}) is not a finite point"
    if not (0.0 <= x <= width and 0.0 <= y <= height):
        return f"(x={x}, y={y}) lies outside the {width}x{height} image"
    return None


def label_point(x: float, y: float, own_shape: tuple[int, int],
                grid_shape: tuple[int, int]) -> tuple[tuple[float, float] | None, str | None]:
    """A label point read in the pixels of the slice it names: ``((x, y) in the series' common grid,
    None)``, or ``(None, why not)`` when it is off that slice (:func:`point_outside` against the
    slice's OWN (rows, columns) ``own_shape``). A slice of another size was resampled to
    ``grid_shape`` over the same field of view with pixel centres aligned
    (:mod:`spinemm.data.pixels`), so its pixel ``x`` lies at ``(x + 0.5) * W / w - 0.5`` of the grid.
    Every reader of label coordinates goes through here (``SpineDataset``, ``ROIWindows``,
    ``LevelSlices`` via :func:`label_location`)."""
    problem = point_outside(float(x), float(y), own_shape[1], own_shape[0])
    if problem:
        return None, problem
    return resampled_point(float(x), float(y), own_shape, grid_shape), None



def label_slice(series: Series, path: Path, instance: float, study_id: int, what: str) -> int:
    """The slice index of a label's InstanceNumber, or a :class:`SpineDataError` naming the series."""
    index = series.instance_to_index.get(int(instance))
    if index is None:
        where = f"train_label_coordinates.csv, study {study_id}, {what}"
        raise SpineDataError(f"{path}: no slice with InstanceNumber {int(instance)} ({where})")
    return index


def label_location(series: Series, path: Path, instance: float, study_id: int, what: str,
                   x: float, y: float) -> tuple[int, float, float]:
    """``(slice index, x, y)`` of a label: its InstanceNumber's slice (:func:`label_slice`) and its
    point checked against that slice's own size and mapped into the series' grid
    (:func:`label_point`); a point off its slice is a :class:`SpineDataError` naming the series."""
    index = label_slice(series, path, instance, study_id, what)
    point, problem = label_point(x, y, series.slice_shape(index), series.volume.shape[-2:])
    if point is None:
        where = f"train_label_coordinates.csv, study {study_id}, {what}"
        raise SpineDataError(f"{path}: label point {problem} of InstanceNumber {int(instance)} ({where})")
    return index, point[0], point[1]
